"""Judgements -> scores: each judgement (a pair in one order) scored, accuracy per file,
category and RewardBench section (reasoning = mean of math and code), maj@1 / maj@N and the maj@k
curve (the x-axis of the paper's Fig. 5), the score pooled over both orders, the 'pick the longer
answer' baseline, parse-failure / forced-verdict / tie rates, position bias and swap consistency;
every accuracy with its 95% interval (stats.py), per-pair scores kept for paired comparisons.

A judgement record (eval.judge_pairs) is one per pair, {"order": {"A"|"B": judgement}} where the
key says which letter the chosen answer had, and a judgement is {"votes": [[verdict, forced], ...]}
(CoT), {"p": p(chosen > rejected)} (GenRM); for BT the record holds {"margin": r_w - r_l}.
"""
import json
from collections import defaultdict
from typing import NamedTuple

import genrm
import stats

SECTIONS = ("chat", "chat_hard", "safety", "reasoning")
# Per-pair scores: first vote, majority, both orders pooled, length baseline.
METRICS = ("maj@1", "maj@N", "pooled", "longer")
KS = (1, 2, 4, 8, 16)  # the maj@k curve (paper Fig. 5): the majority of each judgement's first k votes


def reasoning_half(pair_id: str) -> str:
    """RewardBench averages math (gsm8k) and code (hep-*) inside its reasoning section."""
    return "reasoning/math" if str(pair_id).startswith("gsm8k") else "reasoning/code"


def longer_wins(pair) -> float:
    """The length baseline on one pair: 1 if the chosen answer is longer, 0.5 on a tie."""
    a, b = len(pair.chosen), len(pair.rejected)
    return 1.0 if a > b else 0.5 if a == b else 0.0


class Outcome(NamedTuple):
    """One judgement (one pair in one order) scored."""
    maj1: float           # 1.0 when the first vote (or p > 0.5) picked the chosen answer
    majN: float           # 1.0 when the majority of the votes picked it
    status: str           # "ok", "tie" or "no-verdict" (genrm.majority_vote)
    picked: str | None    # the letter the judge picked at maj@N, None on a tie / no verdict


def judgement_outcome(j, key) -> Outcome:
    """Score judgement j made with the chosen answer as letter `key`."""
    if "p" in j:
        picked_chosen = j["p"] > 0.5
        letter = key if picked_chosen else ("B" if key == "A" else "A")
        return Outcome(float(picked_chosen), float(picked_chosen), "ok", letter)
    votes = [v for v, _ in j["votes"]]
    win, _, status = genrm.majority_vote(votes)
    return Outcome(float(votes[0] == key), float(win == key), status, win)


def pooled_outcome(order) -> float:
    """One pair judged in both orders, the position bias averaged out: GenRM averages the two
    p(chosen > rejected); CoT pools the votes of both orders (a tie, or no verdict either way,
    counts 0.5). An always-"A" judge scores exactly 0.5 here, whatever the data."""
    js = list(order.values())
    if "p" in js[0]:
        x = sum(j["p"] for j in js) / len(js)
    else:
        n = sum(v is not None for j in js for v, _ in j["votes"])
        x = sum(v == k for k, j in order.items() for v, _ in j["votes"]) / n if n else 0.5
    return 1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0


def pair_group(p) -> str:
    """A pair's group: its category, the reasoning section split into its math and code halves."""
    return reasoning_half(p.id) if p.category == "reasoning" else (p.category or "none")


def section_weights(groups) -> dict[str, float]:
    """Each pair group's weight in the RewardBench score: the mean of the sections present, the
    reasoning section itself the mean of its math and code halves present (groups: pair_group)."""
    # A section's weight is shared by its groups present; an absent section takes no weight.
    present = sorted(set(groups))
    secs = [[g for g in present if g.split("/")[0] == s] for s in SECTIONS]
    secs = [gs for gs in secs if gs]
    return {g: 1 / len(secs) / len(gs) for gs in secs for g in gs}


