"""Judge and reward-model evaluation, and Best-of-N.

  python eval.py --model PATH|smollm2-135m-instruct --judge {genrm,cot,bt} --data FILE... \\
                 [--samples N] [--both-orders] [--limit K]
  python eval.py --model ... --judge genrm --best-of-n FILE

Accuracy per file and category, the RewardBench-style section score, maj@1 / maj@N for CoT judges
with parse-failure, forced-verdict and tie rates, position bias and swap consistency, and the
'pick the longer answer' baseline beside every accuracy. GenRM judges use Eq. 7's indicator-token
probabilities; rewards for Best-of-N use Eq. 6.
"""
import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import dist
import genrm
from data import LoadStats, load_pairs, load_tokenizer, pair_examples
from files import atomic_write, read_jsonl
from gguf import DEFAULT_MODEL
from kernels import pair_rewards
from model import Llama

SECTIONS = ("chat", "chat_hard", "safety", "reasoning")


def reasoning_half(pair_id: str) -> str:
    """RewardBench averages math (gsm8k) and code (hep-*) inside its reasoning section."""
    return "reasoning/math" if str(pair_id).startswith("gsm8k") else "reasoning/code"


def longer_wins(pair) -> float:
    """The length baseline on one pair: 1 if the chosen answer is longer, 0.5 on a tie."""
    a, b = len(pair.chosen), len(pair.rejected)
    return 1.0 if a > b else 0.5 if a == b else 0.0


# ----------------------------------------------------------------------------------------------
# judgements: one record per pair, {"order": {"A"|"B": judgement}} where the key says which
# letter the chosen answer had, and a judgement is {"votes": [[verdict, forced], ...]} (CoT),
# {"p": p(chosen > rejected)} (GenRM) or, for BT, the record holds {"margin": r_w - r_l}.

def judge_pairs(model, tok, pairs, judge, *, samples=1, both_orders=False, max_new_tokens=256,
                temperature=1.0, top_p=0.95, seed=0, batch_size=4, progress=True):
    orders = [True, False] if both_orders else [True]
    recs = [{"id": p.id, "category": p.category, "order": {}} for p in pairs]
    if judge == "bt":
        ex = pair_examples(tok, pairs, 10 ** 9, LoadStats())

        @torch.no_grad()
        def margins(exs):  # this rank's share (dist.shard_map)
            out = []
            for s in tqdm(range(0, len(exs), batch_size), desc="bt", disable=not progress, leave=False):
                rc, rr = pair_rewards(model, exs[s:s + batch_size], tok.pad_id)
                out += (rc - rr).cpu().tolist()
            return out
        for r, m in zip(recs, dist.shard_map(margins, ex)):
            r["margin"] = m
        return recs
    pref = genrm.genrm_preference(model, tok, pairs, both_orders=both_orders, batch_size=batch_size) \
        if judge == "genrm" else None
    for o in orders:
        key = genrm.label(o)
        if judge == "genrm":
            for r, x in zip(recs, pref["p_a_chosen" if o else "p_b_chosen"].tolist()):
                r["order"][key] = {"p": x}
        elif judge == "cot":
            # seeds are per pair (seed + index), identical for both orders' calls and any batch size
            res = genrm.cot_judge_sharded(model, tok, pairs, [o] * len(pairs), n=samples, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, seed=seed, prompt_batch=batch_size,
                                          progress=progress)
            for r, s in zip(recs, res):
                r["order"][key] = {"votes": [[x["verdict"], x["forced"]] for x in s]}
        else:
            raise ValueError(f"unknown judge {judge!r}")
    return recs


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


