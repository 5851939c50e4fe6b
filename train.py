"""Every objective of the paper as a plain training loop, and the STaR driver's entry point.

  sft           token-mean NLL over response tokens
  bt_rm         Bradley-Terry reward model, Eq. 2 (scalar head on the last real token)
  genrm         GenRM without CoT, Eq. 7: -log pi(I | x, y1, y2) on the indicator token (Fig. 8)
  rationalizer  STaR-Rationalizer, Eq. 8: NLL over rationale + verdict, rationales from Fig. 7
  dpo           DPO (sigmoid / cDPO / IPO) on any prompt/chosen/rejected JSONL
  star_sft      STaR-SFT: iterate sample -> keep correct rationales -> SFT (Eq. 4 / 8)
  star_dpo      STaR-DPO: iterate sample -> pair correct with incorrect rationales -> DPO (Eq. 9)

`python3 train.py --method star_dpo` runs on the bundled default (SmolLM2-135M-Instruct and a small
preference set in assets/data) and prints the judge's held-out accuracy before and after.
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dist
import genrm
from data import LoadStats, load_pairs, load_tokenizer, prompt_completion_batch, read_jsonl, write_jsonl, pad
from model import DEFAULT_MODEL, Llama, atomic_write, completion_logprob_sum, fused_logprob_sum, sequence_logprobs

HERE = Path(__file__).resolve().parent
DEFAULT_TRAIN = HERE / "assets" / "data" / "train_small.jsonl"
DEFAULT_HELDOUT = HERE / "assets" / "data" / "heldout_small.jsonl"
METHODS = ("sft", "bt_rm", "genrm", "rationalizer", "dpo", "star_sft", "star_dpo")


# ----------------------------------------------------------------------------------------------
# losses (per example; the objective is their mean over the whole batch)

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


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0, kind="sigmoid"):
    """Per-pair DPO losses (STaR-DPO is Eq. 9); the objective is their mean over pairs.

    h = (pi_w - ref_w) - (pi_l - ref_l), with pi/ref the sequence log-probs of the completions.
      sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing,
               cDPO; eps = 0 is plain DPO). Same as TRL `loss_type="sigmoid"` and OpenRLHF DPOLoss.
      ipo:     (h - 1 / (2 beta))^2 where the caller passes per-token *averaged* log-probs, as TRL
               does for IPO (OpenRLHF applies the same formula to summed log-probs: pass sums there).
    Sequence log-probs are sums over completion tokens (DPO) in float32."""
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss kind {kind!r} (sigmoid or ipo)")


# ----------------------------------------------------------------------------------------------
# examples: token ids for each objective

def completion_ids(tok, text):
    return tok.encode(text) + [tok.eot_id]


def check_len(examples, max_len, stats, what):
    """Drop examples longer than max_len tokens, counted in stats (never silently truncated)."""
    keep = []
    for e in examples:
        if max(len(x) for x in e["lens"]) > max_len:
            stats.skip(f"over-long {what} (> {max_len} tokens)")
        else:
            keep.append(e)
    stats.kept = len(keep)
    return keep


def sft_examples(tok, rows, max_len, stats):
    """rows: {"messages", "completion"} or {"prompt", "completion"} or pairs (trained on chosen)."""
    ex = []
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        text = r["completion"] if "completion" in r else r["chosen"]
        p, c = tok.apply_chat(msgs), completion_ids(tok, text)
        ex.append({"p": p, "c": c, "n": len(c), "lens": [p + c]})
    return check_len(ex, max_len, stats, "example")


def genrm_examples(tok, pairs, max_len, stats, seed):
    """Eq. 7: the no-CoT prompt (Fig. 8) in a seeded random A/B order, target the letter token."""
    ex = []
    for p, o in zip(pairs, genrm.seeded_orders(pairs, seed)):
        pr = tok.apply_chat(genrm.judge_messages(p, o, "genrm"))
        ex.append({"p": pr, "c": [tok.token_id(genrm.label(o))], "other": tok.token_id(genrm.label(not o)),
                   "n": 1, "lens": [pr + [0]]})
    return check_len(ex, max_len, stats, "example")


def pair_examples(tok, rows, max_len, stats):
    """DPO / BT: rows (dicts or Pair) with "messages" or "prompt", "chosen", "rejected"."""
    ex = []
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        p = tok.apply_chat(r.get("messages") or [{"role": "user", "content": r["prompt"]}])
        c, j = completion_ids(tok, r["chosen"]), completion_ids(tok, r["rejected"])
        ex.append({"p": p, "c": c, "r": j, "n": 1, "lens": [p + c, p + j]})
    return check_len(ex, max_len, stats, "pair")


# ----------------------------------------------------------------------------------------------
# one micro-batch of each objective -> (loss sum, count, correct)

def step_sft(model, batch, pad_id):
    idx, valid, mask = prompt_completion_batch([(e["p"], e["c"]) for e in batch], pad_id)
    dev = model.lm_head.weight.device
    return -completion_logprob_sum(model, idx.to(dev), valid.to(dev), mask.to(dev)), None


def step_genrm(model, batch, pad_id):
    """Eq. 7 on the indicator token; accuracy = P(correct letter) > P(other letter)."""
    dev = model.lm_head.weight.device
    idx, valid = pad([e["p"] for e in batch], pad_id)
    h = model.hidden(idx.to(dev), valid=valid.to(dev))
    last = h[torch.arange(len(batch), device=dev), torch.tensor([len(e["p"]) - 1 for e in batch], device=dev)]
    tgt = torch.tensor([e["c"][0] for e in batch], device=dev)
    oth = torch.tensor([e["other"] for e in batch], device=dev)
    with torch.no_grad():
        w = model.lm_head.weight
        correct = ((last * w[tgt]).sum(-1) > (last * w[oth]).sum(-1)).sum()
    return -fused_logprob_sum(last, model.lm_head.weight, tgt), correct


def pair_logps(model, batch, pad_id, average=False):
    """Summed (or per-token averaged) completion log-probs of chosen and rejected [B] each."""
    dev = model.lm_head.weight.device
    ex = [(e["p"], e["c"]) for e in batch] + [(e["p"], e["r"]) for e in batch]
    idx, valid, mask = prompt_completion_batch(ex, pad_id)
    lp = sequence_logprobs(model, idx.to(dev), valid.to(dev), mask.to(dev)).sum(-1)
    if average:
        lp = lp / mask.sum(-1).to(dev)
    return lp[:len(batch)], lp[len(batch):]


def make_step_dpo(beta, label_smoothing, kind):
    def step_dpo(model, batch, pad_id):
        pc, pr = pair_logps(model, batch, pad_id, average=kind == "ipo")
        key = "avg" if kind == "ipo" else "sum"
        rc = torch.tensor([e["ref"][key][0] for e in batch], device=pc.device)
        rr = torch.tensor([e["ref"][key][1] for e in batch], device=pc.device)
        losses = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, kind=kind)
        correct = (((pc - rc) - (pr - rr)) > 0).sum()
        return losses.sum(), correct
    return step_dpo


def step_bt(model, batch, pad_id):
    dev = model.lm_head.weight.device
    idx, valid = pad([e["p"] + e["c"] for e in batch] + [e["p"] + e["r"] for e in batch], pad_id)
    r = model.reward(idx.to(dev), valid.to(dev))
    rc, rr = r[:len(batch)], r[len(batch):]
    return bt_loss(rc, rr).sum(), (rc > rr).sum()


@torch.no_grad()
def add_reference_logps(ref_path, examples, pad_id, cache_file, batch_size, dtype, device, progress=True):
    """Reference log-probs of every DPO pair, computed once with the reference model, cached on
    disk (keyed by a hash of the token ids) and attached to the examples; the reference model is
    freed before training starts."""
    h = hashlib.sha256(json.dumps([str(ref_path)] + [[e["p"], e["c"], e["r"]] for e in examples]).encode()).hexdigest()
    cache_file = Path(cache_file)
    if cache_file.exists():
        saved = torch.load(cache_file)
        if saved["hash"] == h:
            for e, v in zip(examples, saved["ref"]):
                e["ref"] = v
            return
    ref = Llama.from_pretrained(ref_path, dtype=dtype, device=device).eval()

    def compute(exs):  # this rank's share of the pairs (dist.shard_map)
        out = []
        for s in tqdm(range(0, len(exs), batch_size), desc="reference log-probs", disable=not progress, leave=False):
            b = exs[s:s + batch_size]
            c, r = (x.cpu() for x in pair_logps(ref, b, pad_id))
            out += [{"sum": (float(c[i]), float(r[i])),
                     "avg": (float(c[i]) / len(e["c"]), float(r[i]) / len(e["r"]))} for i, e in enumerate(b)]
        return out
    out = dist.shard_map(compute, examples)  # the reference model is freed when this returns
    for e, v in zip(examples, out):
        e["ref"] = v
    if dist.rank() == 0:
        atomic_write(cache_file, lambda f: torch.save({"hash": h, "ref": out}, f))
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# the loop

@dataclass
class TrainConfig:
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    warmup: float = 0.1        # fraction of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0        # steps; 0 = only at the end
    max_steps: int | None = None  # stop early (a kill for the resume test); the schedule is unchanged
    progress: bool = True


def micro_batches(n, cfg: TrainConfig):
    """Index lists for every micro-batch of every epoch (seeded shuffle per epoch)."""
    mbs = []
    for ep in range(cfg.epochs):
        order = list(range(n))
        random.Random(cfg.seed * 1000 + ep).shuffle(order)
        mbs += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return mbs


def lr_lambda(total, warmup_steps):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        prog = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


def save_checkpoint(out_dir, model, opt, sched, step):
    """Checkpoint dir ckpt-{step}/ (HF model + optimizer/scheduler/RNG/position), then the `latest`
    pointer is replaced atomically; a crash mid-write leaves the previous checkpoint current."""
    sd, ost = dist.full_state_dict(model), dist.optimizer_state(model, opt)  # collective under FSDP
    if dist.rank() == 0:
        d = Path(out_dir) / f"ckpt-{step:06d}"
        tmp = Path(out_dir) / f".ckpt-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        torch.save({"opt": ost, "sched": sched.state_dict(), "step": step, "rng": torch.get_rng_state()},
                   tmp / "state.pt")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        atomic_write(Path(out_dir) / "latest", lambda f: Path(f).write_text(d.name))
        for old in sorted(Path(out_dir).glob("ckpt-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_model(model, path, tok=None):
    """The trained model as an HF-format directory (with the tokenizer), written by rank 0 from
    the full state dict."""
    sd = dist.full_state_dict(model)
    if dist.rank() == 0:
        model.save_pretrained(path, state_dict=sd)
        if tok is not None:
            tok.save(path)
    dist.barrier()


def accumulate_gradients(model, group, step_fn, pad_id, autocast=None):
    """Backward over the micro-batches of one optimizer step. Every example carries its loss count
    "n" (loss tokens, or 1 per pair), and each micro-batch's loss sum is divided by the whole
    step's count: the step's loss is a mean over all its tokens/pairs, whatever batch_size,
    grad_accum and the number of ranks are. Under torchrun each rank takes every world-th example
    of each micro-batch; FSDP averages gradients over ranks, so the loss is scaled by the world
    size to keep the global mean. Returns (loss, accuracy or None)."""
    denom = float(sum(e["n"] for b in group for e in b))
    W = dist.world()
    tot_loss, tot_c, has_acc = 0.0, 0.0, False
    for batch in group:
        with autocast or torch.autocast("cpu", enabled=False):
            s, c = step_fn(model, batch[dist.rank()::W], pad_id)
        (s * (W / denom)).backward()
        tot_loss += float(s.detach())
        if c is not None:
            tot_c, has_acc = tot_c + float(c), True
    acc = dist.all_sum(tot_c) / sum(len(b) for b in group) if has_acc else None
    return dist.all_sum(tot_loss) / denom, acc


def fit(model, examples, step_fn, cfg: TrainConfig, out_dir, pad_id, log=print):
    """AdamW, linear warmup then cosine, gradient accumulation, clipping; resumes from
    out_dir/latest if present. Loss per step = sum of micro-batch loss sums / their total count.
    Writes metrics.jsonl and checkpoints; returns the list of step metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % dist.world():
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {dist.world()} ranks")
    mbs = micro_batches(len(examples), cfg)
    total = math.ceil(len(mbs) / cfg.grad_accum)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, round(cfg.warmup * total))))
    start = 0
    latest = out_dir / "latest"
    metrics_f = out_dir / "metrics.jsonl"
    history = []
    if latest.exists():
        ck = out_dir / latest.read_text().strip()
        state = torch.load(ck / "state.pt", weights_only=False)
        loaded = Llama.from_pretrained(ck, dtype=torch.float32)
        dist.load_full_state_dict(model, loaded.state_dict())
        dist.load_optimizer_state(model, opt, state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        if metrics_f.exists():
            history = [r for _, r in read_jsonl(metrics_f) if r["step"] <= start]
        log(f"resumed from {ck} at step {start}/{total}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.lm_head.weight.is_cuda else torch.autocast("cpu", enabled=False)
    end = total if cfg.max_steps is None else min(total, cfg.max_steps)
    bar = tqdm(range(start, end), desc="train", disable=not cfg.progress or dist.rank() > 0, initial=start, total=total)
    model.train()
    for step in bar:
        group = [[examples[i] for i in b] for b in mbs[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]]
        loss, acc = accumulate_gradients(model, group, step_fn, pad_id, autocast)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {step}; last good checkpoint: "
                                     f"{(out_dir / latest.read_text().strip()) if latest.exists() else 'none'}")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # DTensor under FSDP
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
               "examples": sum(len(b) for b in group)}
        if acc is not None:
            row["acc"] = acc
        history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", **({"acc": f"{row['acc']:.2f}"} if "acc" in row else {}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
            if dist.rank() == 0:
                write_jsonl(metrics_f, history)
            save_checkpoint(out_dir, model, opt, sched, step + 1)
    if dist.rank() == 0:
        write_jsonl(metrics_f, history)
    if end > start:
        save_checkpoint(out_dir, model, opt, sched, end)
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# methods