def grouped_scores(scores, groups, weights=None):
    """(strata, stratum weights) for stats: all scores as one stratum, or one stratum per weighted
    group (section_weights). None scores (no pooled score for a pair judged in one order) are
    dropped; None when a stratum is left empty."""
    if weights is None:
        st, w = [[x for x in scores if x is not None]], [1.0]
    else:
        st = [[x for x, g2 in zip(scores, groups) if g2 == g and x is not None] for g in weights]
        w = list(weights.values())
    return None if any(not s for s in st) else (st, w)


def _accuracy(scores, groups, weights=None):
    """(accuracy, 95% interval) of per-pair scores: the plain mean with stats.accuracy_ci, or with
    group weights the weighted mean of group means with the stratified bootstrap."""
    g = grouped_scores(scores, groups, weights)
    if g is None:
        return None, None
    st, w = g
    if weights is None:
        return sum(st[0]) / len(st[0]), list(stats.accuracy_ci(st[0]))
    return sum(wg * sum(s) / len(s) for wg, s in zip(w, st)), list(stats.bootstrap_ci(st, w))


def _accuracies(pp, idx, weights=None) -> dict:
    """Every accuracy of the pairs idx of per-pair scores pp, with its interval under "ci"."""
    groups = [pp["group"][i] for i in idx]
    out, ci = {"n": len(idx)}, {}
    for m in METRICS:
        out[m], ci[m] = _accuracy([pp[m][i] for i in idx], groups, weights)
    if pp["maj@k"]:
        curve = {k: _accuracy([v[i] for i in idx], groups, weights) for k, v in pp["maj@k"].items()}
        out["maj@k"], ci["maj@k"] = ({k: a for k, (a, _) in curve.items()},
                                     {k: c for k, (_, c) in curve.items()})
    out["ci"] = ci
    return out


def _mean(xs):
    """The mean of a list, None for an empty one (no judgement in that order)."""
    return sum(xs) / len(xs) if xs else None


def _majk(j, key, k) -> float:
    """1.0 when the majority of judgement j's first k votes picked the chosen answer (`key`);
    a tie or no verdict among them counts 0, as for maj@N."""
    win, _, _ = genrm.majority_vote([v for v, _ in j["votes"][:k]])
    return float(win == key)


