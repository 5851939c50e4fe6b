"""A judge's verdicts as a policy's training signal (paper Eq. 5-6): the pure functions online.py
builds its DPO pairs and per-answer rewards with, from judgement records, whoever the judge is.

A judgement record is one verdict on a pair of distinct answers of a prompt, in one order:
  {"i", "j"       the two answers' indices among the prompt's distinct answers, i < j,
   "a"            the index shown as answer A,
   "verdict"      "A", "B" or None,
   "forced"       True when the verdict was forced from P(A) vs P(B) (the judge wrote none),
   "failed"       None, "no verdict" or "over-long" (a failure is masked: it counts for no answer),
   "rationale"}
A verdict of None that is not a failure is a tie (two answers of equal score: the truth's two
wrong answers, or equal Bradley-Terry scores).
"""
import hashlib
import math
import random


def seed_of(*parts) -> int:
    """A seed from its parts (a stable hash), so every draw is named by what it is for."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")


def judge_items(texts_per_prompt, both_orders, seed, step, ids):
    """The (prompt, i, j, i-is-A) items to judge: every pair of distinct answers of each prompt,
    in both orders (or in one order drawn from (seed, step, prompt, pair))."""
    items = []
    for q, texts in enumerate(texts_per_prompt):
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if both_orders:
                    items += [(q, i, j, True), (q, i, j, False)]
                else:
                    # One order per pair, drawn from what the pair is, so a rerun shows the same order.
                    items.append((q, i, j,
                                  random.Random(seed_of("order", seed, step, ids[q], i, j)).random() < 0.5))
    return items


def judge_by_scores(scores, texts_per_prompt, both_orders, seed, step, ids):
    """Judgement records from a score per answer (the BT RM, or the truth as 1 / 0): the higher
    score wins in whichever order the pair is shown; equal scores tie."""
    out = [[] for _ in texts_per_prompt]
    for q, i, j, i_is_a in judge_items(texts_per_prompt, both_orders, seed, step, ids):
        a = i if i_is_a else j
        si, sj = scores[q][i], scores[q][j]
        winner = i if si > sj else j if sj > si else None
        verdict = None if winner is None else "A" if winner == a else "B"
        out[q].append({"i": i, "j": j, "a": a, "verdict": verdict, "forced": False, "failed": None,
                       "rationale": ""})
    return out


def winner_of(rec):
    """The unique-answer index a judgement prefers; None for a tie or a failure."""
    if rec["verdict"] is None:
        return None
    b = rec["j"] if rec["a"] == rec["i"] else rec["i"]
    return rec["a"] if rec["verdict"] == "A" else b


def pair_tallies(n_texts, recs) -> dict:
    """Per unordered pair (i, j), i < j: {"wins": [i's, j's] (a tie is half a win each), "valid"
    (judgements not failed), "failed", "outcomes" (winner or None per valid judgement)}."""
    tally = {(i, j): {"wins": [0.0, 0.0], "valid": 0, "failed": 0, "outcomes": []}
             for i in range(n_texts) for j in range(i + 1, n_texts)}
    for r in recs:
        t = tally[(r["i"], r["j"])]
        if r["failed"]:
            t["failed"] += 1  # masked: it counts for nothing, least of all for one of the answers
            continue
        # A tie gives each answer half a win, so the two answers' wins always add up to `valid`.
        w = winner_of(r)
        t["valid"] += 1
        t["outcomes"].append(w)
        if w is None:
            t["wins"][0] += 0.5
            t["wins"][1] += 0.5
        else:
            t["wins"][0 if w == r["i"] else 1] += 1
    return tally


def preference_pairs(n_texts, recs, rule="agree") -> list:
    """DPO pairs (winner, loser) of distinct answers: with rule "agree", a pair every one of whose
    judgements was valid and named the same winner; with "pooled", a pair whose valid judgements
    (failures masked) give one answer more wins. Ties and undecided pairs give none."""
    out = []
    for (i, j), t in pair_tallies(n_texts, recs).items():
        if not t["valid"]:
            continue
        # "agree" asks for a unanimous judge (both orders alike); "pooled" lets the majority decide.
        if rule == "agree":
            if t["failed"] or any(w is None for w in t["outcomes"]) or len(set(t["outcomes"])) != 1:
                continue
            w = t["outcomes"][0]
        elif rule == "pooled":
            wi, wj = t["wins"]
            if wi == wj:
                continue
            w = i if wi > wj else j
        else:
            raise ValueError(f"unknown pair rule {rule!r} (agree or pooled)")
        out.append((w, j if w == i else i))
    return out


def answer_rewards(n_texts, recs, scores=None) -> dict:
    """Per distinct answer: "eq6", Eq. 6's log(p / (1 - p)) against each other answer, averaged
    over the others with a valid judgement, p = (wins + 1/2) / (valid + 1) pooled over the orders
    (with BT `scores`, p = sigmoid(r_i - r_j): the reward is r_i - r_j); "winrate", the share of
    its valid round-robin judgements it won (ties half). A lone answer gets 0 and 0.5."""
    eq6, win = [[] for _ in range(n_texts)], [[] for _ in range(n_texts)]
    for (i, j), t in pair_tallies(n_texts, recs).items():
        if not t["valid"]:
            continue  # every judgement of the pair failed: the pair says nothing
        if scores is not None:
            lo = float(scores[i] - scores[j])
        else:
            # Half a win added to each side keeps p off 0 and 1, so the log-odds stay finite.
            p = (t["wins"][0] + 0.5) / (t["valid"] + 1)
            lo = math.log(p / (1 - p))
        eq6[i].append(lo)
        eq6[j].append(-lo)
        win[i].append(t["wins"][0] / t["valid"])
        win[j].append(t["wins"][1] / t["valid"])
    return {"eq6": [sum(x) / len(x) if x else 0.0 for x in eq6],
            "winrate": [sum(x) / len(x) if x else 0.5 for x in win]}


def reward_pair(rewards) -> list:
    """The best answer over the worst, by a per-answer reward (first index on ties); none when
    every answer has the same reward."""
    if len(rewards) < 2:
        return []
    best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))
    worst = min(range(len(rewards)), key=lambda k: (rewards[k], k))
    return [(best, worst)] if rewards[best] > rewards[worst] else []


def judgement_stats(recs_per_prompt) -> dict:
    """The judge's health over a step: judgements, failure and forced rates, agreement between the
    two orders of a pair (both valid), and the share of decided verdicts that are "A" (0.5: no
    position bias)."""
    n = failed = forced = a = decided = agree = both = 0
    for recs in recs_per_prompt:
        by_pair = {}
        for r in recs:
            n += 1
            failed += bool(r["failed"])
            forced += bool(r["forced"])
            if r["verdict"] is not None:
                decided += 1
                a += r["verdict"] == "A"
            by_pair.setdefault((r["i"], r["j"]), {}).setdefault(r["a"] == r["i"], []).append(r)
        # Order agreement: the same pair shown both ways, both judgements valid, the same winner.
        for orders in by_pair.values():
            if len(orders) == 2:
                for x, y in zip(orders[True], orders[False]):
                    if not x["failed"] and not y["failed"]:
                        both += 1
                        agree += winner_of(x) == winner_of(y)
    return {"judgements": n, "failure_rate": failed / n if n else None,
            "forced_rate": forced / n if n else None,
            "order_agreement": agree / both if both else None, "a_rate": a / decided if decided else None}


def truth_metrics(out_rows, key) -> dict:
    """Where the task knows the truth: the sampled answers' accuracy, the mean reward of right and
    of wrong answers, the judge's accuracy on judgements of a right against a wrong answer, and
    the DPO pairs chosen with, against and without (both wrong) the truth."""
    right = [row["right"][u] for row in out_rows for u in row["sample_of"]]
    rew = {True: [], False: []}
    judged = hit = with_t = against = neither = 0
    for row in out_rows:
        for u, ok in enumerate(row["right"]):
            rew[ok].append(row["rewards"][key][u])
        for rec in row["judgements"]:
            w = winner_of(rec)
            if row["right"][rec["i"]] != row["right"][rec["j"]] and not rec["failed"]:
                judged += 1
                hit += w is not None and row["right"][w]
        # A pair of two wrong answers teaches neither way; it is counted apart.
        for w, l in row["pairs"]:
            with_t += row["right"][w] and not row["right"][l]
            against += row["right"][l] and not row["right"][w]
            neither += not row["right"][w] and not row["right"][l]
    mean = [sum(v) / len(v) if v else None for v in (rew[True], rew[False])]
    return {"sampled_accuracy": sum(right) / len(right), "reward_right": mean[0], "reward_wrong": mean[1],
            "judge_truth_accuracy": hit / judged if judged else None, "pairs_with_truth": with_t,
            "pairs_against_truth": against, "pairs_both_wrong": neither}
