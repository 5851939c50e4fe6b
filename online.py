"""Online DPO with a judge as the reward: the GenRM judge inside a policy's training loop (paper
Sec. 2, Eq. 5-6; issue 27).

Each step takes a batch of training prompts, and
  1. the policy samples `--samples` answers to each (temperature 1, sample.generate);
  2. the judge compares every two different answers of a prompt (identical answers are a tie and
     are not judged) with the CoT judge prompt (Fig. 6), in both A/B orders by default. A verdict
     the judge did not write is forced from P(A) vs P(B) after the verdict prefix and counted
     (--force argmax), or with --force none left as a failure; a failure (no verdict, or a judge
     input longer than the judge's positions) is masked and counted, never mapped to an answer
     (the bug that made TRL's OnlineDPOTrainer call the second completion "chosen" when its judge
     returned -1);
  3. the judgements become what the policy learns from (--online-reward):
       pairs    (default) DPO pairs: i over j when every order judged it so (--pair-rule agree,
                the default) or when the valid judgements of the pair, pooled over both orders,
                prefer i (--pair-rule pooled); every decided pair of a prompt is used;
       eq6      a reward per answer: Eq. 6's log(p / (1 - p)) against each other answer of the
                prompt, averaged over them, p = (wins + 1/2) / (valid judgements + 1) pooled over
                both orders (the half vote each way keeps p off 0 and 1; for the Bradley-Terry RM
                p = sigmoid(r_i - r_j), so the reward is r_i - mean r_j);
       winrate  a reward per answer: its share of wins in the round robin among the prompt's
                answers (a tie is half a win, a masked judgement does not count);
     with eq6 / winrate the prompt's best answer is chosen and its worst rejected (one pair per
     prompt, when their rewards differ), as TRL's online DPO does with a reward model;
  4. one AdamW step of DPO (Eq. 9's loss, losses.step_dpo) on all the step's pairs, against the
     reference: the policy the run started from.

Reward sources (--judge): `trained` (the small world's STaR-DPO judge, built by the main job's
steps when it is not cached yet), `base` (the world's base CoT judge), `bt` (a Bradley-Terry RM,
train.train_on objective bt_rm on the world's training pairs, from the base judge; an answer's
reward is its scalar score), `truth` (the small world's ground truth: the right answer beats a
wrong one, two wrong answers tie: the ceiling). Outside the small world (--policy / --prompts
given) the CoT judges are --judge-model (default SmolLM2-135M-Instruct) and there is no truth.

The small world's policy task (world.py, "the policy task"): the question is the user turn, the
answer is the sum's digits least significant first; the policy is a 0.2M-parameter Llama
pretrained here on sloppy answers (a carry forgotten with probability 0.6) and cached under
$GENRM_CACHE/world/policy-<hash>. Its held-out accuracy (greedy, on questions never trained on)
is reported before and after with 95% intervals and a paired bootstrap, and so is where judge and
truth disagree: pairs chosen against the truth, and how often the judge prefers the final
policy's wrong held-out answers to the right ones (reward hacking).

A run directory keeps args.json, metrics.jsonl (one row per step), steps/NNNNNN.jsonl (each
prompt's answers, judgements, rewards and pairs), eval_before.json / eval_after.json,
report.json, the final policy/ and, while it runs, the last two checkpoints ckpt-NNNNNN/ (policy
and optimizer); every random choice is seeded by (--seed, step, prompt), so a killed run started
again with --resume continues from its last checkpoint and computes what an uninterrupted run
computes. Under torchrun the sampling, judging and reference log-probs are spread over the
ranks (dist.shard_map) and every rank computes the same policy update.

  python3 online.py                          # the small world, the trained judge
  python3 online.py --judge truth --out runs/online_truth
  python3 online.py --policy smollm2-135m-instruct --prompts assets/data/train_small.jsonl \\
      --steps 2 --prompts-per-step 2 --samples 2
"""
import argparse
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch

import dist
import genrm
import stats
import world
from data import Example, LoadStats, Pair, completion_ids, load_pairs, load_tokenizer, pad
from eval import HelpFormatter, judge_positions, number
from files import DEFAULT_MODEL, check_run_dir, read_json, read_jsonl, write_json, write_jsonl
from fit import _loadable_checkpoint, prune_checkpoints, save_checkpoint, save_model
from kernels import pair_logps
from losses import make_step_dpo
from model import Llama
from rewards import (
    answer_rewards,
    judge_by_scores,
    judge_items,
    judgement_stats,
    preference_pairs,
    reward_pair,
    seed_of,
    truth_metrics,
    winner_of,
)
from sample import generate

