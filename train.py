"""Every objective of the paper as a plain training loop, and STaR around them.

  sft           token-mean NLL over response tokens
  bt_rm         Bradley-Terry reward model, Eq. 2 (scalar head on the last real token)
  genrm         GenRM without CoT, Eq. 7: -log pi(I | x, y1, y2) on the indicator token (Fig. 8)
  rationalizer  STaR-Rationalizer, Eq. 8: NLL over rationale + verdict, rationales from Fig. 7
  dpo           DPO (sigmoid / cDPO / IPO) on any prompt/chosen/rejected JSONL
  star_sft      STaR-SFT: iterate sample -> keep correct rationales -> SFT (Eq. 4 / 8)
  star_dpo      STaR-DPO: iterate sample -> pair correct with incorrect rationales -> DPO (Eq. 9)
  online_dpo    a policy trained by online DPO with the judge as its reward (Eq. 5-6): online.py's
                loop and options (`python3 train.py --method online_dpo --help` lists them)

`python3 train.py --method star_dpo`, given neither --model nor --data, runs in the small world
(world.py): it builds the world's base judge from scratch once (world_base), draws the world's
training and held-out pairs, and prints the judge's held-out accuracy before and after. With
--data and/or --model it runs on real models and data (the default model: SmolLM2-135M-Instruct).
"""
import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

import dist
import genrm
import stats
import world
from data import LoadStats, load_completions, load_pairs, load_tokenizer, pair_examples, sft_examples
from eval import HelpFormatter, judge_report, number
from files import check_run_dir, read_json, read_jsonl, write_json, write_jsonl
from fit import TrainConfig, fit, micro_batches, prune_checkpoints, save_model
from gguf import DEFAULT_MODEL
from losses import add_reference_logps, make_step_dpo, step_bt, step_genrm, step_sft
from model import Llama, check_pretrained

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


def load_model(cfg: RunConfig, path, score_head=None):
    """The model to train: float32 parameters (master weights, optimizer state) whatever --dtype;
    --dtype bfloat16 trains them under bf16 autocast (fit), --dtype float32 is exact float32."""
    model = Llama.from_pretrained(path, dtype=torch.float32, device=cfg.device, score_head=score_head)
    model.checkpointing = cfg.activation_checkpointing
    return model


