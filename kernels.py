"""Fused log-prob kernels: log softmax(hidden @ W.T / T)[target] without ever holding the
tokens x vocab logits, and the batch-level functions every objective is built on.

  fused_logprobs       per-token log-probs [N], logits recomputed in backward (reference passes)
  fused_logprob_sum    a weighted sum (scalar), gradients computed in forward (SFT, Eq. 7, Eq. 8)
  fused_pair_loss      a loss of pairs of completion log-probs (scalar) by chunks of whole pairs,
                       gradients in forward from the loss's closed-form derivative (DPO, cDPO, IPO:
                       losses.fused_dpo_loss with losses.dpo_loss_and_grad)
  completion_logprob_sum  model + padded batch -> sum over the loss tokens
  pair_logps, pair_rewards  chosen/rejected examples -> DPO log-probs, Bradley-Terry rewards, from
                       one packed [prompt | chosen | rejected] pass (each prompt computed once)

Each kernel walks the rows in chunks; a chunk's logits are built in one reused float32 buffer,
reduced (target logit, logsumexp) and, where gradients are wanted, turned in place into
dlogits = w * (onehot - softmax) / T (`_softmax_grad_`). On CUDA, bf16 operands stay bf16:
tensor-core GEMMs with float32 outputs (`_gemm_operands`). (A Triton forward kernel, online
logsumexp over vocab blocks, was removed: on an H100 these cuBLAS chunks ran 1.7x faster.)
"""
import torch

from data import packed_pair_batch