def summarize(pairs, recs) -> dict:
    """Accuracy (maj@1, maj@N, and pooled over both orders) overall and per category, the length
    baseline, RewardBench sections, position bias, swap consistency, parse-failure / forced / tie
    rates. For maj@1 / maj@N a pair judged in both orders counts as the mean of its two judgements."""
    cats = defaultdict(lambda: defaultdict(list))
    pos = {"A": [], "B": []}
    swaps, n_votes, n_fail, n_forced, n_tie, n_none, n_judg = [], 0, 0, 0, 0, 0, 0
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
            if len(out) == 2:
                both = pooled_outcome(r["order"])
                if out["A"].picked is not None and out["B"].picked is not None:
                    # consistent when both orders pick the same underlying answer
                    swaps.append(float((out["A"].picked == "A") == (out["B"].picked == "B")))
        cs = ["all", p.category or "none"]
        if p.category == "reasoning":
            cs.append(reasoning_half(p.id))
        for c in cs:
            cats[c]["acc1"].append(acc1)
            cats[c]["accN"].append(accN)
            cats[c]["longer"].append(longer_wins(p))
            if both is not None:
                cats[c]["both"].append(both)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"n": len(pairs), "per_category": {c: {"n": len(v["accN"]), "maj@1": mean(v["acc1"]), "maj@N": mean(v["accN"]),
                                                 "pooled": mean(v["both"]), "longer": mean(v["longer"])}
                                             for c, v in sorted(cats.items())}}
    pc = out["per_category"]
    if "reasoning/math" in pc and "reasoning/code" in pc:
        for k in ("maj@1", "maj@N", "pooled", "longer"):
            m, c = pc["reasoning/math"][k], pc["reasoning/code"][k]
            pc["reasoning"][k] = None if m is None or c is None else (m + c) / 2
    secs = [s for s in SECTIONS if s in pc]
    if secs:
        out["sections"] = {k: mean([pc[s][k] for s in secs]) for k in ("maj@N", "longer")}
        out["sections"]["present"] = secs
    if n_judg:
        out["position"] = {"acc_chosen_as_A": mean(pos["A"]), "acc_chosen_as_B": mean(pos["B"]),
                           "swap_consistency": mean(swaps)}
        out["tie_rate"] = n_tie / n_judg
        out["no_verdict_rate"] = n_none / n_judg
    if n_votes:
        out["parse_failure_rate"] = n_fail / n_votes
        out["forced_rate"] = n_forced / n_votes
    return out


