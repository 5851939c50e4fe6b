"""The policy's answers and the judge's verdicts on them: sampling answers, CoT judgements and
Bradley-Terry scores spread over the ranks, and the held-out measures (accuracy, the reward-hacking
probe, the paired change).
"""
from functools import partial

import torch

import dist
import genrm
import stats
from data import Pair, completion_ids, pad
from eval import judge_positions
from online_config import OnlineConfig
from rewards import (
    judge_by_scores,
    judge_items,
    seed_of,
    winner_of,
)
from sample import generate

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
        # An answer is right when its text is exactly the row's answer (the small world's truth).
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
        # An input the judge cannot read whole is a failure, counted as such, never truncated.
        if judge_positions(tok, pair, "cot", cfg.judge_max_new_tokens) > limit:
            out[q] += [dict(base, verdict=None, forced=False,
                            failed="over-long", rationale="")] * cfg.judge_samples
            continue
        work.append((pair, i_is_a, seed_of("judge", cfg.seed, step, r["id"], i, j, int(i_is_a))))
        where.append((q, base))
    res = dist.shard_map(partial(_cot_share, model, tok, cfg), work)
    # Each rationale is a judgement; one that wrote no verdict (and was not forced) is a failure.
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
    # The flat list back into one list of scores per prompt.
    out, k = [], 0
    for texts in texts_per_prompt:
        out.append(flat[k:k + len(texts)])
        k += len(texts)
    return out


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
    # The truth is never fooled, and a policy that answers everything right leaves nothing to probe.
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
