"""train.py's configuration: the RunConfig of a run, its per-method and small-world defaults, the
command line it is parsed from, and what a resume may change. Every option is declared once, as a
RunConfig field (cli.option), and the command line is built from those fields."""
import argparse
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import dist
from cli import HelpFormatter, add_options, flag_of, number, option
from files import DEFAULT_MODEL
from fit import TrainConfig

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
    """Everything a run is told; built once in `main` from the command line, written to args.json.
    Each field is one option: its default, its --help text and its group (cli.option); the small
    world replaces some defaults (WORLD_DEFAULTS)."""
    method: str = option("star_dpo", "objective (see above; online_dpo's options: --method online_dpo "
                                     "--help)", choices=(*METHODS, "online_dpo"))
    model: str = option(DEFAULT_MODEL, "HF-format directory or 'smollm2-135m-instruct' (the default "
                                       "with --data; with neither, the small world's base judge)")
    data: str = option(str(DEFAULT_TRAIN), "training JSONL (pairs; for sft also {messages|prompt, "
                                           "completion}); with neither --data nor --model, the small "
                                           "world's training split")
    eval_data: str = option(str(DEFAULT_HELDOUT), "held-out pairs for before/after accuracy (small world: "
                                                  "its in-distribution held-out split)")
    limit: int | None = option(None, "seeded subset of the training pairs", type=number(int, 1))
    eval_limit: int | None = option(None, "seeded subset of the held-out pairs", type=number(int, 1))
    no_eval: bool = option(False, "skip the before/after judge evaluation")
    out: str | None = option(None, "run directory (default runs/<method>)")
    resume: bool = option(False, "continue the run in --out where it stopped, with the arguments it was "
                                 "started with")

    # optimisation
    lr: float | None = option(None, "peak learning rate (default per method: "
                                    + ", ".join(f"{k} {v:g}" for k, v in LR.items()) + ")",
                              group="optimisation", type=number(float, above=0))
    epochs: int = option(1, "epochs over each (STaR: each iteration's) data", group="optimisation",
                         type=number(int, 1))
    batch_size: int = option(2, "examples (pairs) per micro-batch", group="optimisation", type=number(int, 1))
    grad_accum: int = option(1, "micro-batches per optimizer step", group="optimisation", type=number(int, 1))
    warmup: float = option(0.1, "linear warmup, fraction of steps; then cosine", group="optimisation",
                           type=number(float, 0, high=1))
    weight_decay: float = option(0.0, "AdamW weight decay", group="optimisation", type=number(float, 0))
    clip: float = option(1.0, "gradient-norm clip", group="optimisation", type=number(float, above=0))
    max_len: int = option(1024, "longer examples are skipped and counted", group="optimisation",
                          type=number(int, 1))
    save_every: int = option(10, "checkpoint every N steps (and at the end; 0: only at the end)",
                             group="optimisation", type=number(int, 0))
    max_steps: int | None = option(None, "stop after N steps (resume later)", group="optimisation",
                                   type=number(int, 1))

    # DPO
    beta: float = option(0.1, "DPO beta (Eq. 9)", group="DPO", type=number(float, above=0))
    label_smoothing: float = option(0.0, "cDPO epsilon", group="DPO", type=number(float, 0, high=0.5))
    dpo_nll: float = option(0.0, "RPO: add this weight times the chosen answer's per-token NLL to each "
                                 "pair's DPO loss", group="DPO", type=number(float, 0))
    loss_type: str = option("sigmoid", "DPO loss: sigmoid (DPO/cDPO) or ipo", group="DPO", flag="--loss",
                            choices=("sigmoid", "ipo"))

    # STaR
    iterations: int = option(3, "STaR iterations = disjoint splits (paper: 3)", group="STaR",
                             type=number(int, 1))
    samples_per_prompt: int = option(4, "rationales sampled per pair and iteration", group="STaR",
                                     type=number(int, 1))
    pairs_per_prompt: int = option(1, "STaR-DPO (correct, incorrect) pairs per prompt", group="STaR",
                                   type=number(int, 1))
    max_new_tokens: int = option(64, "rationale length cap when sampling", group="STaR", type=number(int, 1))
    star_filter: str = option("label", "STaR: keep rationales by the label (the method), or as many at "
                                       "random (the control)", group="STaR", choices=("label", "random"))
    rationalize: bool = option(False, "STaR-SFT: add Fig. 7 rationales for pairs the model got wrong",
                               group="STaR")
    star_both_orders: bool = option(False, "STaR: sample each pair with the chosen answer as A and as B "
                                           "(default: one seeded order)", group="STaR")
    verdict_temperature: float = option(1.0, "STaR: temperature of the forced verdict drawn from P(A), P(B) "
                                             "when a rationale has none", group="STaR",
                                        type=number(float, above=0))
    ref_from_previous: bool = option(False, "STaR-DPO reference = the model the iteration starts from (else "
                                            "the base model; the small world's default is on)",
                                     group="STaR", action=argparse.BooleanOptionalAction)
    eval_samples: int = option(1, "CoT samples per held-out judgement (maj@N)", group="STaR",
                               type=number(int, 1))
    sample_batch: int = option(4, "prompts sampled together, each with its --samples-per-prompt rows",
                               group="STaR", type=number(int, 1))

    # runtime
    seed: int = option(0, "seed for splits, A/B orders, sampling and data order", group="runtime", type=int)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda", group="runtime")
    dtype: str = option("bfloat16", "bfloat16: train under bf16 autocast on float32 master weights and "
                                    "optimizer, sample in bf16; float32: exact float32 everywhere "
                                    "(oracle runs)", group="runtime", choices=("float32", "bfloat16"))
    threads: int | None = option(None, "torch CPU threads (default: torch's)", group="runtime",
                                 type=number(int, 1))
    activation_checkpointing: bool = option(False, "recompute each transformer block in backward (activation "
                                                   "memory ~ 1/layers; ~1/3 more compute)", group="runtime")
    no_progress: bool = option(False, "no tqdm progress bars", group="runtime")
    keep_checkpoints: bool = option(False, "a finished stage keeps its last two checkpoints (model + "
                                           "optimizer state) beside its model", group="runtime")

    # Set by parse_args, not a flag: the run is in the small world (neither --model nor --data given).
    world: bool = False

    @property
    def progress(self) -> bool:
        return not self.no_progress and dist.rank() == 0

    @property
    def learning_rate(self) -> float:
        """--lr, or the method's default (the small world's when the run is in it)."""
        return self.lr if self.lr is not None else (WORLD_LR if self.world else LR)[self.method]

    def train_config(self) -> TrainConfig:
        """fit's settings: the options of the same name, and three that are derived from the run."""
        same_name = {f.name: getattr(self, f.name) for f in fields(TrainConfig)
                     if f.name not in ("lr", "progress", "bf16")}
        return TrainConfig(**same_name, lr=self.learning_rate, progress=self.progress,
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
    add_options(ap, RunConfig, D)
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
            out.append(f"{flag_of(RunConfig, k)} {was} -> {v}")
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
