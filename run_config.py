"""train.py's configuration: the RunConfig of a run, its per-method and small-world defaults, the
command line it is parsed from, and what a resume may change. Every option is a RunConfig field
and one add_argument, whose default is that field's (or the small world's)."""
import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import dist
from eval import HelpFormatter, number
from fit import TrainConfig
from gguf import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
DEFAULT_TRAIN = HERE / "assets" / "data" / "train_small.jsonl"
DEFAULT_HELDOUT = HERE / "assets" / "data" / "heldout_small.jsonl"
METHODS = ("sft", "bt_rm", "genrm", "rationalizer", "dpo", "star_sft", "star_dpo")
LR = {"sft": 1e-5, "bt_rm": 1e-5, "genrm": 1e-5, "rationalizer": 1e-5, "dpo": 5e-6, "star_sft": 1e-5,
      "star_dpo": 5e-6}

# The small world (world.py) is what a run is given when it names neither --model nor --data: its
# base judge, pretrained from scratch here (world_base), and its train / held-out splits. These
# defaults replace the real-data ones there: a 0.8M-parameter judge trained from scratch takes a
# learning rate a hundred times larger than a pretrained 135M model, and float32 costs it nothing.
WORLD_DEFAULTS = dict(dtype="float32", batch_size=16, max_len=256, max_new_tokens=96, samples_per_prompt=8,
                      pairs_per_prompt=3, dpo_nll=1.0, ref_from_previous=True, sample_batch=64, iterations=3,
                      epochs=2, warmup=0.1, save_every=50)
# STaR-DPO makes 300-800 pairs per iteration where STaR-SFT keeps 6,000-7,400 rationales: four
# epochs over them. At two, the job's gain on this project's two machine kinds was +0.205 (an AMD
# EPYC) and +0.050 (an Intel Xeon with AMX; its float32 kernels round differently, so its samples
# differ from the first iteration on); at four, +0.133 to +0.179 over three seeds on the Xeon
# (RESULTS.md, the STaR-DPO recipe search).
WORLD_METHOD_DEFAULTS = {"star_dpo": dict(epochs=4)}
WORLD_LR = {"sft": 5e-4, "bt_rm": 1e-3, "genrm": 1e-3, "rationalizer": 5e-4, "dpo": 1e-4, "star_sft": 5e-4,
            "star_dpo": 1e-4}
WORLD_PAIRS = {"train": 3000, "id": 400}  # training pairs (1,000 per STaR iteration), held-out pairs


@dataclass
class RunConfig:
    """Everything a run is told; built once in `main` from the command line, written to args.json."""
    method: str = "star_dpo"
    model: str = DEFAULT_MODEL
    data: str = str(DEFAULT_TRAIN)
    eval_data: str = str(DEFAULT_HELDOUT)
    limit: int | None = None
    eval_limit: int | None = None
    no_eval: bool = False
    out: str | None = None
    resume: bool = False
    # optimisation
    lr: float | None = None          # None: the method's default (LR)
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    warmup: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    max_len: int = 1024
    save_every: int = 10
    max_steps: int | None = None
    # DPO
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    # RPO: alpha times the chosen answer's per-token NLL added to each pair's loss.
    dpo_nll: float = 0.0
    # STaR
    iterations: int = 3
    samples_per_prompt: int = 4
    pairs_per_prompt: int = 1
    max_new_tokens: int = 64
    rationalize: bool = False
    star_filter: str = "label"       # "random": the control, as many rationales kept whatever their verdict
    ref_from_previous: bool = False
    star_both_orders: bool = False   # sample each pair in both A/B orders (pairs that hit the position bias)
    verdict_temperature: float = 1.0  # forced verdicts during STaR sampling drawn at this temperature
    eval_samples: int = 1
    sample_batch: int = 4            # prompts sampled together (their n rationales each share the batch)
    # runtime
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    # Training: bf16 autocast on float32 master weights (faster here); float32: exact.
    dtype: str = "bfloat16"
    threads: int | None = None
    activation_checkpointing: bool = False  # recompute each block in backward: activation memory / layers
    no_progress: bool = False
    keep_checkpoints: bool = False   # a finished stage keeps its ckpt-* (model + optimizer state) too
    world: bool = False              # the small world: set when neither --model nor --data is given

    @property
    def progress(self) -> bool:
        return not self.no_progress and dist.rank() == 0

    @property
    def learning_rate(self) -> float:
        """--lr, or the method's default (the small world's when the run is in it)."""
        return self.lr if self.lr is not None else (WORLD_LR if self.world else LR)[self.method]

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.learning_rate, epochs=self.epochs,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, warmup=self.warmup,
                           weight_decay=self.weight_decay, clip=self.clip, seed=self.seed,
                           save_every=self.save_every, max_steps=self.max_steps, progress=self.progress,
                           bf16=self.dtype == "bfloat16")