LR = {"sft": 1e-5, "bt_rm": 1e-5, "genrm": 1e-5, "rationalizer": 1e-5, "dpo": 5e-6, "star_sft": 1e-5, "star_dpo": 5e-6}


def train_cfg(a, seed=None) -> TrainConfig:
    return TrainConfig(lr=a.lr or LR[a.method], epochs=a.epochs, batch_size=a.batch_size, grad_accum=a.grad_accum,
                       warmup=a.warmup, weight_decay=a.weight_decay, clip=a.clip, seed=a.seed if seed is None else seed,
                       save_every=a.save_every, max_steps=a.max_steps, progress=not a.no_progress)


def load_model(a, path, score_head=None):
    """float32 parameters (on CUDA, bf16 compute comes from autocast) unless --dtype bfloat16."""
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    return Llama.from_pretrained(path, dtype=dtype, device=a.device, score_head=score_head)


def train_on(a, model_path, rows, out_dir, kind, tok, ref_path=None, seed=None):
    """Train `model_path` on rows with one objective; the result goes to out_dir/model."""
    out_dir = Path(out_dir)
    st = LoadStats(read=len(rows))
    if kind in ("sft", "star_sft", "rationalizer"):
        ex, step = sft_examples(tok, rows, a.max_len, st), step_sft
    elif kind == "genrm":
        ex, step = genrm_examples(tok, rows, a.max_len, st, a.seed), step_genrm
    elif kind == "bt_rm":
        ex, step = pair_examples(tok, rows, a.max_len, st), step_bt
    else:  # dpo, star_dpo
        ex = pair_examples(tok, rows, a.max_len, st)
        step = make_step_dpo(a.beta, a.label_smoothing, a.loss)
    if dist.rank() == 0:
        print(f"{kind}: {st}")
    if not ex:
        raise SystemExit(f"{kind}: no training examples left ({st})")
    if kind in ("dpo", "star_dpo"):
        dtype = torch.float32
        add_reference_logps(ref_path, ex, tok.pad_id, out_dir / "ref_logps.pt", a.batch_size, dtype, a.device,
                            progress=not a.no_progress)
    model = dist.shard(load_model(a, model_path, score_head=True if kind == "bt_rm" else None))
    hist = fit(model, ex, step, train_cfg(a, seed), out_dir / "train", tok.pad_id)
    if a.max_steps is not None and len(hist) < math.ceil(len(micro_batches(len(ex), train_cfg(a, seed))) / a.grad_accum):
        raise SystemExit(f"stopped at --max-steps {a.max_steps}; run again with --resume to finish")
    save_model(model, out_dir / "model", tok)
    return hist