def judge_report(model, tok, pairs, *, title, samples, max_new_tokens, seed, progress=True):
    """The CoT judge's held-out accuracy (both orders, forced verdicts counted), printed beside
    the length baseline: train.py's before/after lines. Returns the summary."""
    recs = judge_pairs(model, tok, pairs, "cot", samples=samples, both_orders=True, batch_size=16,
                       max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    s = summarize(pairs, recs)
    al = s["per_category"]["all"]
    if dist.rank() == 0:
        print(f"[{title}] held-out judge accuracy (CoT, maj@{samples}, both orders, n={len(pairs)}): "
              f"{al['maj@N']:.3f}  | length baseline {al['longer']:.3f}  | forced verdicts "
              f"{s.get('forced_rate', 0):.2f}, parse failures {s.get('parse_failure_rate', 0):.2f}")
    return s


def markdown(results: dict) -> str:
    lines = []
    for f, r in results.items():
        lines.append(f"### {f}\n\n| category | n | maj@1 | maj@N | both orders pooled | longer answer |\n"
                     "|---|---|---|---|---|---|")
        for c, v in r["per_category"].items():
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {c} | {v['n']} | {fmt(v['maj@1'])} | {fmt(v['maj@N'])} | {fmt(v['pooled'])} | "
                         f"{fmt(v['longer'])} |")
        extra = {k: r[k] for k in ("sections", "position", "tie_rate", "no_verdict_rate", "parse_failure_rate", "forced_rate") if k in r}
        if extra:
            lines.append("\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in extra.items()))
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Best-of-N

def load_candidates(path, limit=None, seed=0):
    rows = []
    for n, r in read_jsonl(path):
        for k in ("prompt", "candidates", "reference_output"):
            if k not in r:
                raise ValueError(f"{path}:{n}: missing field '{k}'")
        for i, c in enumerate(r["candidates"]):
            if "output" not in c or "judge_pref" not in c:
                raise ValueError(f"{path}:{n}: candidates[{i}] needs 'output' and 'judge_pref'")
        rows.append(r)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    return rows


def best_of_n_picks(scores):
    """Index of the best candidate per prompt (first on ties)."""
    return [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]


def best_of_n_report(rows, picks, seed=0) -> dict:
    """Mean stored score of the picks beside a uniformly random pick (its expectation) and the oracle."""
    sc = [[c["judge_pref"] for c in r["candidates"]] for r in rows]
    return {"n": len(rows), "picked": sum(s[i] for s, i in zip(sc, picks)) / len(rows),
            "random": sum(sum(s) / len(s) for s in sc) / len(rows),
            "oracle": sum(max(s) for s in sc) / len(rows)}


def best_of_n(model, tok, rows, *, batch_size=4, progress=True):
    """Score every candidate pairwise against the reference answer with the GenRM judge, both
    orders, as the Eq. 6 reward log(p / (1 - p)); pick the highest (pairwise-vs-reference, not a
    knockout: N judgements per prompt instead of N - 1 dependent rounds)."""
    scores = []
    for r in tqdm(rows, desc="best-of-n", disable=not progress):
        ps = [genrm.Pair(id="", prompt=r["prompt"], chosen=c["output"], rejected=r["reference_output"])
              for c in r["candidates"]]
        p = genrm.genrm_preference(model, tok, ps, both_orders=True, batch_size=batch_size)["p"]
        scores.append(genrm.reward_eq6(p).tolist())
    return scores


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF-format model directory or 'smollm2-135m-instruct'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one (default: the model's)")
    ap.add_argument("--judge", choices=("genrm", "cot", "bt"), default="cot",
                    help="genrm: indicator-token probability (Fig. 8); cot: sampled rationales + verdict "
                         "(Fig. 6); bt: scalar-head reward difference")
    ap.add_argument("--data", nargs="+", default=[], help="preference JSONL file(s)")
    ap.add_argument("--samples", type=int, default=1, help="CoT samples per pair (maj@N)")
    ap.add_argument("--both-orders", action="store_true", help="judge each pair with the chosen answer as A and as B")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="CoT rationale length cap")
    ap.add_argument("--temperature", type=float, default=1.0, help="CoT sampling temperature (paper: 1.0)")
    ap.add_argument("--top-p", type=float, default=0.95, help="CoT nucleus sampling (paper: 0.95)")
    ap.add_argument("--limit", type=int, default=None, help="seeded random subset of this many pairs per file")
    ap.add_argument("--seed", type=int, default=0, help="seed for subsets and sampling")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per forward / prefill (results do not depend on it)")
    ap.add_argument("--best-of-n", metavar="FILE", help="candidates JSONL (e.g. bon_alpacaeval_tulu2dpo13b.jsonl)")
    ap.add_argument("--out", default=None, help="run directory (default runs/eval-<time>)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    a = ap.parse_args(argv)
    if not a.data and not a.best_of_n:
        ap.error("give --data FILE... and/or --best-of-n FILE")
    dist.init()  # under torchrun, judgements are spread over the ranks; rank 0 writes
    out = Path(a.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = Llama.from_pretrained(a.model, dtype=dtype, device=a.device).eval()
    if a.judge == "bt" and model.score is None:
        sys.exit(f"{a.model}: --judge bt needs a checkpoint with a scalar head (score.weight); train one with --method bt_rm")
    tok = load_tokenizer(a.tokenizer or a.model)
    results, t0 = {}, time.time()
    for f in a.data:
        st = LoadStats()
        pairs = load_pairs(f, limit=a.limit, seed=a.seed, stats=st)
        print(f"{f}: {st}")
        recs = judge_pairs(model, tok, pairs, a.judge, samples=a.samples, both_orders=a.both_orders,
                           max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                           seed=a.seed, batch_size=a.batch_size, progress=not a.no_progress)
        results[Path(f).name] = summarize(pairs, recs)
        if dist.rank() == 0:
            atomic_write(out / f"judgements_{Path(f).stem}.jsonl",
                         lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in recs)))
    if a.best_of_n:
        rows = load_candidates(a.best_of_n, limit=a.limit, seed=a.seed)
        scores = best_of_n(model, tok, rows, batch_size=a.batch_size, progress=not a.no_progress)
        results["best_of_n"] = best_of_n_report(rows, best_of_n_picks(scores))
    summary = {"args": vars(a), "seconds": time.time() - t0, "results": results}
    md = markdown({k: v for k, v in results.items() if k != "best_of_n"})
    if "best_of_n" in results:
        md += "\n### best-of-n\n\n" + json.dumps(results["best_of_n"]) + "\n"
    if dist.rank() == 0:
        atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
        atomic_write(out / "results.md", lambda p: Path(p).write_text(md))
        print(md)
        print(f"written: {out}/results.json, {out}/results.md")
    dist.finish()
    return summary


if __name__ == "__main__":
    main()
