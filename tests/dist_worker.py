"""Run by tests/test_dist.py under torchrun (2 CPU processes, gloo): one case per call."""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

import dist  # noqa: E402
import genrm  # noqa: E402
from conftest import CharTok  # noqa: E402
from data import LoadStats, Pair, pair_examples, sft_examples  # noqa: E402
from fit import TrainConfig, accumulate_gradients, fit, save_model  # noqa: E402
from losses import add_reference_logps, make_step_dpo, step_sft  # noqa: E402
from model import Llama  # noqa: E402


def examples(kind, tok, base, tmp):
    if kind == "sft":
        rows = [{"prompt": f"p{i}", "completion": "x" * (3 + 5 * i)} for i in range(4)]
        return sft_examples(tok, rows, 500, LoadStats()), step_sft
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": "no " * (i + 1)} for i in range(4)]
    ex = pair_examples(tok, rows, 500, LoadStats())
    add_reference_logps(base, ex, tok.pad_id, Path(tmp) / f"ref_{dist.world()}.pt", 1, torch.float32, "cpu",
                          progress=False)
    return ex, make_step_dpo(0.1, 0.0, "sigmoid")


def run_fit(kind, tmp, steps, out, save_every=0):
    """Train the tiny base model; the global batch is 4 examples per step whatever the world size."""
    tok, base = CharTok(), Path(tmp) / "base"
    ex, step = examples(kind, tok, base, tmp)
    model = dist.shard(Llama.from_pretrained(base))
    cfg = TrainConfig(lr=1e-3, batch_size=4, epochs=steps, save_every=save_every, progress=False)
    fit(model, ex, step, cfg, Path(out), tok.pad_id, log=lambda *_: None)
    save_model(model, Path(out) / "model")


def grads(kind, tmp, out, checkpointing=False):
    """The gradient of one optimizer step (2 micro-batches of 2), gathered in full on rank 0."""
    tok, base = CharTok(), Path(tmp) / "base"
    ex, step = examples(kind, tok, base, tmp)
    model = Llama.from_pretrained(base)
    model.checkpointing = checkpointing
    model = dist.shard(model)
    loss, _ = accumulate_gradients(model, [ex[:2], ex[2:]], step, tok.pad_id)
    g = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
         for n, p in model.named_parameters()}
    if dist.rank() == 0:
        torch.save({"loss": loss, "grads": g}, out)


def sample(tmp, out):
    pairs = [Pair(f"q{i}", f"question {i}", f"good {i}", f"bad {i}") for i in range(5)]
    m = Llama.from_pretrained(Path(tmp) / "base").eval()
    rows = genrm.sample_rationales(m, CharTok(), pairs, n=3, max_new_tokens=6, seed=7, progress=False)
    if dist.rank() == 0:
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    dist.init()
    case, tmp = sys.argv[1], sys.argv[2]
    if case in ("sft", "dpo"):
        run_fit(case, tmp, 1, Path(tmp) / f"{case}_{dist.world()}")
    elif case == "grad_dpo_ckpt":  # activation checkpointing inside FSDP2's blocks
        grads("dpo", tmp, Path(tmp) / f"{case}_{dist.world()}.pt", checkpointing=True)
    elif case.startswith("grad_"):
        grads(case[5:], tmp, Path(tmp) / f"{case}_{dist.world()}.pt")
    elif case == "ckpt":
        run_fit("sft", tmp, 2, Path(tmp) / "ckpt", save_every=1)
    elif case == "sample":
        sample(tmp, Path(tmp) / f"samples_{dist.world()}.json")
    dist.finish()