def load_sampler(cfg: RunConfig, path):
    """The model that samples rationales and judges (no gradients), in eval mode."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return Llama.from_pretrained(path, dtype=dtype, device=cfg.device).eval()


def train_on(cfg: RunConfig, model_path, rows, out_dir, tok, objective, ref_path=None):
    """Train `model_path` on rows with one objective (a METHODS name); the result goes to
    out_dir/model. DPO objectives first attach the reference log-probs of `ref_path`."""
    out_dir = Path(out_dir)
    if (out_dir / "model" / "config.json").exists():  # finished, its checkpoints pruned: a resume skips it
        mf = out_dir / "train" / "metrics.jsonl"
        return [r for _, r in read_jsonl(mf)] if mf.exists() else []
    st = LoadStats(read=len(rows))
    if objective in ("sft", "star_sft", "rationalizer"):
        ex, step = sft_examples(tok, rows, cfg.max_len, st), step_sft
    elif objective == "genrm":
        ex, step = genrm.genrm_examples(tok, rows, cfg.max_len, st, cfg.seed), step_genrm
    elif objective == "bt_rm":
        ex, step = pair_examples(tok, rows, cfg.max_len, st), step_bt
    else:  # dpo, star_dpo
        ex = pair_examples(tok, rows, cfg.max_len, st)
        step = make_step_dpo(cfg.beta, cfg.label_smoothing, cfg.loss_type, cfg.dpo_nll)
    if dist.rank() == 0:
        print(f"{objective}: {st}")
    if not ex:
        raise SystemExit(f"{objective}: no training examples left ({st})")
    if objective in ("dpo", "star_dpo"):
        # The precision training runs in.
        ref_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        add_reference_logps(ref_path, ex, tok.pad_id, out_dir / "ref_logps.pt", cfg.batch_size, ref_dtype,
                            cfg.device, progress=cfg.progress)
    model = dist.shard(load_model(cfg, model_path, score_head=True if objective == "bt_rm" else None))
    tcfg = cfg.train_config()
    hist = fit(model, ex, step, tcfg, out_dir / "train", tok.pad_id)
    if cfg.max_steps is not None and len(hist) < math.ceil(len(micro_batches(len(ex), tcfg))
                                                           / cfg.grad_accum):
        raise SystemExit(f"stopped at --max-steps {cfg.max_steps}; run again with --resume to finish")
    save_model(model, out_dir / "model", tok)
    if not cfg.keep_checkpoints:  # the stage is done: its final model is all a resume or a user needs
        prune_checkpoints(out_dir / "train")
    return hist


def read_rows(path, schema) -> list:
    """A STaR stage's JSONL artefact (genrm.SCHEMAS[schema]), or [] where it was never written
    (a stage whose model is already trained no longer needs it)."""
    return genrm.load_rows(path, genrm.SCHEMAS[schema]) if Path(path).exists() else []


def save_rows(path, rows):
    """Write an artefact once (rank 0, atomically) and wait for it, so every rank goes on together.
    Every rank computed the same rows (sampling is sharded, then gathered)."""
    if dist.rank() == 0:
        write_jsonl(path, rows)
    dist.barrier()


def star(cfg: RunConfig, pairs, tok, run_dir, log=print):
    """STaR-SFT / STaR-DPO (paper Sec. 2.2, Sec. 4 and A.3). The training pairs are cut into
    `iterations` disjoint splits, and iteration i samples, filters and trains on split i with the
    latest model. Each stage writes its JSONL artefact before the next starts, so a killed run
    resumes at the stage it stopped and rationales from another sampler can be dropped in.
    Returns the final model path and the per-iteration counts."""
    run_dir = Path(run_dir)
    latest, reports = str(cfg.model), []
    for i, split in enumerate(genrm.split_pairs(pairs, cfg.iterations, cfg.seed)):
        it_dir = run_dir / f"iter_{i}"
        trained = (it_dir / "model" / "config.json").exists()
        samples_file = run_dir / f"samples_{i}.jsonl"
        kept_file = run_dir / (f"sft_{i}.jsonl" if cfg.method == "star_sft" else f"dpo_{i}.jsonl")

        # 1. The latest model judges every pair of the split with the CoT prompt (Fig. 6), writing
        # samples_per_prompt rationales each at temperature 1; a rationale that ends without a
        # verdict gets one drawn from the indicator tokens' probabilities.
        if samples_file.exists() or trained:
            samples = read_rows(samples_file, "samples")
        else:
            samples = genrm.sample_rationales(
                load_sampler(cfg, latest), tok, split, n=cfg.samples_per_prompt,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + i,
                both_orders=cfg.star_both_orders, verdict_temperature=cfg.verdict_temperature,
                prompt_batch=cfg.sample_batch, progress=cfg.progress)
            save_rows(samples_file, samples)

        # 2. The label filters them. STaR-SFT keeps the rationales whose verdict is right (Eq. 4)
        # and, with --rationalize, adds the model's explanations of the right answer for the pairs
        # it got wrong (Fig. 7, Eq. 8). STaR-DPO pairs a right with a wrong rationale of the same
        # prompt (Eq. 9). The random-filter control keeps as many, ignoring the label.
        if kept_file.exists() or trained:
            kept = read_rows(kept_file, "sft" if cfg.method == "star_sft" else "dpo")
        elif cfg.method == "star_sft":
            kept = genrm.star_sft_examples(samples)
            if cfg.star_filter == "random":
                kept = genrm.random_filter(samples, len(kept), seed=cfg.seed + i)
            wrong, orders = genrm.failed_pairs(samples, split)
            if cfg.rationalize and wrong:
                kept += genrm.rationalize(load_sampler(cfg, latest), tok, wrong, orders,
                                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + i,
                                          progress=cfg.progress)
            save_rows(kept_file, kept)
        else:
            kept = genrm.star_dpo_pairs(samples, pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed + i)
            if cfg.star_filter == "random":
                kept = genrm.random_dpo_pairs(samples, len(kept), seed=cfg.seed + i)
            save_rows(kept_file, kept)
        counts = genrm.star_report(samples, kept=len(kept) if cfg.method == "star_sft" else None,
                                   paired=len(kept) if cfg.method == "star_dpo" else None)
        reports.append({**counts, "iteration": i})
        log(f"STaR iteration {i}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None))

        # 3. The latest model is trained on what was kept (DPO against the base model, or with
        # --ref-from-previous against the model this iteration started from) and becomes the next.
        if not trained and kept:
            train_on(cfg, latest, kept, it_dir, tok, cfg.method,
                     ref_path=latest if cfg.ref_from_previous else str(cfg.model))
        elif not trained:
            log(f"STaR iteration {i}: nothing to train on; the model is carried over unchanged")
            if dist.rank() == 0:
                load_model(cfg, latest).save_pretrained(it_dir / "model")
                tok.save(it_dir / "model")
            dist.barrier()
        latest = str(it_dir / "model")
    if dist.rank() == 0:
        write_json(run_dir / "star_report.json", reports)
    return latest, reports


def world_base(cfg: RunConfig) -> str:
    """The small world's base judge: the SFT loop (train_on) from a random initialisation on the
    world's sloppy demonstrations (world.BASE_RECIPE), built once per recipe under $GENRM_CACHE; a
    killed build resumes from its last checkpoint. Returns the model directory."""
    recipe, base = world.BASE_RECIPE, world.base_dir()
    if not (base / "model" / "config.json").exists():
        print(f"building the small world's base judge in {base} (once per recipe)")
        if dist.rank() == 0 and not (base / "init" / "config.json").exists():
            world.write_initial_model(base / "init", recipe["seed"])
        dist.barrier()
        pretrain = replace(cfg, method="sft", lr=recipe["lr"], batch_size=recipe["batch_size"], epochs=1,
                           grad_accum=1, warmup=recipe["warmup"], weight_decay=0.0, clip=1.0,
                           seed=recipe["seed"], dtype="float32", max_steps=None,
                           activation_checkpointing=False, keep_checkpoints=False)
        demos = world.demonstrations(recipe["demonstrations"], recipe["seed"], recipe["drop"])
        train_on(pretrain, base / "init", demos, base, load_tokenizer(base / "init"), "sft")
    return str(base / "model")


def world_inputs(cfg: RunConfig, out: Path) -> RunConfig:
    """A run in the small world reads its base judge and its splits from these paths (the
    splits are drawn with --seed and written into the run directory by write_world_splits)."""
    return replace(cfg, model=str(world.base_dir() / "model"), data=str(out / "world_train.jsonl"),
                   eval_data=str(out / "world_id.jsonl"))


def write_world_splits(cfg: RunConfig):
    """The small world's training and held-out pairs, drawn with --seed (kept on a resume)."""
    for path, split in ((cfg.data, "train"), (cfg.eval_data, "id")):
        if dist.rank() == 0 and not Path(path).exists():
            write_jsonl(path, world.make_pairs(WORLD_PAIRS[split], cfg.seed, split))
    dist.barrier()