JUDGES = ("trained", "base", "bt", "truth")
REWARDS = ("pairs", "eq6", "winrate")


@dataclass
class OnlineConfig:
    """Everything an online run is told; written to args.json."""
    judge: str = "trained"            # reward source, JUDGES
    judge_model: str | None = None    # the judge's model directory (default: per --judge)
    policy: str | None = None         # None: the small world's pretrained policy
    prompts: str | None = None        # pair JSONL whose prompts are asked (None: the world's questions)
    out: str | None = None
    resume: bool = False
    # the loop
    steps: int = 60
    prompts_per_step: int = 32
    samples: int = 4                  # answers sampled per prompt
    online_reward: str = "pairs"      # REWARDS
    pair_rule: str = "agree"          # pairs: "agree" (every order) or "pooled" (more valid votes)
    both_orders: bool = True
    force: str = "argmax"             # a missing verdict: forced from P(A) vs P(B), or "none": a failure
    judge_samples: int = 1            # CoT rationales per (pair, order), each one judgement
    judge_max_new_tokens: int = 96
    max_new_tokens: int = 8           # the policy's answer cap
    temperature: float = 1.0
    top_p: float = 1.0
    # DPO
    lr: float = 1e-4                  # at 5e-4 the trained judge was hacked within 10 steps (RESULTS.md)
    beta: float = 0.1
    dpo_nll: float = 0.0
    warmup_steps: int = 5
    clip: float = 1.0
    micro_batch: int = 64             # pairs per forward; the step's loss is the mean over all its pairs
    # data
    train_questions: int = 5000       # the small world's question pool (cycled, reshuffled per pass)
    eval_questions: int = 500         # held-out questions for the before / after accuracy
    limit: int | None = None          # real prompts: a seeded subset
    # runtime
    seed: int = 0
    save_every: int = 5
    device: str = "cpu"
    dtype: str = "float32"            # bfloat16: sample in bf16, train under bf16 autocast
    threads: int | None = None
    sample_batch: int = 64            # prompts per sampling batch
    no_progress: bool = False

    @property
    def world(self) -> bool:
        return self.policy is None and self.prompts is None


# fields a resume may change: they do not change what the run computes
RESUME_FREE = ("out", "resume", "device", "threads", "no_progress", "save_every", "sample_batch")


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
    return world.cache_dir() / "world" / f"{kind}-{key}"


def world_policy(threads=None, log=print) -> str:
    """The small world's pretrained policy: the SFT loop (train.train_on) from a random
    initialisation on sloppy answers (world.POLICY_RECIPE), built once under
    $GENRM_CACHE/world/policy-<hash>; a killed build resumes from its checkpoint."""
    import train
    recipe, d = world.POLICY_RECIPE, world.policy_dir()
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
    for k in range(step * per_step, (step + 1) * per_step):
        order = list(range(n_prompts))
        random.Random(f"online:{seed}:{k // n_prompts}").shuffle(order)
        out.append(order[k % n_prompts])
    return out


# ----------------------------------------------------------------------------------------------
# sampling the policy

def _generate_share(model, tok, n, max_new_tokens, temperature, top_p, prompt_batch, items):
    """generate on this rank's share of (prompt ids, seed) items: the sampled token ids per item."""
    if not items:
        return []
    outs = generate(model, [p for p, _ in items], n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, stop_ids=tok.stop_ids, seed=[s for _, s in items], prompt_batch=prompt_batch,
                    progress=False)
    return [[c.tokens for c in o] for o in outs]


def sample_answers(model, tok, rows, cfg: OnlineConfig, step, n, temperature):
    """n answers to each prompt row from the policy, seeded by (seed, step, prompt id); spread
    over the ranks. Returns per row a list of n dicts {"text", "ids", "correct"}."""
    prompts = [tok.apply_chat(r["messages"]) for r in rows]
    items = [(p, seed_of("policy", cfg.seed, step, r["id"])) for p, r in zip(prompts, rows)]
    share = partial(_generate_share, model, tok, n, cfg.max_new_tokens, temperature, cfg.top_p,
                    cfg.sample_batch)
    out = []
    for r, samples in zip(rows, dist.shard_map(share, items)):
        ans = []
        for ids in samples:
            text = tok.decode(ids)
            ans.append({"text": text, "ids": ids,
                        "correct": None if r["answer"] is None else text == r["answer"]})
        out.append(ans)
    return out


