"""The online loop's inputs in the small world and out of it: the world's policy and judges (built
once by train.py's own steps, cached under $GENRM_CACHE), and the prompts each step asks.
"""
import hashlib
import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import dist
import world
from data import LoadStats, load_pairs, load_tokenizer
from files import DEFAULT_MODEL, cache_dir
from online_config import OnlineConfig

# ----------------------------------------------------------------------------------------------
# the small world's models: the policy, and the judges (built once, cached under $GENRM_CACHE)

def _run_config(method, threads, **kw):
    """train.py's small-world RunConfig for `method` (what `train.py --method METHOD` runs)."""
    import train
    argv = ["--method", method, "--no-progress"] + (["--threads", str(threads)] if threads else [])
    return replace(train.parse_args(argv), **kw)


def _recipe(cfg) -> dict:
    """What a RunConfig computes: its fields less the runtime ones and the paths (the world's
    inputs are set from the world, not from the checkout's location)."""
    runtime = ("threads", "no_progress", "out", "device", "model", "data", "eval_data", "resume")
    return {k: v for k, v in asdict(cfg).items() if k not in runtime}


def _recipe_dir(kind, recipe) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / "world" / f"{kind}-{key}"


def world_policy(threads=None, log=print) -> str:
    """The small world's pretrained policy: the SFT loop (train.train_on) from a random
    initialisation on sloppy answers (world.POLICY_RECIPE), built once under
    $GENRM_CACHE/world/policy-<hash>; a killed build resumes from its checkpoint."""
    import train
    recipe, d = world.POLICY_RECIPE, world.policy_dir()
    # Built once per recipe; the cache directory's name is a hash of it, so a change rebuilds.
    if not (d / "model" / "config.json").exists():
        log(f"building the small world's policy in {d} (once per recipe)")
        if dist.rank() == 0 and not (d / "init" / "config.json").exists():
            world.write_initial_policy(d / "init", recipe["seed"])
        dist.barrier()
        cfg = _run_config("sft", threads, lr=recipe["lr"], batch_size=recipe["batch_size"], epochs=1,
                          grad_accum=1, warmup=recipe["warmup"], seed=recipe["seed"], dtype="float32",
                          max_len=64, save_every=100)
        demos = world.policy_demonstrations(recipe["demonstrations"], recipe["seed"], recipe["drop"])
        train.train_on(cfg, d / "init", demos, d, load_tokenizer(d / "init"), "sft")
    return str(d / "model")


def world_trained_judge(threads=None, log=print) -> str:
    """The small world's trained judge: the main job's steps (`train.py --method star_dpo` with
    no flags: the base judge, the world's splits, three STaR-DPO iterations), run once into
    $GENRM_CACHE/world/judge-<hash> (named by the recipe); returns its iter_2/model."""
    import train
    cfg = _run_config("star_dpo", threads)
    recipe = _recipe(cfg)
    run = _recipe_dir("judge", [recipe, world.BASE_RECIPE, train.WORLD_PAIRS])
    final = run / f"iter_{cfg.iterations - 1}" / "model"
    # The same steps train.main runs for the main job, into the cache instead of a run directory.
    if not (final / "config.json").exists():
        log(f"building the small world's trained judge in {run} (the main job's STaR-DPO steps, once)")
        cfg = train.world_inputs(replace(cfg, out=str(run)), run)
        train.world_base(cfg)
        if dist.rank() == 0:
            run.mkdir(parents=True, exist_ok=True)
        train.write_world_splits(cfg)
        pairs = load_pairs(cfg.data)
        train.star(cfg, pairs, load_tokenizer(cfg.model), run, log)
    return str(final)


def world_bt(threads=None, log=print) -> str:
    """The small world's Bradley-Terry RM (Eq. 2): train.train_on objective bt_rm from the base
    judge on the world's training pairs (train.py's small-world bt_rm settings), built once into
    $GENRM_CACHE/world/bt-<hash>."""
    import train
    cfg = _run_config("bt_rm", threads)
    recipe = _recipe(cfg)
    d = _recipe_dir("bt", [recipe, world.BASE_RECIPE, train.WORLD_PAIRS])
    if not (d / "model" / "config.json").exists():
        log(f"building the small world's Bradley-Terry RM in {d} (once)")
        base = train.world_base(cfg)
        pairs = world.make_pairs(train.WORLD_PAIRS["train"], cfg.seed, "train")
        train.train_on(cfg, base, pairs, d, load_tokenizer(base), "bt_rm")
    return str(d / "model")


def judge_model_path(cfg: OnlineConfig, log=print) -> str | None:
    """The judge's model directory: --judge-model, else per --judge (None for the truth)."""
    if cfg.judge == "truth":
        return None
    if cfg.judge_model:
        return cfg.judge_model
    if not cfg.world:
        if cfg.judge == "bt":
            raise SystemExit("error: --judge bt outside the small world needs --judge-model "
                             "(a model with a score head)")
        return DEFAULT_MODEL
    if cfg.judge == "trained":
        return world_trained_judge(cfg.threads, log)
    if cfg.judge == "bt":
        return world_bt(cfg.threads, log)
    import train
    return train.world_base(_run_config("star_dpo", cfg.threads))


# ----------------------------------------------------------------------------------------------
# prompts

def load_prompts(cfg: OnlineConfig, split: str) -> list:
    """The prompts of a split as rows {"id", "question", "messages", "answer" (the truth, or None)}:
    the world's questions (world.policy_questions), or the prompts of --prompts (train) / none
    (eval: real prompts have no truth to score)."""
    if cfg.world:
        n = cfg.train_questions if split == "train" else cfg.eval_questions
        return [{"id": r["id"], "question": r["question"], "messages": world.policy_messages(r["question"]),
                 "answer": r["answer"]} for r in world.policy_questions(n, cfg.seed, split)]
    if split != "train":
        return []
    st = LoadStats()
    try:
        pairs = load_pairs(cfg.prompts, limit=cfg.limit, seed=cfg.seed, stats=st)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if not pairs:
        raise SystemExit(f"error: {cfg.prompts}: no prompts ({st})")
    return [{"id": p.id, "question": p.prompt,
             "messages": p.messages or [{"role": "user", "content": p.prompt}],
             "answer": None} for p in pairs]


def step_prompts(n_prompts, step, per_step, seed) -> list:
    """Indices of the prompts of step `step` (0-based): the pool in a seeded order, reshuffled
    (seed, pass) at each pass over it, so step k's prompts depend on nothing but (seed, k)."""
    out = []
    # Prompt k of the run is position k % n of pass k // n's shuffle: no state carried between steps.
    for k in range(step * per_step, (step + 1) * per_step):
        order = list(range(n_prompts))
        random.Random(f"online:{seed}:{k // n_prompts}").shuffle(order)
        out.append(order[k % n_prompts])
    return out
