"""Fused log-prob kernels: log softmax(hidden @ W.T / T)[target] without ever holding the
tokens x vocab logits, and the batch-level functions every objective is built on.

  fused_logprobs       per-token log-probs [N], logits recomputed in backward (reference passes)
  fused_logprob_sum    a weighted sum (scalar), gradients computed in forward (SFT, Eq. 7, Eq. 8)
  sequence_logprobs    model + padded batch -> per-token log-probs [B, T]
  completion_logprob_sum  model + padded batch -> sum over the loss tokens
  pair_logps, pair_rewards  chosen/rejected examples -> DPO log-probs, Bradley-Terry rewards

Each kernel walks the rows in chunks; a chunk's logits are built in one reused float32 buffer,
reduced (target logit, logsumexp) and, where gradients are wanted, turned in place into
dlogits = w * (onehot - softmax) / T (`_softmax_grad_`). On CUDA with Triton installed the
per-token forward is one Triton kernel (online logsumexp over vocab blocks).
"""
import torch
import torch.nn.functional as F

from data import pad, prompt_completion_batch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: CPU runs and CI have no Triton
    triton = None

IGNORE_INDEX = -100


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_rows(weight, chunk):
    """Rows per chunk: `chunk`, or about 512 MiB of float32 logits (2**27 // V rows)."""
    return chunk or max(1, (1 << 27) // weight.shape[0])


def _chunk_logits(h, w, temperature, buf):
    """Logits h @ w.T / T of one chunk [c, V], written into the reused buffer."""
    d = torch.mm(h, w.T, out=buf[:len(h)])
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
    instead of 3); working memory is one chunk of logits (plus the float32 copy of a bf16 W).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, want_entropy):
        N = hidden.shape[0]
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        out = torch.zeros(N, dtype=acc, device=hidden.device)
        lse = torch.zeros(N, dtype=acc, device=hidden.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)  # reused
        for s in range(0, N, chunk):
            t = targets[s:s + chunk]
            logits = _chunk_logits(hidden[s:s + chunk].to(acc), w, temperature, buf)  # [c, V]
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
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        dh = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(chunk, hidden.shape[0]), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(acc)
            t = targets[s:s + chunk]
            gt = (torch.where(t != IGNORE_INDEX, g[s:s + chunk], 0.0) / T)[:, None]  # [c, 1]
            d = _softmax_grad_(_chunk_logits(h, w, T, buf), lse[s:s + chunk], t, gt)  # [c, V]
            if dh is not None:
                dh[s:s + chunk] = (d @ w).to(hidden.dtype)
            if dw is not None:
                dw.addmm_(d.T, h)
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
        N = hidden.shape[0]
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        dh = torch.zeros_like(hidden, dtype=acc)
        dw = torch.zeros_like(w)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            t = targets[s:s + chunk]
            h = hidden[s:s + chunk].to(acc)
            wn = torch.where(t != IGNORE_INDEX, weights[s:s + chunk].to(acc), 0.0)
            d = _chunk_logits(h, w, temperature, buf)                            # [c, V]
            tl_ = d.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            lse = torch.logsumexp(d, -1)
            total += ((tl_ - lse) * wn).sum()
            _softmax_grad_(d, lse, t, (wn / temperature)[:, None])
            dh[s:s + chunk] = d @ w
            dw.addmm_(d.T, h)
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
    return FusedLogprobSum.apply(hidden, weight, targets, weights, float(temperature), _chunk_rows(weight, chunk))


