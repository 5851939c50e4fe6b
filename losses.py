"""The paper's objectives: each loss as a formula of log-probs or rewards with its equation on
the line (as the DPO reference code's `preference_loss`), and one micro-batch step of each
objective (a padded batch of `data.Example` through the model -> (loss sum, number correct)).
The formulas here are the ones that run: the steps call them, and the fused DPO kernel
(kernels.FusedPairLoss) runs dpo_loss_and_grad.

  step_sft                token NLL: SFT, STaR-SFT (Eq. 4), rationalizer (Eq. 8)
  step_genrm              GenRM without CoT, Eq. 7, on the indicator token
  bt_loss / step_bt       Bradley-Terry, Eq. 2
  dpo_loss / step_dpo     DPO, cDPO, IPO; STaR-DPO is Eq. 9 (dpo_margin, dpo_loss_and_grad,
                          fused_dpo_loss: the same from hidden states, gradients in forward)
  add_reference_logps     DPO's reference log-probs, computed once and cached on disk

Every step returns a loss *sum*; the trainer (fit.accumulate_gradients) divides it by the count
of the whole optimizer step (`Example.loss_terms`: loss tokens, or 1 per pair or verdict), the one
place where each objective becomes a mean over all its tokens or pairs.
"""
import hashlib
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dist
from data import pad, prompt_completion_batch
from files import atomic_write
from kernels import (
    completion_logprob_sum,
    fused_logprob_sum,
    fused_pair_loss,
    packed_pair_hidden,
    pair_logps,
    pair_rewards,
)
from model import Llama


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry, Eq. 2, per pair (as TRL's RewardTrainer without margin and OpenRLHF's
    PairWiseLoss). Args: rewards [P] each. Returns: [P] float32 losses."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())  # -log sigma(r_w - r_l)


def dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """h, the implicit reward margin, of sequence log-probs [P] each. Returns: [P]."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (pi_w - ref_w) - (pi_l - ref_l)


def dpo_loss_and_grad(h, *, beta, label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair DPO loss of the margin h [P] and its derivative dloss/dh [P], in closed form: what
    kernels.fused_dpo_loss turns into the gradient of every completion token's log-prob.

      sigmoid: L = -(1 - eps) log s(beta h) - eps log s(-beta h),  s the logistic sigmoid,
               dL/dh = beta (eps s(beta h) - (1 - eps) s(-beta h));
               eps = label_smoothing: cDPO for eps > 0, plain DPO (STaR-DPO's Eq. 9) for eps = 0.
      ipo:     L = (h - 1 / (2 beta))^2,  dL/dh = 2 (h - 1 / (2 beta)),  h of per-token averaged
               log-probs (as TRL's IPO).
    Returns: (loss [P], dloss/dh [P]) in h's dtype."""
    eps = label_smoothing
    if loss_type == "sigmoid":
        # The loss and its derivative share beta * h; log-sigmoid keeps both finite for any margin.
        bh = beta * h
        loss = -(1 - eps) * F.logsigmoid(bh) - eps * F.logsigmoid(-bh)          # Eq. 9 (cDPO for eps > 0)
        grad = beta * (eps * torch.sigmoid(bh) - (1 - eps) * torch.sigmoid(-bh))  # its derivative in h
        return loss, grad
    if loss_type == "ipo":
        # IPO regresses the margin onto 1 / (2 beta) instead of pushing it without bound.
        return (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))               # (h - 1/2b)^2, 2 (h - 1/2b)
    raise ValueError(f"unknown DPO loss kind {loss_type!r} (sigmoid or ipo)")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0,
             loss_type="sigmoid"):
    """Per-pair DPO losses (STaR-DPO is Eq. 9) of sequence log-probs [P] each, in float32; the
    objective is their mean over pairs. pi/ref are sums over completion tokens (DPO), or for ipo
    per-token *averages*, as TRL does for IPO (OpenRLHF applies the same formula to summed
    log-probs: pass sums there). Sigmoid matches TRL `loss_type="sigmoid"` and OpenRLHF DPOLoss.
    Returns: [P]."""
    h = dpo_margin(policy_chosen.float(), policy_rejected.float(), ref_chosen.float(), ref_rejected.float())
    return dpo_loss_and_grad(h, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)[0]