# RunConfig fields a resume may change: they do not change what the run computes
_RESUME_FREE = ("out", "resume", "device", "threads", "activation_checkpointing", "no_progress", "max_steps",
                "save_every", "keep_checkpoints")
_KEEPS = """\
what a run directory keeps: args.json (the arguments, written once the inputs are read), metrics.jsonl,
report.json, the STaR artefacts and each stage's final model (model/, or iter_{i}/model/ for STaR). While a
stage trains, its last two checkpoints train/ckpt-NNNNNN/ (model plus optimizer state, about 3x the model's
size each) let --resume continue it; they are deleted once the stage has written its model, unless
--keep-checkpoints."""


def parse_args(argv=None, description=None) -> RunConfig:
    """train.py's command line (description: its --help text) -> the RunConfig of the run."""
    args = sys.argv[1:] if argv is None else list(argv)
    in_world = not any(a.split("=")[0] in ("--model", "--data") for a in args)
    D = RunConfig(**WORLD_DEFAULTS, world=True) if in_world else RunConfig()
    if in_world:
        D = replace(D, **WORLD_METHOD_DEFAULTS.get(_method_asked(args) or D.method, {}))
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                 epilog=_KEEPS)
    ap.add_argument("--method", choices=(*METHODS, "online_dpo"), default=D.method,
                    help="objective (see above; online_dpo's options: --method online_dpo --help)")
    ap.add_argument("--model", default=D.model,
                    help="HF-format directory or 'smollm2-135m-instruct' (the default "
                         "with --data; with neither, the small world's base judge)")
    ap.add_argument("--data", default=D.data,
                    help="training JSONL (pairs; for sft also {messages|prompt, completion}); "
                         "with neither --data nor --model, the small world's training split")
    ap.add_argument("--eval-data", default=D.eval_data,
                    help="held-out pairs for before/after accuracy (small world: "
                         "its in-distribution held-out split)")
    ap.add_argument("--limit", type=number(int, 1), default=D.limit,
                    help="seeded subset of the training pairs")
    ap.add_argument("--eval-limit", type=number(int, 1), default=D.eval_limit,
                    help="seeded subset of the held-out pairs")
    ap.add_argument("--no-eval", action="store_true", help="skip the before/after judge evaluation")
    ap.add_argument("--out", default=D.out, help="run directory (default runs/<method>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out where it stopped, with the arguments it was started with")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--lr", type=number(float, above=0), default=D.lr,
                   help="peak learning rate (default per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in LR.items()) + ")")
    g.add_argument("--epochs", type=number(int, 1), default=D.epochs,
                   help="epochs over each (STaR: each iteration's) data")
    g.add_argument("--batch-size", type=number(int, 1), default=D.batch_size,
                   help="examples (pairs) per micro-batch")
    g.add_argument("--grad-accum", type=number(int, 1), default=D.grad_accum,
                   help="micro-batches per optimizer step")
    g.add_argument("--warmup", type=number(float, 0, high=1), default=D.warmup,
                   help="linear warmup, fraction of steps; then cosine")
    g.add_argument("--weight-decay", type=number(float, 0), default=D.weight_decay, help="AdamW weight decay")
    g.add_argument("--clip", type=number(float, above=0), default=D.clip, help="gradient-norm clip")
    g.add_argument("--max-len", type=number(int, 1), default=D.max_len,
                   help="longer examples are skipped and counted")
    g.add_argument("--save-every", type=number(int, 0), default=D.save_every,
                   help="checkpoint every N steps (and at the end; 0: only at the end)")
    g.add_argument("--max-steps", type=number(int, 1), default=D.max_steps,
                   help="stop after N steps (resume later)")
    g = ap.add_argument_group("DPO")
    g.add_argument("--beta", type=number(float, above=0), default=D.beta, help="DPO beta (Eq. 9)")
    g.add_argument("--label-smoothing", type=number(float, 0, high=0.5), default=D.label_smoothing,
                   help="cDPO epsilon")
    g.add_argument("--dpo-nll", type=number(float, 0), default=D.dpo_nll,
                   help="RPO: add this weight times the chosen answer's per-token NLL to each pair's "
                        "DPO loss")
    g.add_argument("--loss", dest="loss_type", choices=("sigmoid", "ipo"), default=D.loss_type,
                   help="DPO loss: sigmoid (DPO/cDPO) or ipo")
    g = ap.add_argument_group("STaR")
    g.add_argument("--iterations", type=number(int, 1), default=D.iterations,
                   help="STaR iterations = disjoint splits (paper: 3)")
    g.add_argument("--samples-per-prompt", type=number(int, 1), default=D.samples_per_prompt,
                   help="rationales sampled per pair and iteration")
    g.add_argument("--pairs-per-prompt", type=number(int, 1), default=D.pairs_per_prompt,
                   help="STaR-DPO (correct, incorrect) pairs per prompt")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=D.max_new_tokens,
                   help="rationale length cap when sampling")
    g.add_argument("--star-filter", choices=("label", "random"), default=D.star_filter,
                   help="STaR: keep rationales by the label (the method), or as many at random (the control)")
    g.add_argument("--rationalize", action="store_true",
                   help="STaR-SFT: add Fig. 7 rationales for pairs the model got wrong")
    g.add_argument("--star-both-orders", action="store_true",
                   help="STaR: sample each pair with the chosen answer as A and as B "
                        "(default: one seeded order)")
    g.add_argument("--verdict-temperature", type=number(float, above=0), default=D.verdict_temperature,
                   help="STaR: temperature of the forced verdict drawn from P(A), P(B) "
                        "when a rationale has none")
    g.add_argument("--ref-from-previous", action=argparse.BooleanOptionalAction, default=D.ref_from_previous,
                   help="STaR-DPO reference = the model the iteration starts from (else the base model; "
                        "the small world's default is on)")
    g.add_argument("--eval-samples", type=number(int, 1), default=D.eval_samples,
                   help="CoT samples per held-out judgement (maj@N)")
    g.add_argument("--sample-batch", type=number(int, 1), default=D.sample_batch,
                   help="prompts sampled together, each with its --samples-per-prompt rows")
    g = ap.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=D.seed,
                   help="seed for splits, A/B orders, sampling and data order")
    g.add_argument("--device", default=D.device, help="cpu or cuda")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=D.dtype,
                   help="bfloat16: train under bf16 autocast on float32 master weights and optimizer, "
                        "sample in bf16; float32: exact float32 everywhere (oracle runs)")
    g.add_argument("--threads", type=number(int, 1), default=D.threads,
                   help="torch CPU threads (default: torch's)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in backward (activation memory ~ 1/layers; "
                        "~1/3 more compute)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="a finished stage keeps its last two checkpoints (model + optimizer state) "
                        "beside its model")
    a = ap.parse_args(argv)
    if a.method == "star_dpo" and a.samples_per_prompt < 2:
        ap.error("argument --samples-per-prompt: star_dpo needs >= 2 "
                 "(a pair is a right and a wrong rationale)")
    return RunConfig(**vars(a), world=in_world)


def _resume_conflicts(cfg: RunConfig, old: dict) -> list:
    """The flags whose value differs from the run's args.json, as '--flag OLD -> NEW' (fields the
    file predates compare against their default; the learning rate by its effective value)."""
    new, default = asdict(cfg), asdict(RunConfig())
    out = []
    for k, v in new.items():
        was = old.get(k, default[k])
        if k == "lr":  # None: the method's default
            v, was = cfg.learning_rate, replace(cfg, lr=was).learning_rate
        if k not in _RESUME_FREE and v != was:
            out.append(f"--{'loss' if k == 'loss_type' else k.replace('_', '-')} {was} -> {v}")
    return out


def _method_asked(argv) -> str | None:
    """The value of --method on a command line (`--method X` or `--method=X`), None without one."""
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _asks_online(argv) -> bool:
    """True when the command line asks for --method online_dpo."""
    return _method_asked(argv) == "online_dpo"


def _without_method(argv) -> list:
    """argv less its --method option, for online.py (which has no --method)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--method":
            skip = True
        elif not a.startswith("--method="):
            out.append(a)
    return out
