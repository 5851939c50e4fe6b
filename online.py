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
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

import dist
from data import Example, load_tokenizer
from files import DEFAULT_MODEL, check_run_dir, read_json, read_jsonl, write_json, write_jsonl
from fit import prune_checkpoints, resume, save_checkpoint, save_model
from kernels import pair_logps
from losses import make_step_dpo
from model import Llama
from online_config import OnlineConfig, _resume_conflicts
from online_config import parse_args as _parse_args
from online_judge import (
    bt_scores,
    evaluate,
    fooled_rate,
    judge_cot,
    paired_change,
    sample_answers,
    unique_answers,  # noqa: F401  (tests call online.unique_answers)
)
from online_world import judge_model_path, load_prompts, step_prompts, world_policy
from rewards import (
    answer_rewards,
    judge_by_scores,
    judgement_stats,
    preference_pairs,
    reward_pair,
    truth_metrics,
)

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
    # 1. The policy answers; identical answers are one answer, never judged against each other.
    answers = sample_answers(policy, tok, rows, cfg, step, cfg.samples, cfg.temperature)
    uniq = [unique_answers(a) for a in answers]
    texts = [t for t, _ in uniq]
    ids = [r["id"] for r in rows]
    # 2. The judge gives its verdicts on every pair of distinct answers (or scores them).
    scores = None
    if cfg.judge == "truth":
        truth = [[float(t == r["answer"]) for t in ts] for r, ts in zip(rows, texts)]
        recs = judge_by_scores(truth, texts, cfg.both_orders, cfg.seed, step, ids)
    elif cfg.judge == "bt":
        scores = bt_scores(judge, jtok, rows, texts)
        recs = judge_by_scores(scores, texts, cfg.both_orders, cfg.seed, step, ids)
    else:
        recs = judge_cot(judge, jtok, rows, texts, cfg, step)

    # 3. The verdicts become DPO pairs and per-answer rewards (Eq. 5-6).
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
# the run

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
    start, history = resume(out, policy, opt, sched, cfg.steps, log)

    done = (out / "policy" / "config.json").exists()  # a finished run, resumed: report it again
    if done:
        policy = _load(out / "policy", cfg)
        history = [r for _, r in read_jsonl(out / "metrics.jsonl")]
        start = cfg.steps
    # Each step: the policy samples, the judge rewards, one DPO update, and a checkpoint now and then.
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

def parse_args(argv=None) -> OnlineConfig:
    """This script's command line -> OnlineConfig (online_config.parse_args, with this file's --help)."""
    return _parse_args(argv, description=__doc__)


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
