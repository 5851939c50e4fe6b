"""The paper's objectives: each loss in closed form, and one micro-batch step of each objective
(a padded batch of `data.Example` through the model -> (loss sum, number correct)).

  nll_loss / step_sft     token NLL: SFT, STaR-SFT (Eq. 4), rationalizer (Eq. 8)
  step_genrm              GenRM without CoT, Eq. 7, on the indicator token
  bt_loss / step_bt       Bradley-Terry, Eq. 2
  dpo_loss / step_dpo     DPO, cDPO, IPO; STaR-DPO is Eq. 9
  add_reference_logps     DPO's reference log-probs, computed once and cached on disk

The trainer (fit.py) divides each micro-batch's loss sum by the count of the whole optimizer
step (`Example.n`), so every objective is a mean over all its tokens or pairs.
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dist
from data import pad, prompt_completion_batch
from files import atomic_write
from kernels import (completion_logprob_sum, fused_dpo_loss, fused_logprob_sum, packed_pair_hidden, pair_logps,
                     pair_rewards)
from model import Llama


def nll_loss(token_logps, mask):
    """SFT / GenRM (Eq. 7) / rationalization (Eq. 8): token-mean NLL over the masked tokens of the
    whole batch. Returns (sum of -log p over masked tokens, number of masked tokens): the trainer
    divides the sums of all micro-batches of one optimizer step by their total count, so the
    mean is over every loss token of the step (TRL's default SFT loss averages per micro-batch
    instead; OpenRLHF's SFT averages per sequence then per batch)."""
    m = mask.float()
    return -(token_logps * m).sum(), m.sum()


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry, Eq. 2: per-pair -log sigmoid(r_w - r_l); the objective is the mean over pairs
    (as in TRL's RewardTrainer without margin and OpenRLHF's PairWiseLoss)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0,
             loss_type="sigmoid"):
    """Per-pair DPO losses (STaR-DPO is Eq. 9); the objective is their mean over pairs.

    h = (pi_w - ref_w) - (pi_l - ref_l), with pi/ref the sequence log-probs of the completions.
      sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing,
               cDPO; eps = 0 is plain DPO). Same as TRL `loss_type="sigmoid"` and OpenRLHF DPOLoss.
      ipo:     (h - 1 / (2 beta))^2 where the caller passes per-token *averaged* log-probs, as TRL
               does for IPO (OpenRLHF applies the same formula to summed log-probs: pass sums there).
    Sequence log-probs are sums over completion tokens (DPO) in float32."""
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss kind {loss_type!r} (sigmoid or ipo)")


# ----------------------------------------------------------------------------------------------
# one micro-batch of each objective -> (loss sum, correct or None)

def step_sft(model, batch, pad_id):
    """Token NLL over the completions (SFT, Eq. 4 on kept rationales, Eq. 8)."""
    idx, valid, mask = prompt_completion_batch([(e.prompt, e.completion) for e in batch], pad_id)
    dev = model.lm_head.weight.device
    return -completion_logprob_sum(model, idx.to(dev), valid.to(dev), mask.to(dev)), None


def step_genrm(model, batch, pad_id):
    """Eq. 7 on the indicator token; accuracy = P(correct letter) > P(other letter)."""
    dev = model.lm_head.weight.device
    idx, valid = pad([e.prompt for e in batch], pad_id)
    h = model.hidden(idx.to(dev), valid=valid.to(dev))
    last = h[torch.arange(len(batch), device=dev), torch.tensor([len(e.prompt) - 1 for e in batch], device=dev)]
    tgt = torch.tensor([e.completion[0] for e in batch], device=dev)
    oth = torch.tensor([e.other for e in batch], device=dev)
    with torch.no_grad():
        w = model.lm_head.weight
        correct = ((last * w[tgt]).sum(-1) > (last * w[oth]).sum(-1)).sum()
    return -fused_logprob_sum(last, model.lm_head.weight, tgt), correct


def make_step_dpo(beta, label_smoothing, loss_type):
    """A DPO step (Eq. 9 for STaR-DPO; dpo_loss's kinds) against the cached reference log-probs:
    one packed [prompt | chosen | rejected] pass (each prompt computed once) into
    kernels.fused_dpo_loss, which never holds the logits; correct = the implicit reward margin
    h > 0."""
    key = "avg" if loss_type == "ipo" else "sum"

    def step_dpo(model, batch, pad_id):
        h, pk = packed_pair_hidden(model, batch, pad_id)                         # [B * T, H]
        rc = torch.tensor([e.ref[key][0] for e in batch], device=h.device)
        rr = torch.tensor([e.ref[key][1] for e in batch], device=h.device)
        loss, pc, pr = fused_dpo_loss(h[pk.src], model.lm_head.weight, pk.tgt, pk.seq, rc, rr, beta=beta,
                                      label_smoothing=label_smoothing, loss_type=loss_type)
        correct = (((pc - rc) - (pr - rr)) > 0).sum()
        return loss * len(batch), correct                                       # the sum over the pairs
    return step_dpo


def step_bt(model, batch, pad_id):
    """Eq. 2 on the scalar head's rewards; correct = r_w > r_l."""
    rc, rr = pair_rewards(model, batch, pad_id)
    return bt_loss(rc, rr).sum(), (rc > rr).sum()


@torch.no_grad()
def add_reference_logps(ref_path, examples, pad_id, cache_file, batch_size, dtype, device, progress=True):
    """Reference log-probs of every DPO pair, computed once with the reference model (one packed
    pass per batch, each prompt once: kernels.pair_logps), cached on disk (keyed by a hash of the
    reference, precision and token ids) and attached to the examples; the reference model is freed
    before training starts. dtype torch.bfloat16: float32 weights under bf16 autocast, the
    precision training runs in (fit), so the policy equals the reference at the first step (h = 0
    up to rounding) rather than differing by bf16 noise; torch.float32: exact."""
    key = [str(ref_path), str(dtype)] + [[e.prompt, e.completion, e.rejected] for e in examples]
    h = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    cache_file = Path(cache_file)
    if cache_file.exists():
        saved = torch.load(cache_file)
        if saved["hash"] == h:
            for e, v in zip(examples, saved["ref"]):
                e.ref = v
            return
        if dist.rank() == 0:
            cache_file.unlink()  # another dataset's or reference's cache: recompute
        dist.barrier()

    def compute():
        ref = Llama.from_pretrained(ref_path, dtype=torch.float32, device=device).eval()
        bf16 = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        def mine(exs):  # this rank's share of the pairs (dist.shard_map)
            out = []
            for s in tqdm(range(0, len(exs), batch_size), desc="reference log-probs", disable=not progress, leave=False):
                b = exs[s:s + batch_size]
                with bf16:
                    c, r = (x.cpu() for x in pair_logps(ref, b, pad_id))
                out += [{"sum": (float(c[i]), float(r[i])),
                         "avg": (float(c[i]) / len(e.completion), float(r[i]) / len(e.rejected))}
                        for i, e in enumerate(b)]
            return out
        return {"hash": h, "ref": dist.shard_map(mine, examples)}  # the reference model is freed on return
    saved = dist.once(cache_file, compute, lambda f, v: atomic_write(f, lambda t: torch.save(v, t)), torch.load)
    for e, v in zip(examples, saved["ref"]):
        e.ref = v