def unique_answers(answers) -> tuple:
    """The distinct answer texts of a prompt, in first-seen order, and each sample's index among
    them: identical answers are one answer (a tie, never judged)."""
    texts, of = [], []
    for a in answers:
        if a["text"] not in texts:
            texts.append(a["text"])
        of.append(texts.index(a["text"]))
    return texts, of


# ----------------------------------------------------------------------------------------------
# judging (the judgement records are described in rewards.py)


def _cot_share(model, tok, cfg: OnlineConfig, work):
    """cot_judge on this rank's share of (Pair, i-is-A, seed) items."""
    if not work:
        return []
    return genrm.cot_judge(model, tok, [p for p, _, _ in work], [o for _, o, _ in work], n=cfg.judge_samples,
                           max_new_tokens=cfg.judge_max_new_tokens, temperature=1.0, top_p=0.95,
                           seed=[s for _, _, s in work], force=None if cfg.force == "none" else "argmax",
                           prompt_batch=cfg.sample_batch, progress=False)


def judge_cot(model, tok, rows, texts_per_prompt, cfg: OnlineConfig, step):
    """The CoT judge (Fig. 6) on every item of judge_items, seeded per (seed, step, prompt, pair,
    order); an input longer than the judge's positions is a failure ("over-long"), not judged.
    Returns per prompt its list of judgement records."""
    items = judge_items(texts_per_prompt, cfg.both_orders, cfg.seed, step, [r["id"] for r in rows])
    limit = model.config.max_position_embeddings
    work, where = [], []
    out = [[] for _ in rows]
    for q, i, j, i_is_a in items:
        r, texts = rows[q], texts_per_prompt[q]
        # A multi-turn prompt is the judge's context.
        chat = [m for m in r["messages"] if m["role"] != "system"]
        pair = Pair(id=r["id"], prompt=r["question"], chosen=texts[i], rejected=texts[j],
                    messages=chat if len(chat) > 1 else None)
        base = {"i": i, "j": j, "a": i if i_is_a else j}
        if judge_positions(tok, pair, "cot", cfg.judge_max_new_tokens) > limit:
            out[q] += [dict(base, verdict=None, forced=False,
                            failed="over-long", rationale="")] * cfg.judge_samples
            continue
        work.append((pair, i_is_a, seed_of("judge", cfg.seed, step, r["id"], i, j, int(i_is_a))))
        where.append((q, base))
    res = dist.shard_map(partial(_cot_share, model, tok, cfg), work)
    for (q, base), samples in zip(where, res):
        for s in samples:
            failed = None if s["verdict"] is not None else "no verdict"
            out[q].append(dict(base, verdict=s["verdict"], forced=s["forced"], failed=failed,
                               rationale=s["completion"]))
    return out


def _scores_share(model, tok, items):
    """Bradley-Terry scores of this rank's share of (prompt ids, answer ids) items."""
    out = []
    for s in range(0, len(items), 64):
        chunk = items[s:s + 64]
        idx, valid = pad([p + a for p, a in chunk], tok.pad_id)
        dev = model.lm_head.weight.device
        with torch.no_grad():
            out += model.reward(idx.to(dev), valid.to(dev)).cpu().tolist()
    return out


def bt_scores(model, tok, rows, texts_per_prompt):
    """Each distinct answer's Bradley-Terry score (Eq. 1), its input built as the RM was trained
    (data.pair_examples: the prompt as a user turn, the answer then end-of-turn)."""
    items = [(tok.apply_chat([{"role": "user", "content": r["question"]}]), completion_ids(tok, t))
             for r, texts in zip(rows, texts_per_prompt) for t in texts]
    flat = dist.shard_map(partial(_scores_share, model, tok), items)
    out, k = [], 0
    for texts in texts_per_prompt:
        out.append(flat[k:k + len(texts)])
        k += len(texts)
    return out


# ----------------------------------------------------------------------------------------------
# the DPO step

@torch.no_grad()
def reference_logps(ref, examples, pad_id, micro_batch, bf16):
    """Attach the reference's summed and averaged log-probs of chosen and rejected to each
    example (losses.step_dpo reads e.ref), one packed pass per micro-batch."""
    dev = ref.lm_head.weight.device
    for s in range(0, len(examples), micro_batch):
        b = examples[s:s + micro_batch]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            c, r = (x.float().cpu() for x in pair_logps(ref, b, pad_id))       # [len(b)] each
        for k, e in enumerate(b):
            e.ref = {"sum": (float(c[k]), float(r[k])),
                     "avg": (float(c[k]) / len(e.completion), float(r[k]) / len(e.rejected))}