def _held_out_accuracy(cfg, model_path, pairs, tok, title):
    return judge_report(load_sampler(cfg, model_path), tok, pairs, title=title, samples=cfg.eval_samples,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        prompt_batch=max(16, cfg.sample_batch), progress=cfg.progress)


def _paired_change(before, after, log):
    """after - before on the same held-out pairs (maj@N, each pair the mean of its two orders),
    with the paired bootstrap's 95% interval and p-value (stats.paired_bootstrap)."""
    a, b = after["per_pair"], before["per_pair"]
    if a["id"] != b["id"]:  # cannot happen with one tokenizer; say so rather than pair the wrong ones
        log("[after - before] not paired: the evaluated pairs differ")
        return None
    keep = [i for i, (x, y) in enumerate(zip(a["maj@N"], b["maj@N"])) if x is not None and y is not None]
    d = stats.paired_bootstrap([[a["maj@N"][i] for i in keep]], [[b["maj@N"][i] for i in keep]], seed=0)
    log(f"[after - before] {d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] (paired bootstrap over "
        f"the {len(keep)} held-out pairs, p = {d['p']:.2f})")
    return d


# RunConfig fields a resume may change: they do not change what the run computes
_RESUME_FREE = ("out", "resume", "device", "threads", "activation_checkpointing", "no_progress", "max_steps",
                "save_every", "keep_checkpoints")
_KEEPS = """\
what a run directory keeps: args.json (the arguments, written once the inputs are read), metrics.jsonl,
report.json, the STaR artefacts and each stage's final model (model/, or iter_{i}/model/ for STaR). While a
stage trains, its last two checkpoints train/ckpt-NNNNNN/ (model plus optimizer state, about 3x the model's
size each) let --resume continue it; they are deleted once the stage has written its model, unless
--keep-checkpoints."""


def parse_args(argv=None) -> RunConfig:
    args = sys.argv[1:] if argv is None else list(argv)
    in_world = not any(a.split("=")[0] in ("--model", "--data") for a in args)
    D = RunConfig(**WORLD_DEFAULTS, world=True) if in_world else RunConfig()
    if in_world:
        D = replace(D, **WORLD_METHOD_DEFAULTS.get(_method_asked(args) or D.method, {}))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
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


def _check_run_dir(cfg: RunConfig, out: Path):
    """A new run needs an empty --out; --resume needs the arguments the run was started with."""
    check_run_dir(out, cfg.resume, partial(_resume_conflicts, cfg))