def fused_logprobs(hidden, weight, targets, *, temperature=1.0, chunk=None, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] as float32 [N] (float64 for float64
    inputs, whatever the input dtype otherwise), never holding more than `chunk` rows of logits
    (default: about 512 MiB of them, 2**27 // V rows). hidden [N, H], weight [V, H], targets [N]
    (IGNORE_INDEX -> 0, no gradient). Differentiable in hidden and weight. On CUDA with Triton
    importable the forward runs as one Triton kernel (online logsumexp over vocab blocks). With
    return_entropy, also the per-token entropy of the (tempered) distribution, not differentiable."""
    fn = TritonFusedLogprobs if hidden.is_cuda and triton is not None else FusedLogprobs
    out, ent = fn.apply(hidden, weight, targets, float(temperature), _chunk_rows(weight, chunk), return_entropy)
    return (out, ent) if return_entropy else out


# ----------------------------------------------------------------------------------------------
# Triton forward (CUDA; tested on CPU under TRITON_INTERPRET=1)

if triton is not None:
    @triton.jit
    def _lse_kernel(h_ptr, w_ptr, t_ptr, out_ptr, lse_ptr, ent_ptr, N, V, H, inv_temp,
                    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
        m = tl.full((BN,), -float("inf"), tl.float32)
        ssum = tl.zeros((BN,), tl.float32)
        sx = tl.zeros((BN,), tl.float32)  # sum p * logit (for entropy), rescaled with m
        tlog = tl.zeros((BN,), tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            acc = tl.zeros((BN, BV), tl.float32)
            for h0 in range(0, H, BH):
                ks = h0 + tl.arange(0, BH)
                kmask = ks < H
                a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
            acc = acc * inv_temp
            acc = tl.where(cmask[None, :], acc, -float("inf"))
            new_m = tl.maximum(m, tl.max(acc, axis=1))
            scale = tl.exp(m - new_m)
            e = tl.exp(acc - new_m[:, None])
            ssum = ssum * scale + tl.sum(e, axis=1)
            sx = sx * scale + tl.sum(e * tl.where(cmask[None, :], acc, 0.0), axis=1)
            m = new_m
            hit = cols[None, :] == tgt[:, None]
            tlog += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        lse = m + tl.log(ssum)
        keep = tgt != -100
        tl.store(out_ptr + rows, tl.where(keep, tlog - lse, 0.0), mask=rmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(ent_ptr + rows, lse - sx / ssum, mask=rmask)


def _triton_forward(hidden, weight, targets, temperature):
    """Triton forward: target logit and logsumexp per row, streaming over vocab blocks with an
    online max/sum, float32 accumulation. Returns (logprob [N], lse [N], entropy [N])."""
    N, H = hidden.shape
    V = weight.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(out)
    ent = torch.empty_like(out)
    BN, BV, BH = 32, 64, 32
    _lse_kernel[(triton.cdiv(N, BN),)](hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                       out, lse, ent, N, V, H, 1.0 / temperature, BN=BN, BV=BV, BH=BH)
    return out, lse, ent


class TritonFusedLogprobs(FusedLogprobs):
    """Same function; the forward is the Triton kernel, the backward the chunked recompute above
    (its matmuls are cuBLAS GEMMs, already the fast path)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, want_entropy):
        out, lse, ent = _triton_forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent


# ----------------------------------------------------------------------------------------------
# batch level: a padded batch through the model to the numbers the losses need

def _completion_rows(model, idx, valid, loss_mask):
    """Final hidden states of the positions that predict a loss token, and those tokens."""
    h = model.hidden(idx, valid=valid)[:, :-1]                                   # [B, T-1, H]
    keep = loss_mask[:, 1:].bool()                                               # [B, T-1]
    return h[keep], idx[:, 1:][keep], keep                                       # [n, H], [n]


def sequence_logprobs(model, idx, valid, loss_mask, *, temperature=1.0):
    """Per-token log pi(idx[t] | idx[<t]) [B, T] (0 where loss_mask is 0; position 0 is never
    scored) via hidden -> fused_logprobs: the full [B, T, V] logits are never built."""
    h, tgt, keep = _completion_rows(model, idx, valid, loss_mask)
    lp = torch.zeros(keep.shape, dtype=torch.float32, device=idx.device)
    if len(tgt):
        lp[keep] = fused_logprobs(h, model.lm_head.weight, tgt, temperature=temperature)
    return F.pad(lp, (1, 0))                                                     # [B, T]


def completion_logprob_sum(model, idx, valid, loss_mask):
    """Sum of log pi over the loss tokens of the batch (a scalar), via fused_logprob_sum."""
    h, tgt, _ = _completion_rows(model, idx, valid, loss_mask)
    return fused_logprob_sum(h, model.lm_head.weight, tgt)


def pair_logps(model, batch, pad_id, average=False):
    """Summed (or per-token averaged) completion log-probs of chosen and rejected [B] each, for
    examples with `prompt`, `completion` (chosen) and `rejected` (DPO, Eq. 9)."""
    dev = model.lm_head.weight.device
    ex = [(e.prompt, e.completion) for e in batch] + [(e.prompt, e.rejected) for e in batch]
    idx, valid, mask = prompt_completion_batch(ex, pad_id)
    lp = sequence_logprobs(model, idx.to(dev), valid.to(dev), mask.to(dev)).sum(-1)
    if average:
        lp = lp / mask.sum(-1).to(dev)
    return lp[:len(batch)], lp[len(batch):]


def pair_rewards(model, batch, pad_id):
    """Bradley-Terry rewards (Eq. 1) of chosen and rejected [B] each, from the scalar head."""
    dev = model.lm_head.weight.device
    idx, valid = pad([e.prompt + e.completion for e in batch] + [e.prompt + e.rejected for e in batch], pad_id)
    r = model.reward(idx.to(dev), valid.to(dev))
    return r[:len(batch)], r[len(batch):]