def dpo_gradients(policy, examples, pad_id, cfg: OnlineConfig):
    """The gradient of the mean DPO loss (Eq. 9; RPO's NLL term with --dpo-nll) over all the
    step's pairs, micro-batch by micro-batch (each micro-batch's loss sum over the step's pair
    count, so the result does not depend on --micro-batch). Every rank computes all of it (the
    update is identical on every rank; no gradient is reduced). Returns (loss, share with h > 0)."""
    step_fn = make_step_dpo(cfg.beta, 0.0, "sigmoid", cfg.dpo_nll)
    dev = policy.lm_head.weight.device
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    total, right = 0.0, 0.0
    for s in range(0, len(examples), cfg.micro_batch):
        with autocast:
            loss_sum, correct = step_fn(policy, examples[s:s + cfg.micro_batch], pad_id)
        (loss_sum / len(examples)).backward()
        total += float(loss_sum.detach())
        right += float(correct)
    return total / len(examples), right / len(examples)


def dpo_examples(tok, rows, answers, texts_per_prompt, of_per_prompt, pairs_per_prompt):
    """Example rows for DPO: per pair, the prompt's token ids and the sampled token ids of the
    first sample of the chosen and of the rejected answer (what the policy drew)."""
    ex = []
    for r, ans, of, pairs in zip(rows, answers, of_per_prompt, pairs_per_prompt):
        prompt = tok.apply_chat(r["messages"])
        first = {u: of.index(u) for u in set(of)}
        for w, l in pairs:
            ex.append(Example(prompt, list(ans[first[w]]["ids"]), list(ans[first[l]]["ids"])))
    return ex


# ----------------------------------------------------------------------------------------------
# one online step

def online_step(policy, judge, tok, jtok, rows, cfg: OnlineConfig, step):
    """Sample, judge, pair and score the answers to the step's prompt rows. Returns (per prompt
    records for steps/NNNNNN.jsonl, DPO examples, metrics)."""
    answers = sample_answers(policy, tok, rows, cfg, step, cfg.samples, cfg.temperature)
    uniq = [unique_answers(a) for a in answers]
    texts = [t for t, _ in uniq]
    ids = [r["id"] for r in rows]
    scores = None
    if cfg.judge == "truth":
        truth = [[float(t == r["answer"]) for t in ts] for r, ts in zip(rows, texts)]
        recs = judge_by_scores(truth, texts, cfg.both_orders, cfg.seed, step, ids)
    elif cfg.judge == "bt":
        scores = bt_scores(judge, jtok, rows, texts)
        recs = judge_by_scores(scores, texts, cfg.both_orders, cfg.seed, step, ids)
    else:
        recs = judge_cot(judge, jtok, rows, texts, cfg, step)

    out_rows, pairs_per_prompt = [], []
    for q, r in enumerate(rows):
        rew = answer_rewards(len(texts[q]), recs[q], None if scores is None else scores[q])
        if cfg.online_reward == "pairs":
            pairs = preference_pairs(len(texts[q]), recs[q], cfg.pair_rule)
        else:
            pairs = reward_pair(rew[cfg.online_reward])
        pairs_per_prompt.append(pairs)
        right = None if r["answer"] is None else [t == r["answer"] for t in texts[q]]
        out_rows.append({"id": r["id"], "question": r["question"], "answers": texts[q],
                         "sample_of": uniq[q][1],
                         "ids": [a["ids"] for a in answers[q]], "right": right, "judgements": recs[q],
                         "rewards": rew, "pairs": pairs,
                         **({"bt_scores": scores[q]} if scores is not None else {})})
    examples = dpo_examples(tok, rows, answers, texts, [u[1] for u in uniq], pairs_per_prompt)
    m = {"prompts": len(rows), "distinct_answers": sum(len(t) for t in texts) / len(rows),
         "pairs": len(examples), **judgement_stats(recs)}
    key = "winrate" if cfg.online_reward == "winrate" else "eq6"
    per_sample = [row["rewards"][key][u] for row in out_rows for u in row["sample_of"]]
    m["mean_reward"] = sum(per_sample) / len(per_sample)
    if rows[0]["answer"] is not None:
        m.update(truth_metrics(out_rows, key))
    return out_rows, examples, m


