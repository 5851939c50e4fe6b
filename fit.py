"""The training loop every objective shares: AdamW, linear warmup then cosine, gradient
accumulation with a global mean over each optimizer step, clipping, metrics.jsonl, and
checkpoints that a killed run resumes from (HF-format model + optimizer, scheduler, RNG, step).
Works the same in one process and under torchrun with FSDP2 (dist.py).
"""
import math
import os
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import dist
from files import read_jsonl, require, write_jsonl, write_text
from model import Llama


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
    bf16: bool = False         # bf16 autocast (forward and backward) on float32 master weights and optimizer


def micro_batches(n, cfg: TrainConfig):
    """Index lists for every micro-batch of every epoch (seeded shuffle per epoch)."""
    mbs = []
    for ep in range(cfg.epochs):
        order = list(range(n))
        random.Random(cfg.seed * 1000 + ep).shuffle(order)
        mbs += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return mbs


def warmup_cosine(step, total, warmup_steps):
    """The learning-rate factor of optimizer step `step` (0-based) of `total`: linear warmup to 1
    over warmup_steps, then a cosine to 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    prog = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def save_checkpoint(out_dir, model, opt, sched, step):
    """Checkpoint dir ckpt-{step}/ (HF model + optimizer/scheduler/RNG/position), then the `latest`
    pointer is replaced atomically; a crash mid-write leaves the previous checkpoint current."""
    sd, ost = dist.full_state_dict(model), dist.optimizer_state(model, opt)  # collective under FSDP
    if dist.rank() == 0:
        d = Path(out_dir) / f"ckpt-{step:06d}"
        tmp = Path(out_dir) / f".ckpt-{step:06d}.tmp"
        # Written whole under a temporary name, then renamed: a reader never sees half a checkpoint.
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        torch.save({"opt": ost, "sched": sched.state_dict(), "step": step, "rng": torch.get_rng_state()},
                   tmp / "state.pt")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        # The pointer moves only once the checkpoint it names is complete.
        write_text(Path(out_dir) / "latest", d.name)
        for old in sorted(Path(out_dir).glob("ckpt-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _loadable_checkpoint(out_dir, log):
    """The checkpoint to resume from: the one `latest` names, else (or when it does not load) the
    newest ckpt-* whose state.pt and model both load; each one skipped is logged with the reason.
    Returns (dir, state, model) or None (no checkpoint: start at step 0)."""
    out_dir = Path(out_dir)
    cands = sorted(out_dir.glob("ckpt-*"), reverse=True)                    # newest first
    latest = out_dir / "latest"
    # The checkpoint `latest` names is tried first; the others follow, newest first.
    if latest.exists():
        name = latest.read_text(errors="replace").strip()
        if name.startswith("ckpt-") and out_dir / name in cands:
            cands.remove(out_dir / name)
            cands.insert(0, out_dir / name)
        else:
            log(f"skipped {latest}: it names no checkpoint ({name[:40]!r}); trying the newest ckpt-*")
    # The first one whose every file loads is the one resumed from.
    for ck in cands:
        try:
            state = torch.load(ck / "state.pt", weights_only=False)
            require(state, ("opt", "sched", "step", "rng"), str(ck / "state.pt"))
            return ck, state, Llama.from_pretrained(ck, dtype=torch.float32)
        except Exception as e:  # a torn checkpoint fails in torch.load, safetensors or JSON: try the previous
            log(f"skipped {ck}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if cands:
        log(f"no checkpoint in {out_dir} loads: starting at step 0")
    return None


def prune_checkpoints(out_dir):
    """After a stage has written its final model, its checkpoints (model plus optimizer state,
    about 3x the model's size each) can no longer be needed: delete them and `latest` (rank 0)."""
    out_dir = Path(out_dir)
    if dist.rank() == 0:
        (out_dir / "latest").unlink(missing_ok=True)  # first, so a kill mid-prune leaves no dangling pointer
        for d in [*out_dir.glob("ckpt-*"), *out_dir.glob(".ckpt-*.tmp")]:
            shutil.rmtree(d)
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


def resume(out_dir, model, opt, sched, total, log=print):
    """Restore the newest checkpoint in out_dir that loads (_loadable_checkpoint; a torn or
    unreadable one is skipped with a message): the weights, the optimizer, the schedule and the RNG.
    Returns (its step, the metrics rows written up to it), or (0, []) when there is none."""
    found = _loadable_checkpoint(out_dir, log)
    if found is None:
        return 0, []
    ck, state, loaded = found
    dist.load_full_state_dict(model, loaded.state_dict())
    dist.load_optimizer_state(model, opt, state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    start, metrics_f = state["step"], Path(out_dir) / "metrics.jsonl"
    history = [r for _, r in read_jsonl(metrics_f) if r["step"] <= start] if metrics_f.exists() else []
    log(f"resumed from {ck} at step {start}/{total}")
    return start, history


def accumulate_gradients(model, group, step_fn, pad_id, autocast=None):
    """Backward over the micro-batches `group` of one optimizer step: the one place where an
    objective becomes a mean. Every example carries its loss count `loss_terms` (loss tokens, or 1 per
    pair or verdict), every step_fn returns its micro-batch's loss *sum*, and each sum is divided
    by the whole step's count: the step's loss is the mean over all its tokens / pairs, whatever
    batch_size, grad_accum and the number of ranks are. Under torchrun each rank takes every
    world-th example of each micro-batch; FSDP averages gradients over ranks, so the loss is
    scaled by the world size to keep the global mean. Returns (loss, accuracy or None)."""
    denom = float(sum(e.loss_terms for b in group for e in b))  # the step's tokens or pairs
    W = dist.world()
    tot_loss, tot_c, has_acc = 0.0, 0.0, False
    for batch in group:
        # This rank's share of the micro-batch through the objective: a loss sum, a count correct.
        with autocast or torch.autocast("cpu", enabled=False):
            s, c = step_fn(model, batch[dist.rank()::W], pad_id)
        (s * (W / denom)).backward()                                          # the sum's share of the mean
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
    # The micro-batches of the whole run are fixed up front (seeded), so a resumed run continues
    # with exactly the batches the killed one would have seen.
    mbs = micro_batches(len(examples), cfg)
    total = math.ceil(len(mbs) / cfg.grad_accum)
    # AdamW over the trainable parameters, its learning rate following warmup then cosine per step.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup_steps = max(1, round(cfg.warmup * total))
    schedule = partial(warmup_cosine, total=total, warmup_steps=warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # Resume where a killed run stopped (or start at step 0).
    start, history = resume(out_dir, model, opt, sched, total, log)
    latest = out_dir / "latest"
    metrics_f = out_dir / "metrics.jsonl"
    autocast = torch.autocast(model.lm_head.weight.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    end = total if cfg.max_steps is None else min(total, cfg.max_steps)
    quiet = not cfg.progress or dist.rank() > 0
    bar = tqdm(range(start, end), desc="train", disable=quiet, initial=start, total=total)
    model.train()
    for step in bar:
        # Gradients of the step's mean loss over its grad_accum micro-batches, then one clipped update.
        group = [[examples[i] for i in b] for b in mbs[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]]
        loss, acc = accumulate_gradients(model, group, step_fn, pad_id, autocast)
        # A non-finite loss stops the run before the update could spoil the weights.
        if not math.isfinite(loss):
            good = out_dir / latest.read_text().strip() if latest.exists() else "none"
            raise FloatingPointError(f"non-finite loss {loss} at step {step}; last good checkpoint: {good}")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # DTensor under FSDP
        # One update, then the learning rate of the next step.
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
               "examples": sum(len(b) for b in group)}
        if acc is not None:
            row["acc"] = acc
        history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", **({"acc": f"{row['acc']:.2f}"} if "acc" in row else {}))
        # A checkpoint every save_every steps; the last one is written after the loop.
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
