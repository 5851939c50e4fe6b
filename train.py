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
import math
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

import dist
import genrm
import world
from data import LoadStats, load_completions, load_pairs, load_tokenizer, pair_examples, sft_examples
from eval import judge_change, judge_report
from files import check_run_dir, read_json, read_jsonl, write_json, write_jsonl
from fit import fit, micro_batches, prune_checkpoints, save_model
from losses import add_reference_logps, make_step_dpo, step_bt, step_genrm, step_sft
from model import Llama, check_pretrained
from run_config import (  # noqa: F401  (train.X names other modules and tests use)
    DEFAULT_HELDOUT,
    DEFAULT_TRAIN,
    LR,
    METHODS,
    WORLD_DEFAULTS,
    WORLD_LR,
    WORLD_METHOD_DEFAULTS,
    WORLD_PAIRS,
    RunConfig,
    _asks_online,
    _method_asked,
    _resume_conflicts,
    _without_method,
)
from run_config import parse_args as _parse_args


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


def sft_objective(cfg: RunConfig, tok, rows, skipped):
    """SFT, STaR-SFT and the rationalizer (Eq. 8): token-mean NLL of each completion."""
    return sft_examples(tok, rows, cfg.max_len, skipped), step_sft


def genrm_objective(cfg: RunConfig, tok, rows, skipped):
    """GenRM (Eq. 7): -log pi(I | x, y1, y2) on the verdict token of the Fig. 8 prompt."""
    return genrm.genrm_examples(tok, rows, cfg.max_len, skipped, cfg.seed), step_genrm


def bt_objective(cfg: RunConfig, tok, rows, skipped):
    """Bradley-Terry (Eq. 2) on a scalar head: -log sigmoid(r(chosen) - r(rejected))."""
    return pair_examples(tok, rows, cfg.max_len, skipped), step_bt


def dpo_objective(cfg: RunConfig, tok, rows, skipped):
    """DPO and STaR-DPO (Eq. 9) on (chosen, rejected) pairs, against a reference model."""
    return (pair_examples(tok, rows, cfg.max_len, skipped),
            make_step_dpo(cfg.beta, cfg.label_smoothing, cfg.loss_type, cfg.dpo_nll))


# Each method's objective: its training examples and the loss step fit runs on them (losses.py).
OBJECTIVES = {"sft": sft_objective, "star_sft": sft_objective, "rationalizer": sft_objective,
              "genrm": genrm_objective, "bt_rm": bt_objective,
              "dpo": dpo_objective, "star_dpo": dpo_objective}


def train_on(cfg: RunConfig, model_path, rows, out_dir, tok, objective, ref_path=None):
    """Train `model_path` on rows with one objective (an OBJECTIVES name); the result goes to
    out_dir/model. DPO objectives first attach the reference log-probs of `ref_path`."""
    out_dir = Path(out_dir)
    if (out_dir / "model" / "config.json").exists():  # finished, its checkpoints pruned: a resume skips it
        mf = out_dir / "train" / "metrics.jsonl"
        return [r for _, r in read_jsonl(mf)] if mf.exists() else []
    skipped = LoadStats(read=len(rows))
    examples, step = OBJECTIVES[objective](cfg, tok, rows, skipped)
    if dist.rank() == 0:
        print(f"{objective}: {skipped}")
    if not examples:
        raise SystemExit(f"{objective}: no training examples left ({skipped})")

    # DPO compares the policy with a frozen reference: its log-probs of every pair are computed
    # once, in the precision training runs in, and cached beside the run.
    if OBJECTIVES[objective] is dpo_objective:
        ref_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        add_reference_logps(ref_path, examples, tok.pad_id, out_dir / "ref_logps.pt", cfg.batch_size,
                            ref_dtype, cfg.device, progress=cfg.progress)

    # The model is sharded over the ranks of a torchrun job (one process: unchanged); fit resumes
    # from the stage's last checkpoint.
    model = dist.shard(load_model(cfg, model_path, score_head=True if objective == "bt_rm" else None))
    tcfg = cfg.train_config()
    hist = fit(model, examples, step, tcfg, out_dir / "train", tok.pad_id)
    steps_planned = math.ceil(len(micro_batches(len(examples), tcfg)) / cfg.grad_accum)
    # Stopped early by --max-steps: no final model yet, so the checkpoints stay for --resume.
    if cfg.max_steps is not None and len(hist) < steps_planned:
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


def sample_step(cfg: RunConfig, model_path, tok, split, iteration):
    """STaR's sampling: the model judges every pair of the split with the CoT prompt (Fig. 6),
    writing samples_per_prompt rationales each at temperature 1 (A.2.2)."""
    return genrm.sample_rationales(
        load_sampler(cfg, model_path), tok, split, n=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + iteration, both_orders=cfg.star_both_orders,
        verdict_temperature=cfg.verdict_temperature, prompt_batch=cfg.sample_batch, progress=cfg.progress)


def filter_step(cfg: RunConfig, samples, split, model_path, tok, iteration):
    """STaR's filter: what the label keeps of the samples, the rows the iteration trains on."""
    seed = cfg.seed + iteration
    if cfg.method == "star_dpo":
        # STaR-DPO pairs a right with a wrong rationale of the same prompt (Eq. 9); the control
        # pairs as many rationales at random.
        pairs = genrm.star_dpo_pairs(samples, pairs_per_prompt=cfg.pairs_per_prompt, seed=seed)
        if cfg.star_filter == "random":
            pairs = genrm.random_dpo_pairs(samples, len(pairs), seed=seed)
        return pairs
    # STaR-SFT keeps the rationales whose verdict is right (Eq. 4); the control keeps as many at
    # random.
    kept = genrm.star_sft_examples(samples)
    if cfg.star_filter == "random":
        kept = genrm.random_filter(samples, len(kept), seed=seed)
    # With --rationalize, the pairs the model got wrong add its explanations of the right answer
    # (Fig. 7, Eq. 8).
    wrong, orders = genrm.failed_pairs(samples, split)
    if cfg.rationalize and wrong:
        kept += genrm.rationalize(load_sampler(cfg, model_path), tok, wrong, orders,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + iteration,
                                  progress=cfg.progress)
    return kept