# ----------------------------------------------------------------------------------------------
# held-out evaluation

def evaluate(policy, tok, rows, cfg: OnlineConfig) -> dict:
    """The policy's greedy answers to the held-out questions and their accuracy (Wilson 95%)."""
    answers = sample_answers(policy, tok, rows, cfg, "eval", 1, 0.0)
    texts = [a[0]["text"] for a in answers]
    right = [int(t == r["answer"]) for t, r in zip(texts, rows)]
    return {"ids": [r["id"] for r in rows], "answers": texts, "right": right,
            "accuracy": sum(right) / len(right), "ci": list(stats.accuracy_ci(right))}


def fooled_rate(judge, jtok, rows, answers, cfg: OnlineConfig, judge_kind) -> dict:
    """Reward hacking probe: for each held-out question the policy answered wrongly, the judge
    compares that answer with the right one (both orders); the share of valid judgements that
    prefer the policy's wrong answer (a judge the policy has learned to fool prefers more)."""
    wrong = [(r, a) for r, a in zip(rows, answers) if a != r["answer"]]
    if not wrong or judge_kind == "truth":
        return {"wrong": len(wrong), "judgements": 0, "fooled": None}
    qs = [r for r, _ in wrong]
    texts = [[a, r["answer"]] for r, a in wrong]  # index 0: the policy's wrong answer, 1: the truth
    if judge_kind == "bt":
        recs = judge_by_scores(bt_scores(judge, jtok, qs, texts), texts, True, cfg.seed, "fooled",
                               [r["id"] for r in qs])
    else:
        recs = judge_cot(judge, jtok, qs, texts, cfg, "fooled")
    valid = [rec for rs in recs for rec in rs if not rec["failed"]]
    fooled = sum(winner_of(rec) == 0 for rec in valid)
    return {"wrong": len(wrong), "judgements": len(valid), "fooled": fooled / len(valid) if valid else None}


def paired_change(before, after, log) -> dict:
    """after - before on the same held-out questions: the paired bootstrap's 95% interval and p."""
    d = stats.paired_bootstrap([after["right"]], [before["right"]], seed=0)
    p = f"p = {d['p']:.4f}" if d["p"] > 0 else f"p < {2 / stats.RESAMPLES:g}"
    log(f"[policy after - before] {d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] "
        f"(paired bootstrap over {len(after['right'])} held-out questions, {p})")
    return d


# ----------------------------------------------------------------------------------------------
# the run

def _resume_conflicts(cfg: OnlineConfig, old: dict) -> list:
    """The arguments of cfg that differ from the run's args.json and would change what it computes."""
    new, default = asdict(cfg), asdict(OnlineConfig())
    return [f"--{k.replace('_', '-')} {old.get(k, default[k])} -> {v}" for k, v in new.items()
            if k not in RESUME_FREE and old.get(k, default[k]) != v]


def _check_run_dir(cfg: OnlineConfig, out: Path):
    """A new run needs an empty --out; --resume needs the arguments it was started with."""
    check_run_dir(out, cfg.resume, partial(_resume_conflicts, cfg))


def _load(path, cfg: OnlineConfig, train=False, score_head=None):
    dtype = torch.float32 if train or cfg.dtype == "float32" else torch.bfloat16
    m = Llama.from_pretrained(path, dtype=dtype, device=cfg.device, score_head=score_head)
    return m if train else m.eval()


def _fmt(m) -> str:
    """A step's metrics as one log line."""
    def f(k, spec):
        return "-" if m.get(k) is None else format(m[k], spec)
    s = (f"pairs {m['pairs']}, loss {f('loss', '.4f')}, agree {f('order_agreement', '.2f')}, A-rate "
         f"{f('a_rate', '.2f')}, forced {f('forced_rate', '.2f')}, failed {f('failure_rate', '.2f')}, reward "
         f"{f('mean_reward', '+.2f')}")
    if "sampled_accuracy" in m:
        s += (f", sampled acc {m['sampled_accuracy']:.3f}, reward right/wrong {f('reward_right', '+.2f')}/"
              f"{f('reward_wrong', '+.2f')}, judge-vs-truth {f('judge_truth_accuracy', '.2f')}, "
              f"pairs with/against/both-wrong {m['pairs_with_truth']}/{m['pairs_against_truth']}/"
              f"{m['pairs_both_wrong']}")
    return s + f" ({m['seconds']:.1f} s)"