def judge_report(a, model_path, pairs, tok, title):
    """The judge's held-out accuracy (CoT, forced verdicts counted) beside the length baseline."""
    from eval import judge_pairs, summarize
    model = load_model(a, model_path).eval()
    recs = judge_pairs(model, tok, pairs, "cot", samples=a.eval_samples, both_orders=True, batch_size=16,
                       max_new_tokens=a.max_new_tokens, seed=a.seed, progress=not a.no_progress)
    s = summarize(pairs, recs)
    al = s["per_category"]["all"]
    if dist.rank() == 0:
        print(f"[{title}] held-out judge accuracy (CoT, maj@{a.eval_samples}, both orders, n={len(pairs)}): "
              f"{al['maj@N']:.3f}  | length baseline {al['longer']:.3f}  | forced verdicts "
              f"{s.get('forced_rate', 0):.2f}, parse failures {s.get('parse_failure_rate', 0):.2f}")
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, default="star_dpo", help="objective (see above); default star_dpo")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF-format directory or 'smollm2-135m-instruct' (default)")
    ap.add_argument("--data", default=str(DEFAULT_TRAIN), help="training JSONL (pairs; for sft also "
                    "{messages|prompt, completion}); default: the bundled small set")
    ap.add_argument("--eval-data", default=str(DEFAULT_HELDOUT), help="held-out pairs for before/after accuracy")
    ap.add_argument("--limit", type=int, default=None, help="seeded subset of the training pairs")
    ap.add_argument("--eval-limit", type=int, default=None, help="seeded subset of the held-out pairs")
    ap.add_argument("--no-eval", action="store_true", help="skip the before/after judge evaluation")
    ap.add_argument("--out", default=None, help="run directory (default runs/<method>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    # optimisation
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method: "
                    + ", ".join(f"{k} {v:g}" for k, v in LR.items()) + ")")
    ap.add_argument("--epochs", type=int, default=1, help="epochs over each (STaR: each iteration's) data")
    ap.add_argument("--batch-size", type=int, default=2, help="examples (pairs) per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=float, default=0.1, help="linear warmup, fraction of steps; then cosine")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--max-len", type=int, default=1024, help="longer examples are skipped and counted")
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps (resume later)")
    # DPO
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta (Eq. 9)")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO epsilon")
    ap.add_argument("--loss", choices=("sigmoid", "ipo"), default="sigmoid", help="DPO loss: sigmoid (DPO/cDPO) or ipo")
    # STaR
    ap.add_argument("--iterations", type=int, default=3, help="STaR iterations = disjoint splits (paper: 3)")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="rationales sampled per pair and iteration")
    ap.add_argument("--pairs-per-prompt", type=int, default=1, help="STaR-DPO (correct, incorrect) pairs per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="rationale length cap when sampling")
    ap.add_argument("--rationalize", action="store_true", help="STaR-SFT: add Fig. 7 rationales for pairs the model got wrong")
    ap.add_argument("--ref-from-previous", action="store_true", help="STaR-DPO reference = previous iteration's model (default: base)")
    ap.add_argument("--eval-samples", type=int, default=1, help="CoT samples per held-out judgement (maj@N)")
    # runtime
    ap.add_argument("--seed", type=int, default=0, help="seed for splits, A/B orders, sampling and data order")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter dtype; on CUDA float32 parameters train under bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out or f"runs/{a.method}")
    if out.exists() and any(out.iterdir()) and not a.resume:
        raise SystemExit(f"{out} exists and is not empty: pass --resume to continue it or --out for a new run")
    rank, world = dist.init()  # torchrun: FSDP2 training, data-parallel sampling and eval
    dist.barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(a), indent=2))
        print(f"run directory: {out}" + (f"  ({world} ranks)" if world > 1 else ""))
    else:
        a.no_progress = True
    dist.barrier()
    t0 = time.time()
    tok = load_tokenizer(a.model)
    st = LoadStats()
    if a.method == "sft" and "completion" in next(read_jsonl(a.data))[1]:
        pairs = rows = [r for _, r in read_jsonl(a.data)]           # {messages|prompt, completion}
        print(f"{a.data}: {len(rows)} rows")
    else:
        pairs = rows = load_pairs(a.data, limit=a.limit, seed=a.seed, stats=st)
        print(f"{a.data}: {st}")
    heldout = None
    report = {"method": a.method, "run_dir": str(out)}
    if not a.no_eval and a.method != "bt_rm":
        heldout = load_pairs(a.eval_data, limit=a.eval_limit, seed=a.seed)
        before = out / "eval_before.json"
        if not before.exists():
            s = judge_report(a, a.model, heldout, tok, "before")
            if rank == 0:
                atomic_write(before, lambda f: Path(f).write_text(json.dumps(s)))
            dist.barrier()
        report["before"] = json.loads(before.read_text())

    if a.method in ("star_sft", "star_dpo"):
        # the whole algorithm: split -> (sample -> filter or pair -> train) per iteration
        final, reports = genrm.star_driver(
            out, pairs, method=a.method, iterations=a.iterations, base_model=a.model, tok=tok,
            n=a.samples_per_prompt, max_new_tokens=a.max_new_tokens, seed=a.seed,
            pairs_per_prompt=a.pairs_per_prompt, rationalize_failures=a.rationalize,
            ref_from_previous=a.ref_from_previous, progress=not a.no_progress,
            load_fn=lambda p: load_model(a, p).eval(),
            train_fn=lambda src, rows, ref, d: train_on(a, src, rows, d, a.method, tok, ref_path=ref),
            log=print if rank == 0 else (lambda *_: None))
        report["star"] = reports
    elif a.method == "rationalizer":
        # Eq. 8: rationales written by the base model given the correct answer (Fig. 7), then SFT
        rat_f = out / "rationales.jsonl"
        if not rat_f.exists():
            m = load_model(a, a.model).eval()
            rows = genrm.rationalize(m, tok, pairs, genrm.seeded_orders(pairs, a.seed), max_new_tokens=a.max_new_tokens,
                                     seed=a.seed, progress=not a.no_progress)
            if rank == 0:
                write_jsonl(rat_f, rows)
            dist.barrier()
            del m
        train_on(a, a.model, genrm.load_rows(rat_f, genrm.SCHEMAS["sft"]), out, "rationalizer", tok)
        final = str(out / "model")
    else:
        train_on(a, a.model, rows, out, a.method, tok, ref_path=a.model)
        final = str(out / "model")

    if heldout is not None:
        report["after"] = judge_report(a, final, heldout, tok, "after")
    report.update(final_model=final, seconds=round(time.time() - t0, 1))
    if rank == 0:
        atomic_write(out / "report.json", lambda f: Path(f).write_text(json.dumps(report, indent=2)))
        print(f"final model: {final}\nreport: {out / 'report.json'}\nrun directory: {out}  ({report['seconds']} s)")
    dist.finish()
    return report


if __name__ == "__main__":
    main()