def _dpo_pair_loss(ref, beta, label_smoothing, loss_type, nll_weight, chosen_len, pairs, policy):
    """fused_pair_loss's pair_loss for DPO: the pairs' losses and d loss / d policy [p, 2]. With
    nll_weight alpha (RPO, Pang et al. 2024), each pair also pays alpha times its chosen answer's
    per-token NLL: loss = dpo - alpha * pi_w / |y_w| (IPO's pi_w is already a per-token mean)."""
    # The reference log-probs are constants: only the policy's side of the margin has a gradient.
    r = ref[pairs].to(policy.dtype)                                              # [p, 2] (chosen, rejected)
    h = dpo_margin(policy[:, 0], policy[:, 1], r[:, 0], r[:, 1])                 # [p]
    loss, dh = dpo_loss_and_grad(h, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    grad = torch.stack([dh, -dh], 1)                                             # dh/dpi_w = 1, dh/dpi_l = -1
    # RPO's extra term pulls up the chosen answer's log-prob, per token, so long answers do not
    # dominate it.
    if nll_weight:
        per_token = nll_weight / chosen_len[pairs].to(policy.dtype)              # [p] d(alpha NLL_w)/d(-pi_w)
        loss = loss - per_token * policy[:, 0]
        grad[:, 0] -= per_token
    return loss, grad


def fused_dpo_loss(hidden, weight, targets, seq, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0,
                   loss_type="sigmoid", reduction="mean", temperature=1.0, chunk=None, nll_weight=0.0):
    """The mean (reduction="sum": the sum) over P pairs of dpo_loss (sigmoid, cDPO via
    label_smoothing, IPO; Eq. 9 for STaR-DPO) straight from the hidden states, never holding the
    logits, gradients computed in forward from dpo_loss_and_grad (kernels.fused_pair_loss).

    Args:
        hidden [N, H], weight [V, H], targets [N], seq [N], temperature, chunk: as
            kernels.fused_pair_loss (2i on pair i's chosen rows, 2i + 1 on its rejected rows).
        ref_chosen, ref_rejected: [P] the reference's sequence log-probs (sums; per-token averages
            for ipo, whose policy log-probs are averages too).
        nll_weight: alpha of RPO's NLL term on the chosen answers (0: plain DPO).
    Returns:
        (loss, policy_chosen [P], policy_rejected [P]), the log-probs detached.
    """
    P = len(ref_chosen)
    if P == 0:
        raise ValueError("fused_dpo_loss: no pairs (ref_chosen is empty)")
    if ref_rejected.shape != (P,):
        raise ValueError(f"fused_dpo_loss: ref shapes {tuple(ref_chosen.shape)}/{tuple(ref_rejected.shape)} "
                         "disagree")
    ref = torch.stack([ref_chosen, ref_rejected], 1)                             # [P, 2]
    # The NLL term is per token, so it needs each chosen answer's length; IPO's log-probs are
    # already per-token means, so its lengths are 1.
    if loss_type == "ipo":
        chosen_len = torch.ones(P, device=hidden.device)                         # pi_w is a mean already
    else:
        chosen_len = torch.bincount(seq, minlength=2 * P)[0::2].to(hidden.device)  # [P] tokens of each chosen
    # The kernel sums log-probs per sequence, then asks this pair loss for the loss and its
    # gradient in those sums, which it turns into the gradient of every token's logit.
    pair_loss = partial(_dpo_pair_loss, ref, float(beta), float(label_smoothing), loss_type,
                        float(nll_weight), chosen_len)
    return fused_pair_loss(hidden, weight, targets, seq, P, pair_loss, average=loss_type == "ipo",
                           reduction=reduction, temperature=temperature, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# one micro-batch of each objective -> (loss sum, correct or None)

def step_sft(model, batch, pad_id):
    """Token NLL over the completions (SFT, Eq. 4 on kept rationales, Eq. 8), summed over the
    batch's completion tokens; the trainer divides by the step's token count (Example.loss_terms), so the
    mean is over every loss token of the optimizer step (TRL's SFT averages per micro-batch instead,
    OpenRLHF's per sequence then per batch). Fused: kernels.fused_logprob_sum never holds the
    logits."""
    # Prompt and completion in one padded row each; the mask marks the completion tokens, the only
    # ones that pay a loss.
    idx, valid, mask = prompt_completion_batch([(e.prompt, e.completion) for e in batch], pad_id)
    dev = model.lm_head.weight.device
    logp_sum = completion_logprob_sum(model, idx.to(dev), valid.to(dev), mask.to(dev))
    return -logp_sum, None                                  # sum_t -log pi(y_t | x, y_<t) * mask_t


def step_genrm(model, batch, pad_id):
    """Eq. 7 on the indicator token, -log pi(I | x, y1, y2) summed over the batch; correct =
    P(correct letter) > P(other letter)."""
    dev = model.lm_head.weight.device
    idx, valid = pad([e.prompt for e in batch], pad_id)
    h = model.hidden(idx.to(dev), valid=valid.to(dev))                           # [B, T, H]
    # Only the prompt's last position predicts the verdict letter, so only its hidden state is kept.
    ends = torch.tensor([len(e.prompt) - 1 for e in batch], device=dev)         # [B] each prompt's last token
    last = h[torch.arange(len(batch), device=dev), ends]                         # [B, H]
    tgt = torch.tensor([e.completion[0] for e in batch], device=dev)             # [B] the correct letter
    oth = torch.tensor([e.other for e in batch], device=dev)                     # [B] the other one
    # Accuracy compares the two letters' logits; the softmax over the rest of the vocabulary
    # cannot change which is larger.
    with torch.no_grad():
        w = model.lm_head.weight
        correct = ((last * w[tgt]).sum(-1) > (last * w[oth]).sum(-1)).sum()
    return -fused_logprob_sum(last, model.lm_head.weight, tgt), correct


def step_dpo(model, batch, pad_id, *, beta, label_smoothing, loss_type, nll_weight=0.0):
    """A DPO step (Eq. 9 for STaR-DPO; losses.dpo_loss's kinds) against the cached reference
    log-probs: one packed [prompt | chosen | rejected] pass (each prompt computed once) into
    kernels.fused_dpo_loss, which never holds the logits. Returns the sum of the pairs' losses and
    correct = the number of pairs with implicit reward margin h > 0."""
    key = "avg" if loss_type == "ipo" else "sum"
    # Chosen and rejected share their prompt: the prompt is run once and both answers attend to it.
    h, pk = packed_pair_hidden(model, batch, pad_id)                             # [B * T, H]
    rc = torch.tensor([e.ref[key][0] for e in batch], device=h.device)           # [B] reference, chosen
    rr = torch.tensor([e.ref[key][1] for e in batch], device=h.device)           # [B] reference, rejected
    # h[pk.src] picks the positions that predict a completion token, chosen and rejected alike.
    loss, pc, pr = fused_dpo_loss(h[pk.src], model.lm_head.weight, pk.tgt, pk.seq, rc, rr, beta=beta,
                                  label_smoothing=label_smoothing, loss_type=loss_type, reduction="sum",
                                  nll_weight=nll_weight)
    return loss, (dpo_margin(pc, pr, rc, rr) > 0).sum()


def make_step_dpo(beta, label_smoothing, loss_type, nll_weight=0.0):
    """step_dpo with its DPO settings bound: a step function for fit."""
    return partial(step_dpo, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                   nll_weight=nll_weight)


def step_bt(model, batch, pad_id):
    """Eq. 2 on the scalar head's rewards, summed over the pairs; correct = r_w > r_l."""
    rc, rr = pair_rewards(model, batch, pad_id)
    return bt_loss(rc, rr).sum(), (rc > rr).sum()


# ----------------------------------------------------------------------------------------------
# DPO's reference log-probs, computed once

def _reference_logps_of(ref, pad_id, batch_size, dtype, progress, examples):
    """Reference log-probs of `examples` (this rank's share, dist.shard_map), batch by batch:
    {"sum": (chosen, rejected), "avg": (...)} per pair."""
    device_type = ref.lm_head.weight.device.type
    bf16 = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    out = []
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        b = examples[s:s + batch_size]
        # Under bf16 autocast when training runs in bf16, so the policy starts equal to its reference.
        with bf16:
            c, r = (x.cpu() for x in pair_logps(ref, b, pad_id))                 # [len(b)] each
        out += [{"sum": (float(c[i]), float(r[i])),
                 "avg": (float(c[i]) / len(e.completion), float(r[i]) / len(e.rejected))}
                for i, e in enumerate(b)]
    return out


def _compute_reference(ref_path, examples, pad_id, batch_size, dtype, device, progress, key_hash):
    """Every pair's reference log-probs, spread over the ranks; the reference model is freed on return."""
    ref = Llama.from_pretrained(ref_path, dtype=torch.float32, device=device).eval()
    logps = dist.shard_map(partial(_reference_logps_of, ref, pad_id, batch_size, dtype, progress), examples)
    return {"hash": key_hash, "ref": logps}


def _save_torch(path, obj):
    """torch.save, atomically."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def add_reference_logps(ref_path, examples, pad_id, cache_file, batch_size, dtype, device, progress=True):
    """Reference log-probs of every DPO pair, computed once with the reference model (one packed
    pass per batch, each prompt once: kernels.pair_logps), cached on disk (keyed by a hash of the
    reference, precision and token ids) and attached to the examples; the reference model is freed
    before training starts. dtype torch.bfloat16: float32 weights under bf16 autocast, the
    precision training runs in (fit), so the policy equals the reference at the first step (h = 0
    up to rounding) rather than differing by bf16 noise; torch.float32: exact."""
    # The cache is keyed by everything its numbers depend on: the reference, its precision, the tokens.
    key = [str(ref_path), str(dtype)] + [[e.prompt, e.completion, e.rejected] for e in examples]
    key_hash = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    cache_file = Path(cache_file)
    if cache_file.exists():
        saved = torch.load(cache_file)
        if saved["hash"] == key_hash:
            for e, v in zip(examples, saved["ref"]):
                e.ref = v
            return
        if dist.rank() == 0:
            cache_file.unlink()  # another dataset's or reference's cache: recompute
        dist.barrier()
    # One rank computes (over every rank's share) and writes the cache; the others wait and read it.
    compute = partial(_compute_reference, ref_path, examples, pad_id, batch_size, dtype, device, progress,
                      key_hash)
    saved = dist.once(cache_file, compute, _save_torch, torch.load)
    for e, v in zip(examples, saved["ref"]):
        e.ref = v