def run(cfg: OnlineConfig, out, log=print) -> dict:
    """The online loop in run directory `out` (see the module docstring); returns the report."""
    out = Path(out)
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_run_dir(cfg, out)
    # Every rank checks --out before rank 0 creates it below; without the barrier a fast rank 0
    # could write args.json before a slower rank looked, which would then refuse the new run.
    dist.barrier()
    if cfg.judge == "truth" and not cfg.world:
        raise SystemExit("error: --judge truth needs the small world (real prompts have no truth)")
    policy_path = world_policy(cfg.threads, log) if cfg.world else cfg.policy or DEFAULT_MODEL
    judge_path = judge_model_path(cfg, log)
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "args.json").exists():
            write_json(out / "args.json",
                       dict(asdict(cfg), policy_path=str(policy_path), judge_path=judge_path))
    dist.barrier()
    tok = load_tokenizer(policy_path)
    jtok = load_tokenizer(judge_path) if judge_path else None
    train_rows, eval_rows = load_prompts(cfg, "train"), load_prompts(cfg, "id")
    log(f"online DPO: policy {policy_path}, judge {cfg.judge} ({judge_path or 'the truth'}), "
        f"{len(train_rows)} training prompts, {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
        f"{cfg.samples} answers, reward "
        f"{cfg.online_reward}" + (f" ({cfg.pair_rule})" if cfg.online_reward == "pairs" else ""))

    ref = _load(policy_path, cfg)
    judge = _load(judge_path, cfg, score_head=True if cfg.judge == "bt" else None) if judge_path else None
    report = {"judge": cfg.judge, "judge_path": judge_path, "policy_path": str(policy_path),
              "run_dir": str(out)}
    if eval_rows:
        before_f = out / "eval_before.json"
        if not before_f.exists():
            before = evaluate(ref, tok, eval_rows, cfg)
            before["fooled"] = fooled_rate(judge, jtok, eval_rows, before["answers"], cfg, cfg.judge)
            if dist.rank() == 0:
                write_json(before_f, before)
            dist.barrier()
        report["before"] = read_json(before_f)
        b = report["before"]
        log(f"[policy before] held-out accuracy (greedy, n={len(eval_rows)}): {b['accuracy']:.3f} "
            f"[{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]")

    # The policy and its optimizer: AdamW at --lr after a linear warmup, one update per step;
    # resumed from the last checkpoint (fit.save_checkpoint's layout) when there is one.
    policy = _load(policy_path, cfg, train=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt,
                                              partial(warmup_cosine_const, warmup_steps=cfg.warmup_steps))
    start, history = 0, []
    found = _loadable_checkpoint(out, log)
    if found is not None:
        ck, state, loaded = found
        dist.load_full_state_dict(policy, loaded.state_dict())
        dist.load_optimizer_state(policy, opt, state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        if (out / "metrics.jsonl").exists():
            history = [r for _, r in read_jsonl(out / "metrics.jsonl") if r["step"] <= start]
        log(f"resumed from {ck} at step {start}/{cfg.steps}")

    done = (out / "policy" / "config.json").exists()  # a finished run, resumed: report it again
    if done:
        policy = _load(out / "policy", cfg)
        history = [r for _, r in read_jsonl(out / "metrics.jsonl")]
        start = cfg.steps
    for step in range(start, cfg.steps):
        ts = time.time()
        policy.eval()
        rows = [train_rows[i] for i in step_prompts(len(train_rows), step, cfg.prompts_per_step, cfg.seed)]
        step_rows, examples, m = online_step(policy, judge, tok, jtok, rows, cfg, step + 1)
        # One DPO update on all the step's pairs against the reference (none: the policy stays).
        policy.train()
        if examples:
            reference_logps(ref, examples, tok.pad_id, cfg.micro_batch, cfg.dtype == "bfloat16")
            m["loss"], m["dpo_accuracy"] = dpo_gradients(policy, examples, tok.pad_id, cfg)
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip))
        else:
            m["loss"] = m["dpo_accuracy"] = m["grad_norm"] = None
        m["lr"] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        m = {"step": step + 1, **m, "seconds": round(time.time() - ts, 2)}
        history.append(m)
        if dist.rank() == 0:
            write_jsonl(out / "steps" / f"{step + 1:06d}.jsonl", step_rows)
        log(f"step {step + 1}/{cfg.steps}: " + _fmt(m))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            if dist.rank() == 0:
                write_jsonl(out / "metrics.jsonl", history)
            save_checkpoint(out, policy, opt, sched, step + 1)
    policy.eval()
    if not done:
        save_model(policy, out / "policy", tok)
        dist.barrier()

    report["steps"] = summarize_steps(history)
    if eval_rows:
        after = evaluate(policy, tok, eval_rows, cfg)
        after["fooled"] = fooled_rate(judge, jtok, eval_rows, after["answers"], cfg, cfg.judge)
        if dist.rank() == 0:
            write_json(out / "eval_after.json", after)
        report["after"] = after
        log(f"[policy after] held-out accuracy (greedy, n={len(eval_rows)}): {after['accuracy']:.3f} "
            f"[{after['ci'][0]:.2f}, {after['ci'][1]:.2f}]")
        report["after_minus_before"] = paired_change(report["before"], after, log)
        fb, fa = report["before"]["fooled"], after["fooled"]
        if fa["fooled"] is not None:
            log(f"[reward hacking] the judge prefers the policy's wrong held-out answer to the right one in "
                f"{'-' if fb['fooled'] is None else round(fb['fooled'], 3)} of {fb['judgements']} judgements "
                f"before, {fa['fooled']:.3f} of {fa['judgements']} after; "
                "DPO pairs chosen against the truth: "
                f"{report['steps']['pairs_against_truth']} of {report['steps']['pairs']} "
                f"({report['steps']['pairs_both_wrong']} with both answers wrong)")
    prune_checkpoints(out)
    report.update(final_policy=str(out / "policy"), seconds=round(time.time() - t0, 1))
    if dist.rank() == 0:
        write_json(out / "report.json", {k: v for k, v in report.items() if k not in ("before", "after")}
                   | {"before": _short(report.get("before")), "after": _short(report.get("after"))})
        log(f"final policy: {out / 'policy'}\nreport: {out / 'report.json'}  ({report['seconds']} s)")
    return report