def carry_over(cfg: RunConfig, model_path, it_dir, tok):
    """An iteration with nothing to train on passes its model on unchanged."""
    if dist.rank() == 0:
        load_model(cfg, model_path).save_pretrained(it_dir / "model")
        tok.save(it_dir / "model")
    dist.barrier()


def star(cfg: RunConfig, pairs, tok, run_dir, log=print):
    """STaR-SFT / STaR-DPO (paper Sec. 2.2, Sec. 4 and A.3). The training pairs are cut into
    `iterations` disjoint splits, and iteration i samples, filters and trains on split i with the
    latest model. Each stage writes its JSONL artefact before the next starts, so a killed run
    resumes at the stage it stopped and rationales from another sampler can be dropped in.
    Returns the final model path and the per-iteration counts."""
    run_dir = Path(run_dir)
    kept_kind = "sft" if cfg.method == "star_sft" else "dpo"  # rationales, or (right, wrong) pairs of them
    latest, reports = str(cfg.model), []
    for i, split in enumerate(genrm.split_pairs(pairs, cfg.iterations, cfg.seed)):
        it_dir = run_dir / f"iter_{i}"
        trained = (it_dir / "model" / "config.json").exists()
        samples_file, kept_file = run_dir / f"samples_{i}.jsonl", run_dir / f"{kept_kind}_{i}.jsonl"

        # 1. Sample: the latest model writes rationales for every pair of the split. A rationale
        # that ends without a verdict gets one drawn from the indicator tokens' probabilities.
        if samples_file.exists() or trained:
            samples = read_rows(samples_file, "samples")
        else:
            samples = sample_step(cfg, latest, tok, split, i)
            save_rows(samples_file, samples)

        # 2. Filter: the label decides what is kept.
        if kept_file.exists() or trained:
            kept = read_rows(kept_file, kept_kind)
        else:
            kept = filter_step(cfg, samples, split, latest, tok, i)
            save_rows(kept_file, kept)
        counts = genrm.star_report(samples, **{"kept" if kept_kind == "sft" else "paired": len(kept)})
        reports.append({**counts, "iteration": i})
        log(f"STaR iteration {i}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None))

        # 3. Train: the latest model learns what was kept (DPO against the base model, or with
        # --ref-from-previous against the model this iteration started from) and becomes the next.
        if not trained and kept:
            train_on(cfg, latest, kept, it_dir, tok, cfg.method,
                     ref_path=latest if cfg.ref_from_previous else str(cfg.model))
        elif not trained:
            log(f"STaR iteration {i}: nothing to train on; the model is carried over unchanged")
            carry_over(cfg, latest, it_dir, tok)
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


def run_rationalizer(cfg: RunConfig, pairs, tok, out, log):
    """Eq. 8: rationales written by the base model given the correct answer (Fig. 7), then SFT on them."""
    rationales_file = out / "rationales.jsonl"
    if rationales_file.exists():
        rows = read_rows(rationales_file, "sft")
    else:
        orders = genrm.seeded_orders(pairs, cfg.seed)
        rows = genrm.rationalize(load_sampler(cfg, cfg.model), tok, pairs, orders,
                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=cfg.progress)
        save_rows(rationales_file, rows)
    train_on(cfg, cfg.model, rows, out, tok, "rationalizer")
    return str(out / "model"), None


def run_once(cfg: RunConfig, rows, tok, out, log):
    """SFT, Bradley-Terry, GenRM and DPO: one objective on the training rows, the base model as
    DPO's reference."""
    train_on(cfg, cfg.model, rows, out, tok, cfg.method, ref_path=cfg.model)
    return str(out / "model"), None


# What `--method` runs: each returns (the final model's path, STaR's per-iteration counts or None).
RUNS = {"sft": run_once, "bt_rm": run_once, "genrm": run_once, "dpo": run_once,
        "rationalizer": run_rationalizer, "star_sft": star, "star_dpo": star}


def parse_args(argv=None) -> RunConfig:
    """This script's command line -> RunConfig (run_config.parse_args, with this file's --help)."""
    return _parse_args(argv, description=__doc__)


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
    # A new run needs an empty --out; --resume needs the arguments the run was started with.
    check_run_dir(out, cfg.resume, partial(_resume_conflicts, cfg))
    rank, world_size = dist.init()  # torchrun: FSDP2 training, data-parallel sampling and eval
    if cfg.world:  # build (or reuse) the base judge, then draw the splits into the run directory
        world_base(cfg)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        write_world_splits(cfg)
    tok, rows, heldout = _read_inputs(cfg)
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
    final, star_counts = RUNS[cfg.method](cfg, rows, tok, out, log)
    if star_counts is not None:
        report["star"] = star_counts

    if heldout is not None:
        report["after"] = _held_out_accuracy(cfg, final, heldout, tok, "after")
        report["after_minus_before"] = judge_change(report["before"], report["after"], log)
    report.update(base_model=cfg.model, final_model=final, seconds=round(time.time() - t0, 1))
    if rank == 0:
        write_json(out / "report.json", report)
        print(f"final model: {final}\nreport: {out / 'report.json'}\n"
              f"run directory: {out}  ({report['seconds']} s)")
    dist.finish()
    return report


if __name__ == "__main__":
    main()