def summarize(pairs, recs) -> dict:
    """Accuracy (maj@1, maj@N, pooled over both orders, and the maj@k curve for k in KS up to the
    votes taken) overall and per category, each with its 95% interval under "ci" (stats.accuracy_ci;
    RewardBench's reasoning and section means: the stratified bootstrap), the length baseline,
    RewardBench sections, position bias, swap consistency, parse-failure / forced / tie rates, and
    the per-pair scores ("per_pair", in the order of `pairs`) for paired comparisons. For maj@1 /
    maj@N / maj@k a pair judged in both orders counts as the mean of its two judgements."""
    # the curve needs votes in every judgement (GenRM's p and BT's margin have none)
    n_min = min((len(j.get("votes", ())) for r in recs for j in r.get("order", {"bt": {}}).values()),
                default=0)
    pp = {"id": [], "group": [], **{m: [] for m in METRICS}, "maj@k": {str(k): [] for k in KS if k <= n_min}}
    pos = {"A": [], "B": []}
    swaps, n_votes, n_fail, n_forced, n_tie, n_none, n_judg = [], 0, 0, 0, 0, 0, 0
    # Score each pair: its judgements in each order, then the counts behind the judge's diagnostics.
    for p, r in zip(pairs, recs):
        both = None
        if "margin" in r:
            acc1 = accN = float(r["margin"] > 0)
        else:
            out = {k: judgement_outcome(j, k) for k, j in r["order"].items()}
            acc1 = sum(o.maj1 for o in out.values()) / len(out)
            accN = sum(o.majN for o in out.values()) / len(out)
            for k, o in out.items():
                pos[k].append(o.majN)
                n_judg += 1
                n_tie += o.status == "tie"
                n_none += o.status == "no-verdict"
                j = r["order"][k]
                if "votes" in j:
                    n_votes += len(j["votes"])
                    n_fail += sum(v is None for v, _ in j["votes"])
                    n_forced += sum(bool(f) for _, f in j["votes"])
            for k, v in pp["maj@k"].items():
                v.append(sum(_majk(j, key, int(k)) for key, j in r["order"].items()) / len(out))
            # Only a pair judged in both orders has a pooled score and a swap-consistency outcome.
            if len(out) == 2:
                both = pooled_outcome(r["order"])
                if out["A"].picked is not None and out["B"].picked is not None:
                    # consistent when both orders pick the same underlying answer
                    swaps.append(float((out["A"].picked == "A") == (out["B"].picked == "B")))
        for m, x in zip(("id", "group", *METRICS), (p.id, pair_group(p), acc1, accN, both, longer_wins(p))):
            pp[m].append(x)
    # Then accuracies per group of pairs: all of them, each category, each reasoning half.
    members = defaultdict(list)
    for i, p in enumerate(pairs):
        for c in {"all", p.category or "none", pair_group(p)}:
            members[c].append(i)
    pc = {c: _accuracies(pp, idx) for c, idx in sorted(members.items())}
    if "reasoning/math" in pc and "reasoning/code" in pc:  # RewardBench: the mean of the two halves
        pc["reasoning"] = _accuracies(pp, members["reasoning"],
                                      section_weights(["reasoning/math", "reasoning/code"]))
    out = {"n": len(pairs), "per_category": pc}
    # The RewardBench score weighs its sections equally, whatever their numbers of pairs.
    secs = [s for s in SECTIONS if s in pc]
    if secs:
        idx = [i for s in secs for i in members[s]]
        out["sections"] = {**_accuracies(pp, idx, section_weights(pp["group"][i] for i in idx)),
                           "present": secs}
    if n_judg:
        out["position"] = {"acc_chosen_as_A": _mean(pos["A"]), "acc_chosen_as_B": _mean(pos["B"]),
                           "swap_consistency": _mean(swaps)}
        out["tie_rate"] = n_tie / n_judg
        out["no_verdict_rate"] = n_none / n_judg
    if n_votes:
        out["parse_failure_rate"] = n_fail / n_votes
        out["forced_rate"] = n_forced / n_votes
    out["per_pair"] = pp
    return out


def fmt_acc(x, ci=None) -> str:
    """An accuracy cell: "0.531 [0.47, 0.59]" (the 95% interval), "0.531" without one, "-" for none."""
    if x is None:
        return "-"
    return f"{x:.3f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def fmt_minutes(seconds) -> str:
    """A wall-time cell in minutes; "-" for none."""
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def markdown(results: dict) -> str:
    """Per eval file: every accuracy with its 95% interval per category (the RewardBench section
    mean last), the maj@k curve when more than one k was taken, and the judge diagnostics."""
    lines = []
    for f, r in results.items():
        rows = list(r["per_category"].items()) + ([("RewardBench sections (mean)", r["sections"])]
                                                  if "sections" in r else [])
        lines.append(f"### {f}\n\n| category | n | maj@1 | maj@N | both orders pooled | longer answer |\n"
                     "|---|---|---|---|---|---|")
        for c, v in rows:
            lines.append(f"| {c} | {v['n']} | "
                         + " | ".join(fmt_acc(v[m], v["ci"][m]) for m in METRICS) + " |")
        ks = list(rows[0][1].get("maj@k", {})) if rows else []
        if len(ks) > 1:
            lines.append("\n| category | " + " | ".join(f"maj@{k}" for k in ks) + " |\n|---|"
                         + "---|" * len(ks))
            for c, v in rows:
                lines.append(f"| {c} | "
                             + " | ".join(fmt_acc(v["maj@k"][k], v["ci"]["maj@k"][k]) for k in ks) + " |")
        extra = {k: r[k]
                 for k in ("position", "tie_rate", "no_verdict_rate", "parse_failure_rate", "forced_rate")
                 if k in r}
        if extra:
            lines.append("\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in extra.items()))
        lines.append("")
    return "\n".join(lines)