def _short(ev):
    return None if ev is None else {k: ev[k] for k in ("accuracy", "ci", "fooled")}


def warmup_cosine_const(step, warmup_steps):
    """The learning-rate factor: linear warmup over warmup_steps, then constant (an online run has
    no fixed end to anneal to)."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


def summarize_steps(history) -> dict:
    """Totals over the run's steps (what the report and RESULTS quote)."""
    def total(k):
        return sum(m.get(k) or 0 for m in history)

    def mean(k):
        xs = [m[k] for m in history if m.get(k) is not None]
        return sum(xs) / len(xs) if xs else None
    return {"steps": len(history), "pairs": total("pairs"), "pairs_with_truth": total("pairs_with_truth"),
            "pairs_against_truth": total("pairs_against_truth"),
            "pairs_both_wrong": total("pairs_both_wrong"),
            "judgements": total("judgements"), "failure_rate": mean("failure_rate"),
            "forced_rate": mean("forced_rate"),
            "order_agreement": mean("order_agreement"), "a_rate": mean("a_rate"),
            "judge_truth_accuracy": mean("judge_truth_accuracy"),
            "sampled_accuracy_first": history[0].get("sampled_accuracy") if history else None,
            "sampled_accuracy_last": history[-1].get("sampled_accuracy") if history else None,
            "seconds": round(total("seconds"), 1)}


# ----------------------------------------------------------------------------------------------
# command line (train.py --method online_dpo hands its arguments to main below)