IGNORE_INDEX = -100


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(weight, chunk):
    """Rows per chunk: `chunk`, or about 512 MiB of float32 logits (2**27 // V rows; on CUDA 2 GiB:
    fewer chunks, fewer passes over the float32 dW)."""
    return chunk or max(1, (1 << (29 if weight.is_cuda else 27)) // weight.shape[0])


def _gemm_operands(hidden, weight):
    """hidden and weight as the chunk GEMMs take them. On CUDA, bf16 / fp16 operands (the inputs'
    dtype, or bf16 autocast's) stay in that dtype: tensor-core GEMMs with float32 outputs, exact
    products and float32 accumulation, the float32 path's numbers up to summation order. Elsewhere
    the kernels promote them to float32 (CPU has no float32-output bf16 GEMM)."""
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        return hidden.to(dt), weight.to(dt)
    return hidden, weight


def _lowp(hidden, weight):
    """Whether the GEMMs run in the operands' own dtype (bf16 / fp16 on CUDA, both alike) rather
    than with both promoted to float32."""
    return hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype


def _mm(a, b, acc):
    """a @ b as an acc (float32) result, b a GEMM operand: a low-precision b means a tensor-core
    GEMM with a float32 output (a float32 `a`, dlogits, is rounded to b's dtype first, as autograd's
    bf16 backward rounds them); otherwise everything is in acc already."""
    return torch.mm(a.to(b.dtype), b, out_dtype=acc) if b.dtype != acc else a @ b


def _add_grad_w_(dw, d, h):
    """dW += dlogits.T @ h for a chunk (dw in float32)."""
    if h.dtype != dw.dtype:
        dw.add_(_mm(d.T, h, dw.dtype))
    else:
        dw.addmm_(d.T, h)


def _chunk_logits(h, w, temperature, buf):
    """Logits h @ w.T / T of one chunk [c, V] in float32: in the reused buffer, or a fresh tensor
    for low-precision operands (a float32-output GEMM takes no output buffer)."""
    d = _mm(h, w.T, buf.dtype) if w.dtype != buf.dtype else torch.mm(h, w.T, out=buf[:len(h)])
    if temperature != 1.0:
        d.div_(temperature)
    return d


def _softmax_grad_(d, lse, targets, gt):
    """In place: logits d [c, V] -> d/dz of sum_n gt_n * logprob_n, i.e. gt * (onehot - softmax)
    where gt [c, 1] already holds weight / T (0 on IGNORE_INDEX rows)."""
    d.sub_(lse[:, None]).exp_().mul_(-gt)                                    # -g * softmax / T
    d.scatter_add_(1, targets.clamp(min=0)[:, None], gt)                     # + g * onehot / T
    return d


class FusedLogprobs(torch.autograd.Function):
    """Chunked linear + log-softmax + gather.

    Forward: for each chunk of rows, logits = h_c @ W.T / T in float32, keep only the target logit
    and the logsumexp (N floats each). Backward: recompute each chunk's logits from the saved
    hidden/weight and lse, turn them in place into dlogits = g * (onehot - softmax) / T, then
    dh_c = dlogits @ W and dW += dlogits.T @ h_c. We recompute rather than compute gradients during
    forward (Liger's choice) because our output is per-token [N], not a reduced scalar: the
    upstream gradient of every row is unknown in forward, so dW could not be accumulated there
    without keeping per-row terms as large as the logits. Recompute costs one extra matmul (4
    instead of 3); working memory is one chunk of logits (on CPU plus the float32 copy of a bf16 W).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, want_entropy):
        N, acc, lo = hidden.shape[0], _acc_dtype(hidden), _lowp(hidden, weight)
        w = weight if lo else weight.to(acc)
        out = torch.zeros(N, dtype=acc, device=hidden.device)
        lse = torch.zeros(N, dtype=acc, device=hidden.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)  # reused
        for s in range(0, N, chunk):
            # Of each chunk's logits only two numbers per row survive: the target's and the logsumexp.
            t = targets[s:s + chunk]
            h = hidden[s:s + chunk] if lo else hidden[s:s + chunk].to(acc)
            logits = _chunk_logits(h, w, temperature, buf)                         # [c, V]
            tl_ = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            m = logits.amax(-1, keepdim=True)
            if want_entropy:  # H = lse - sum(p * logit)
                e = (logits - m).exp_()
                z = e.sum(-1)
                ent[s:s + chunk] = m.squeeze(1) + z.log() - e.mul_(logits).sum(-1) / z
            else:
                z = logits.sub_(m).exp_().sum(-1)                                  # in place
            l = m.squeeze(1) + z.log()
            out[s:s + chunk] = torch.where(t != IGNORE_INDEX, tl_ - l, 0.0)
            lse[s:s + chunk] = l
        # Backward rebuilds the logits from these; lse turns them into the softmax without a second pass.
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        acc, lo = _acc_dtype(hidden), _lowp(hidden, weight)
        w = weight if lo else weight.to(acc)
        dh = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w, dtype=acc) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(chunk, hidden.shape[0]), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            # The upstream gradient is known now, so each chunk's recomputed logits become dlogits.
            h = hidden[s:s + chunk] if lo else hidden[s:s + chunk].to(acc)
            t = targets[s:s + chunk]
            gt = (torch.where(t != IGNORE_INDEX, g[s:s + chunk], 0.0) / T)[:, None]  # [c, 1]
            d = _softmax_grad_(_chunk_logits(h, w, T, buf), lse[s:s + chunk], t, gt)  # [c, V]
            if dh is not None:
                dh[s:s + chunk] = _mm(d, w, acc).to(hidden.dtype)
            if dw is not None:
                _add_grad_w_(dw, d, h)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None


class FusedLogprobSum(torch.autograd.Function):
    """sum_n weights[n] * log softmax(h_n @ W.T / T)[t_n], a scalar, with the gradients computed
    during forward chunk by chunk (Liger's strategy): the upstream gradient of a scalar is one
    number, so the per-row weights are known in forward and no logits are recomputed (3 matmuls,
    as the naive way). For objectives linear in the token log-probs (SFT, GenRM Eq. 7, Eq. 8)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, temperature, chunk):
        N, acc, lo = hidden.shape[0], _acc_dtype(hidden), _lowp(hidden, weight)
        w = weight if lo else weight.to(acc)
        dh = torch.zeros_like(hidden, dtype=acc)
        dw = torch.zeros_like(w, dtype=acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            t = targets[s:s + chunk]
            h = hidden[s:s + chunk] if lo else hidden[s:s + chunk].to(acc)
            wn = torch.where(t != IGNORE_INDEX, weights[s:s + chunk].to(acc), 0.0)
            d = _chunk_logits(h, w, temperature, buf)                            # [c, V]
            tl_ = d.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            lse = torch.logsumexp(d, -1)
            total += ((tl_ - lse) * wn).sum()
            # The output is a weighted sum, so each row's gradient weight is its weight: known now.
            _softmax_grad_(d, lse, t, (wn / temperature)[:, None])
            dh[s:s + chunk] = _mm(d, w, acc)
            _add_grad_w_(dw, d, h)
        # Backward only scales these by the upstream gradient (one number for a scalar output).
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return (dh * g).to(ctx.dtypes[0]), (dw * g).to(ctx.dtypes[1]), None, None, None, None


def fused_logprob_sum(hidden, weight, targets, weights=None, *, temperature=1.0, chunk=None):
    """sum_n weights[n] * log pi(targets[n]) (weights default to 1; IGNORE_INDEX rows count 0) as
    a scalar, gradients computed in forward (see FusedLogprobSum). Same values as
    (weights * fused_logprobs(...)).sum(), one matmul cheaper in backward."""
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device)
    hidden, weight = _gemm_operands(hidden, weight)
    chunk = _chunk_rows(weight, chunk)
    return FusedLogprobSum.apply(hidden, weight, targets, weights, float(temperature), chunk)


def fused_logprobs(hidden, weight, targets, *, temperature=1.0, chunk=None, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] as float32 [N] (float64 for float64
    inputs, whatever the input dtype otherwise), never holding more than `chunk` rows of logits
    (default: about 512 MiB of them, 2 GiB on CUDA). hidden [N, H], weight [V, H], targets [N]
    (IGNORE_INDEX -> 0, no gradient). Differentiable in hidden and weight. With return_entropy,
    also the per-token entropy of the (tempered) distribution, not differentiable."""
    hidden, weight = _gemm_operands(hidden, weight)
    chunk = _chunk_rows(weight, chunk)
    out, ent = FusedLogprobs.apply(hidden, weight, targets, float(temperature), chunk, return_entropy)
    return (out, ent) if return_entropy else out


# ----------------------------------------------------------------------------------------------
# pair losses (DPO) with gradients in forward: chunks of whole pairs, so each chunk's loss is final

def _pair_chunks(pair_rows, chunk):
    """Chunks of whole pairs, about `chunk` rows each: [(first row, end row, first pair, end pair)].
    A pair with more rows than `chunk` is a chunk of its own (its logits are held all at once)."""
    out, s, p0, rows = [], 0, 0, 0
    for p, n in enumerate(pair_rows):
        if rows and rows + n > chunk:
            out.append((s, s + rows, p0, p))
            s, p0, rows = s + rows, p, 0
        rows += n
    out.append((s, s + rows, p0, len(pair_rows)))
    return out


def _row_blocks(d):
    """Row slices of a chunk of logits d [c, V], ~4 MiB each: the elementwise passes (logsumexp,
    softmax grad) run block by block in cache instead of streaming the chunk through memory, and
    torch.logsumexp allocates a block-sized temporary instead of a second [c, V]. On CUDA one
    block: there each pass is a kernel launch, and the chunk streams at memory speed anyway."""
    rows = len(d) if d.is_cuda else max(1, (1 << 20) // d.shape[1])
    return [slice(r, r + rows) for r in range(0, len(d), rows)]


class FusedPairLoss(torch.autograd.Function):
    """A loss over P pairs of completions that depends on each completion's log-prob only, from
    hidden states, with the gradients computed in forward (Liger's chunked preference losses):
    DPO, cDPO, IPO (losses.fused_dpo_loss). Chunks hold whole pairs, so each chunk's per-pair losses
    are final: `pair_loss` gives them and their derivative wrt each completion's log-prob in closed
    form (losses.dpo_loss_and_grad), hence every row's weight w_n, and the chunk's logits are
    turned in place into dlogits = w * (onehot - softmax) / T. 3 matmuls per chunk (as the naive
    way), no recompute; backward only scales the saved dh, dW by the scalar upstream gradient, in
    place (so a second backward through one forward with an upstream gradient != 1 raises).
    Memory: one chunk of float32 logits, plus dh [N, H] and dW [V, H] in float32 held from forward
    to backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, seq, P, pair_loss, average, norm, temperature, chunk):
        acc, lo = _acc_dtype(hidden), _lowp(hidden, weight)
        w = weight if lo else weight.to(acc)
        # Count each completion's rows and loss tokens first: an empty completion has no log-prob.
        keep = (targets != IGNORE_INDEX).to(acc)                                   # [N]
        rows = torch.bincount(seq, minlength=2 * P)                                # [2P] rows per completion
        if (rows == 0).any():
            p = int((rows == 0).nonzero()[0]) // 2
            raise ValueError(f"fused pair loss: pair {p} lacks rows for its chosen or its rejected "
                             "completion")
        ntok = torch.zeros(2 * P, dtype=acc, device=hidden.device).index_add_(0, seq, keep)  # loss tokens
        if average and (ntok == 0).any():
            c = int((ntok == 0).nonzero()[0])
            raise ValueError(f"fused pair loss: averaging over loss tokens; completion {c} has none")
        pol = torch.zeros(2 * P, dtype=acc, device=hidden.device)                  # [2P] policy log-probs
        dh = torch.zeros_like(hidden, dtype=acc)
        dw = torch.zeros_like(w, dtype=acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # Whole pairs per chunk: a pair's loss needs both its completions' log-probs at once.
        chunks = _pair_chunks(rows.view(P, 2).sum(1).tolist(), chunk)
        buf = torch.empty(max(e - s for s, e, _, _ in chunks), w.shape[0], dtype=acc, device=hidden.device)
        for s, e, p0, p1 in chunks:
            # The chunk's logits, their logsumexp, and each completion's log-prob (sum or average).
            t, h = targets[s:e], (hidden[s:e] if lo else hidden[s:e].to(acc))
            loc = seq[s:e] - 2 * p0                                                # [c] completion index
            d = _chunk_logits(h, w, temperature, buf)                              # [c, V]
            blocks = _row_blocks(d)
            lse = torch.cat([torch.logsumexp(d[b], -1) for b in blocks])          # [c]
            lp = (d.gather(1, t.clamp(min=0)[:, None]).squeeze(1) - lse) * keep[s:e]  # [c] token log-probs
            n = ntok[2 * p0:2 * p1] if average else 1.0                            # averages, or sums
            pc = torch.zeros(2 * (p1 - p0), dtype=acc, device=hidden.device).index_add_(0, loc, lp) / n
            pol[2 * p0:2 * p1] = pc
            # The pairs' losses and their derivatives wrt each completion's log-prob, in closed form.
            loss, dpol = pair_loss(slice(p0, p1), pc.view(-1, 2))                  # [p1 - p0], [p1 - p0, 2]
            total += loss.sum() / norm
            g = dpol.reshape(-1) / (n * norm)                                      # [2 (p1 - p0)] dloss/dlogp
            gt = (g[loc] * keep[s:e] / temperature)[:, None]                       # [c, 1] row weights / T
            # d becomes dlogits in place; then dh = dlogits @ W and dW += dlogits.T @ h.
            for b in blocks:
                _softmax_grad_(d[b], lse[b], t[b], gt[b])
            dh[s:e] = _mm(d, w, acc)
            _add_grad_w_(dw, d, h)
        ctx.grads = (dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        chosen, rejected = pol[0::2].contiguous(), pol[1::2].contiguous()          # [P] each
        ctx.mark_non_differentiable(chosen, rejected)
        return total, chosen, rejected

    @staticmethod
    def backward(ctx, g, _g_chosen, _g_rejected):
        if ctx.grads is None:
            raise RuntimeError("fused pair loss: second backward through one forward "
                               "(saved gradients were scaled in place)")
        dh, dw = ctx.grads
        if g != 1:  # scaled in place: a scaled copy would hold a second V x H float32 dW at peak
            dh.mul_(g)
            dw.mul_(g)
            ctx.grads = None
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), *[None] * 8


def fused_pair_loss(hidden, weight, targets, seq, num_pairs, pair_loss, *, average=False, reduction="mean",
                    temperature=1.0, chunk=None):
    """A pair loss of completion log-probs straight from the hidden states (FusedPairLoss).

    Args:
        hidden: [N, H] the positions that predict completion tokens; weight [V, H] the lm_head.
        targets: [N] those tokens (IGNORE_INDEX rows count 0).
        seq: [N] long, 2i on pair i's chosen rows and 2i + 1 on its rejected rows; each pair's rows
            contiguous and pairs in order (seq non-decreasing), as a packed [prompt | chosen |
            rejected] batch flattens.
        pair_loss: (pairs: a slice of the P pairs, log-probs [p, 2] (chosen, rejected)) ->
            (losses [p], their derivatives wrt the log-probs [p, 2]).
        average: completion log-probs are averages over their non-ignored rows, else sums of
            log softmax(h @ W.T / T)[target].
        reduction: "mean" over the pairs or "sum".
        chunk: rows of logits per chunk, whole pairs (default 2**27 // V rows, ~512 MiB); a pair
            longer than that makes one larger chunk.
    Returns:
        (loss, policy_chosen [P], policy_rejected [P]), the log-probs detached, in float32
        (float64 for float64 inputs).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused pair loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not seq.shape == targets.shape == hidden.shape[:1]:
        raise ValueError(f"fused pair loss: shapes hidden {tuple(hidden.shape)}, targets "
                         f"{tuple(targets.shape)}, seq {tuple(seq.shape)} disagree")
    P = num_pairs
    if len(seq) and (bool((seq[1:] < seq[:-1]).any()) or int(seq[0]) < 0 or int(seq[-1]) >= 2 * P):
        raise ValueError(f"fused pair loss: seq must be non-decreasing in [0, {2 * P}) "
                         "(2i: pair i's chosen, 2i + 1: rejected)")
    hidden, weight = _gemm_operands(hidden, weight)
    norm = P if reduction == "mean" else 1                                       # the loss is a sum / norm
    return FusedPairLoss.apply(hidden, weight, targets, seq, P, pair_loss, average, norm, float(temperature),
                               _chunk_rows(weight, chunk))


# ----------------------------------------------------------------------------------------------
# batch level: a padded batch through the model to the numbers the losses need

def _completion_rows(model, idx, valid, loss_mask):
    """Final hidden states of the positions that predict a loss token, and those tokens."""
    h = model.hidden(idx, valid=valid)[:, :-1]                                   # [B, T-1, H]
    keep = loss_mask[:, 1:].bool()                                               # [B, T-1]
    return h[keep], idx[:, 1:][keep], keep                                       # [n, H], [n]


def completion_logprob_sum(model, idx, valid, loss_mask):
    """Sum of log pi over the loss tokens of the batch (a scalar), via fused_logprob_sum.
    idx, valid, loss_mask: [B, T] (data.prompt_completion_batch)."""
    h, tgt, _ = _completion_rows(model, idx, valid, loss_mask)
    return fused_logprob_sum(h, model.lm_head.weight, tgt)


def packed_pair_hidden(model, batch, pad_id):
    """Pairs (examples with `prompt`, `completion` = chosen, `rejected`) through the model packed as
    [prompt | chosen | rejected], each prompt computed once (data.PackedPairs): final hidden states
    flattened [B * T, H], and the PackedPairs that index them."""
    triples = [(e.prompt, e.completion, e.rejected) for e in batch]
    pk = packed_pair_batch(triples, pad_id, model.lm_head.weight.device)
    h = model.hidden(pk.idx, pos=pk.pos, attn_mask=pk.mask)                      # [B, T, H]
    return h.flatten(0, 1), pk


def pair_logps(model, batch, pad_id, average=False):
    """Summed (or per-token averaged) completion log-probs of chosen and rejected [B] each (DPO,
    Eq. 9), from one packed pass per batch: equal to running prompt + chosen and prompt + rejected
    as separate sequences."""
    h, pk = packed_pair_hidden(model, batch, pad_id)
    lp = fused_logprobs(h[pk.src], model.lm_head.weight, pk.tgt)               # [n]
    s = torch.zeros(2 * len(batch), dtype=lp.dtype, device=lp.device).index_add(0, pk.seq, lp)  # [2B]
    if average:
        s = s / torch.bincount(pk.seq, minlength=2 * len(batch))
    return s[0::2], s[1::2]


def pair_rewards(model, batch, pad_id):
    """Bradley-Terry rewards (Eq. 1) of chosen and rejected [B] each, from the scalar head on the
    last chosen and the last rejected token of one packed pass."""
    h, pk = packed_pair_hidden(model, batch, pad_id)
    r = model.score(h[pk.last]).float().squeeze(-1)                             # [B, 2]
    return r[:, 0], r[:, 1]