def _read_inputs(cfg: RunConfig):
    """Every input of a run, checked before anything is written: the model (config.json and the
    safetensors headers), its tokenizer, the training data (pairs, or for sft completion rows),
    the held-out pairs. Returns (tok, rows, held-out pairs or None); a bad input is a one-line
    SystemExit naming the file (and line)."""
    try:
        check_pretrained(cfg.model)
        tok = load_tokenizer(cfg.model)
        st = LoadStats()
        first = next((r for _, r in read_jsonl(cfg.data)), None)
        # Completion rows: {messages|prompt, completion}.
        if cfg.method == "sft" and first is not None and "completion" in first:
            rows = load_completions(cfg.data, limit=cfg.limit, seed=cfg.seed, stats=st)
        else:
            rows = load_pairs(cfg.data, limit=cfg.limit, seed=cfg.seed, stats=st)
        print(f"{cfg.data}: {st}")
        if not rows:
            raise ValueError(f"{cfg.data}: nothing to train on ({st})")
        if cfg.method in ("star_sft", "star_dpo") and cfg.iterations > len(rows):
            raise ValueError(f"{cfg.data}: {len(rows)} pairs cannot make --iterations {cfg.iterations} "
                             "disjoint splits")
        heldout = None
        if not cfg.no_eval and cfg.method != "bt_rm":
            est = LoadStats()
            heldout = load_pairs(cfg.eval_data, limit=cfg.eval_limit, seed=cfg.seed, stats=est)
            if not heldout:
                raise ValueError(f"{cfg.eval_data}: no held-out pairs ({est})")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    return tok, rows, heldout


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


def silent(*_):
    """The log of ranks other than 0."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if _asks_online(argv):
        # online_dpo trains a policy with a judge as its reward, not a judge: its loop, its run
        # directory and its options are online.py's, which takes the rest of the command line.
        import online
        return online.main(_without_method(argv))
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out or f"runs/{cfg.method}")
    if cfg.world:
        cfg = world_inputs(cfg, out)
    _check_run_dir(cfg, out)
    rank, world_size = dist.init()  # torchrun: FSDP2 training, data-parallel sampling and eval
    if cfg.world:  # build (or reuse) the base judge, then draw the splits into the run directory
        world_base(cfg)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        write_world_splits(cfg)
    tok, rows, heldout = _read_inputs(cfg)
    pairs = rows
    dist.barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "args.json").exists():  # a resume keeps the record it was checked against
            write_json(out / "args.json", asdict(cfg))
        print(f"run directory: {out}" + (f"  ({world_size} ranks)" if world_size > 1 else ""))
    dist.barrier()
    t0 = time.time()
    report = {"method": cfg.method, "run_dir": str(out)}
    if heldout is not None:
        before_file = out / "eval_before.json"  # a resumed run does not judge the base again
        if not before_file.exists():
            before = _held_out_accuracy(cfg, cfg.model, heldout, tok, "before")
            if rank == 0:
                write_json(before_file, before)
            dist.barrier()
        report["before"] = read_json(before_file)

    log = print if rank == 0 else silent
    if cfg.method in ("star_sft", "star_dpo"):
        final, report["star"] = star(cfg, pairs, tok, out, log)
    elif cfg.method == "rationalizer":
        # Eq. 8: rationales written by the base model given the correct answer (Fig. 7), then SFT
        rationales_file = out / "rationales.jsonl"
        if rationales_file.exists():
            rows = read_rows(rationales_file, "sft")
        else:
            rows = genrm.rationalize(load_sampler(cfg, cfg.model), tok, pairs,
                                     genrm.seeded_orders(pairs, cfg.seed),
                                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=cfg.progress)
            save_rows(rationales_file, rows)
        train_on(cfg, cfg.model, rows, out, tok, "rationalizer")
        final = str(out / "model")
    else:
        train_on(cfg, cfg.model, rows, out, tok, cfg.method, ref_path=cfg.model)
        final = str(out / "model")

    if heldout is not None:
        report["after"] = _held_out_accuracy(cfg, final, heldout, tok, "after")
        report["after_minus_before"] = _paired_change(report["before"], report["after"], log)
    report.update(base_model=cfg.model, final_model=final, seconds=round(time.time() - t0, 1))
    if rank == 0:
        write_json(out / "report.json", report)
        print(f"final model: {final}\nreport: {out / 'report.json'}\n"
              f"run directory: {out}  ({report['seconds']} s)")
    dist.finish()
    return report


if __name__ == "__main__":
    main()