def add_arguments(ap, D: OnlineConfig = OnlineConfig()):
    """The online loop's options, on an argparse parser (online.py's own, or train.py's)."""
    g = ap.add_argument_group("online DPO")
    g.add_argument("--judge", choices=JUDGES, default=D.judge,
                   help="reward source: the small world's trained STaR-DPO judge, its base CoT judge, "
                        "a Bradley-Terry RM, or the ground truth (outside the world: trained/base = the "
                        "CoT judge --judge-model)")
    g.add_argument("--judge-model", default=D.judge_model,
                   help="the judge's model directory (default: per --judge; "
                        f"outside the small world {DEFAULT_MODEL})")
    g.add_argument("--policy", default=D.policy,
                   help="policy model directory or name (default: the small world's "
                        f"pretrained policy; with --prompts, {DEFAULT_MODEL})")
    g.add_argument("--prompts", default=D.prompts,
                   help="pair JSONL whose prompts the policy answers (default: the "
                        "small world's questions)")
    g.add_argument("--steps", type=number(int, 1), default=D.steps, help="online steps (one DPO update each)")
    g.add_argument("--prompts-per-step", type=number(int, 1), default=D.prompts_per_step,
                   help="prompts per step")
    g.add_argument("--samples", type=number(int, 2), default=D.samples, help="answers sampled per prompt")
    g.add_argument("--online-reward", choices=REWARDS, default=D.online_reward,
                   help="pairs: DPO pairs from the pairwise judgements (--pair-rule); eq6: Eq. 6's "
                        "log(p/(1-p)) per answer, pooled over both orders; winrate: round-robin win rate "
                        "per answer (eq6/winrate: the best answer over the worst)")
    g.add_argument("--pair-rule", choices=("agree", "pooled"), default=D.pair_rule,
                   help="pairs: a pair when every order names the same winner, or when the pooled valid "
                        "judgements prefer one answer")
    g.add_argument("--both-orders", action=argparse.BooleanOptionalAction, default=D.both_orders,
                   help="judge each pair with each answer as A (else one seeded order)")
    g.add_argument("--force", choices=("argmax", "none"), default=D.force,
                   help="a rationale without a verdict: force one from P(A) vs P(B) (counted), or none: "
                        "a masked failure (counted)")
    g.add_argument("--judge-samples", type=number(int, 1), default=D.judge_samples,
                   help="CoT rationales per pair and order, each a judgement")
    g.add_argument("--judge-max-new-tokens", type=number(int, 1), default=D.judge_max_new_tokens,
                   help="rationale length cap")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=D.max_new_tokens,
                   help="policy answer length cap")
    g.add_argument("--temperature", type=number(float, above=0), default=D.temperature,
                   help="policy sampling")
    g.add_argument("--top-p", type=number(float, above=0, high=1), default=D.top_p,
                   help="policy sampling nucleus")
    g.add_argument("--lr", type=number(float, above=0), default=D.lr, help="policy learning rate (AdamW)")
    g.add_argument("--beta", type=number(float, above=0), default=D.beta, help="DPO beta")
    g.add_argument("--dpo-nll", type=number(float, 0), default=D.dpo_nll,
                   help="RPO: weight of the chosen NLL")
    g.add_argument("--warmup-steps", type=number(int, 0), default=D.warmup_steps,
                   help="linear warmup, then constant")
    g.add_argument("--clip", type=number(float, above=0), default=D.clip, help="gradient-norm clip")
    g.add_argument("--micro-batch", type=number(int, 1), default=D.micro_batch,
                   help="pairs per forward (the update is the same for any value)")
    g.add_argument("--train-questions", type=number(int, 1), default=D.train_questions,
                   help="small world: the pool of training questions")
    g.add_argument("--eval-questions", type=number(int, 1), default=D.eval_questions,
                   help="small world: held-out questions for the before/after accuracy")
    g.add_argument("--limit", type=number(int, 1), default=D.limit, help="--prompts: a seeded subset")
    g.add_argument("--save-every", type=number(int, 0), default=D.save_every,
                   help="checkpoint every N steps (and at the end)")
    g.add_argument("--sample-batch", type=number(int, 1), default=D.sample_batch,
                   help="prompts per sampling batch")
    return ap


def parse_args(argv=None) -> OnlineConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default runs/online_dpo_<judge>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint")
    add_arguments(ap)
    g = ap.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every draw (prompts, answers, orders, rationales)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16: sample in bf16, train under bf16 autocast (default: float32 in the "
                        "small world, bfloat16 with real models)")
    g.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true",
                   help="(no progress bars are drawn; kept for train.py's flags)")
    a = vars(ap.parse_args(argv))
    if a["dtype"] is None:
        a["dtype"] = "float32" if a["policy"] is None and a["prompts"] is None else "bfloat16"
    if a["policy"] is not None and a["prompts"] is None:
        ap.error("argument --policy: needs --prompts (the small world's questions need its own policy)")
    if a["prompts"] is not None and a["max_new_tokens"] == OnlineConfig.max_new_tokens:
        a["max_new_tokens"] = 48  # real answers are longer than a sum
    known = {f.name for f in fields(OnlineConfig)}
    return OnlineConfig(**{k: v for k, v in a.items() if k in known})


def main(argv=None):
    cfg = parse_args(argv)
    rank, _ = dist.init()
    out = cfg.out or f"runs/online_dpo_{cfg.judge}"
    report = run(replace(cfg, out=str(out)), out, print if rank == 0 else silent)
    dist.finish()
    return report


def silent(*_):
    """The log of ranks other than 0."""


if __name__ == "__main__":
    main()
