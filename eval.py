"""Judge and reward-model evaluation, and Best-of-N.

  python eval.py --model PATH|smollm2-135m-instruct --judge {genrm,cot,bt} --data FILE... \\
                 [--samples N] [--both-orders] [--limit K]
  python eval.py --model ... --judge genrm --best-of-n FILE

Judges every pair (both orders by default) with a CoT judge (sampled rationales + verdict,
Fig. 6), a GenRM judge (Eq. 7's indicator-token probabilities, Fig. 8) or a Bradley-Terry reward
model, and writes the judgements and their scores (scores.py: accuracy per file, category and
RewardBench section with 95% intervals, maj@1 / maj@N / maj@k, position bias, ...). Best-of-N
picks with the Eq. 6 reward.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dist
import genrm
import stats
from cli import HelpFormatter, number
from data import LoadStats, load_pairs, load_tokenizer, pair_examples, seeded_subset
from files import DEFAULT_MODEL, read_jsonl, require, write_json, write_jsonl, write_text
from kernels import pair_rewards
from model import Llama, check_pretrained
from scores import fmt_acc, markdown, summarize

# ----------------------------------------------------------------------------------------------
# judgements: one record per pair, {"order": {"A"|"B": judgement}} where the key says which
# letter the chosen answer had, and a judgement is {"votes": [[verdict, forced], ...]} (CoT),
# {"p": p(chosen > rejected)} (GenRM) or, for BT, the record holds {"margin": r_w - r_l}.

def judge_pairs(model, tok, pairs, judge, *, samples=1, both_orders=True, max_new_tokens=256,
                temperature=1.0, top_p=0.95, seed=0, batch_size=4, progress=True):
    """Judge every pair: in both orders (chosen as A, then as B), or with both_orders=False in one
    order per pair drawn with the seed (genrm.seeded_orders, as training draws them), so a
    position-biased judge is never scored on one position only. Pairs must fit the model's
    positions (fitting_pairs drops and counts the others). Returns one record per pair."""
    if len(fitting_pairs(model, tok, pairs, judge, max_new_tokens, LoadStats())) < len(pairs):
        raise ValueError(f"some pairs are longer than the model's {model.config.max_position_embeddings} "
                         "positions: drop them with eval.fitting_pairs first")
    recs = [{"id": p.id, "category": p.category, "order": {}} for p in pairs]
    # A reward model scores each answer on its own, so the order of the two never enters.
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
    order_sets = ([[True] * len(pairs), [False] * len(pairs)] if both_orders
                  else [genrm.seeded_orders(pairs, seed)])
    for orders in order_sets:  # orders[i]: the chosen answer of pair i is A
        if judge == "genrm":
            res = [{"p": x} for x in genrm.p_chosen(model, tok, pairs, orders, batch_size=batch_size,
                                                          progress=progress).tolist()]
        elif judge == "cot":
            # seeds are per pair (seed + index), identical for both orders' calls and any batch size
            res = genrm.cot_judge_sharded(model, tok, pairs, orders, n=samples, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, seed=seed,
                                          prompt_batch=batch_size, progress=progress)
            res = [{"votes": [[x["verdict"], x["forced"]] for x in s]} for s in res]
        else:
            raise ValueError(f"unknown judge {judge!r}")
        for r, o, j in zip(recs, orders, res):
            r["order"][genrm.label(o)] = j
    return recs


def judge_positions(tok, pair, judge, max_new_tokens) -> int:
    """Positions the judge needs for a pair, the longer of its two orders: the Fig. 8 prompt
    (GenRM), the Fig. 6 prompt + the rationale cap + a forced verdict's prefix (CoT), or the
    prompt + the longer answer (BT)."""
    if judge == "bt":
        return pair_examples(tok, [pair], 10 ** 9, LoadStats())[0].positions
    kind = "genrm" if judge == "genrm" else "cot"
    n = max(len(tok.apply_chat(genrm.judge_messages(pair, o, kind))) for o in (True, False))
    return n if judge == "genrm" else n + max_new_tokens + len(tok.encode(genrm.VERDICT_PREFIX))


def fitting_pairs(model, tok, pairs, judge, max_new_tokens, skips: LoadStats) -> list:
    """The pairs whose judge input fits the model's positions; the others are counted skips (the
    same rule for every judge, never scored past the positions the model was trained for)."""
    limit = model.config.max_position_embeddings
    keep = []
    for p in pairs:
        if judge_positions(tok, p, judge, max_new_tokens) > limit:
            skips.skip(f"over-long for the {judge} judge (> {limit} positions)")
        else:
            keep.append(p)
    skips.kept = len(keep)
    return keep


def judge_report(model, tok, pairs, *, title, samples, max_new_tokens, seed, prompt_batch=16, progress=True):
    """The CoT judge's held-out accuracy (both orders, forced verdicts counted), printed beside
    the length baseline: train.py's before/after lines. Returns the summary."""
    counts = LoadStats(read=len(pairs))
    pairs = fitting_pairs(model, tok, pairs, "cot", max_new_tokens, counts)  # over-long: counted skips
    if counts.skipped and dist.rank() == 0:
        print(f"[{title}] held-out pairs: {counts}")
    if not pairs:
        raise ValueError(f"no held-out pair fits the model's {model.config.max_position_embeddings} "
                         "positions")
    recs = judge_pairs(model, tok, pairs, "cot", samples=samples, both_orders=True, batch_size=prompt_batch,
                       max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    s = summarize(pairs, recs)
    al = s["per_category"]["all"]
    if dist.rank() == 0:
        print(f"[{title}] held-out judge accuracy (CoT, maj@{samples}, both orders, n={len(pairs)}): "
              f"{fmt_acc(al['maj@N'], al['ci']['maj@N'])}  | length baseline {al['longer']:.3f}  | "
              f"forced verdicts {s.get('forced_rate', 0):.2f}, "
              f"parse failures {s.get('parse_failure_rate', 0):.2f}")
    return s


def judge_change(before, after, log=print):
    """after - before on the same held-out pairs (maj@N, each pair the mean of its two orders),
    with the paired bootstrap's 95% interval and p-value (stats.paired_bootstrap)."""
    a, b = after["per_pair"], before["per_pair"]
    if a["id"] != b["id"]:  # cannot happen with one tokenizer; say so rather than pair the wrong ones
        log("[after - before] not paired: the evaluated pairs differ")
        return None
    # A pair without a verdict in either run has no difference; it is left out of both sides.
    keep = [i for i, (x, y) in enumerate(zip(a["maj@N"], b["maj@N"])) if x is not None and y is not None]
    d = stats.paired_bootstrap([[a["maj@N"][i] for i in keep]], [[b["maj@N"][i] for i in keep]], seed=0)
    log(f"[after - before] {d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] (paired bootstrap over "
        f"the {len(keep)} held-out pairs, p = {d['p']:.2f})")
    return d


# ----------------------------------------------------------------------------------------------
# Best-of-N

def load_candidates(path, limit=None, seed=0):
    """Best-of-N prompts, each with its candidates and the reference answer they are judged
    against; `limit`: a seeded random subset, as data.load_pairs."""
    rows = []
    for n, r in read_jsonl(path):
        require(r, ("prompt", "candidates", "reference_output"), f"{path}:{n}")
        for i, c in enumerate(r["candidates"]):
            if "output" not in c or "judge_pref" not in c:
                raise ValueError(f"{path}:{n}: candidates[{i}] needs 'output' and 'judge_pref'")
        rows.append(r)
    return seeded_subset(rows, limit, seed)


def best_of_n_picks(scores):
    """Index of the best candidate per prompt (first on ties)."""
    return [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]


def best_of_n_report(rows, picks, seed=0) -> dict:
    """Mean stored score of the picks beside a uniformly random pick (its expectation) and the oracle."""
    # judge_pref is the stored score of each candidate (by a stronger judge), the ground truth here.
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

# the command line

def _out_dir(out: Path):
    """eval.py's output directory: a finished evaluation (results.json), or a directory holding
    files eval.py did not write, is never overwritten; an interrupted one (judgements only) is
    started again with its old judgements removed, so none is left beside the new results."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"{out}: --out exists and is not a directory")
    other = sorted(f.name for f in out.iterdir() if not f.name.lstrip(".").startswith("judgements_"))
    if other:
        raise SystemExit(f"{out} exists and holds {other[0]}: pass a new --out "
                         "(a finished evaluation is never overwritten)")
    if dist.rank() == 0:
        for f in out.iterdir():
            f.unlink()
    dist.barrier()


def _read_inputs(a):
    """Every file eval.py reads, checked before it judges or writes anything: the model's config
    and weight headers, the tokenizer, the pair files (each must leave pairs to judge), the
    Best-of-N candidates. A bad one is a one-line error naming it (exit 1, no traceback)."""
    try:
        check_pretrained(a.model)
        tok = load_tokenizer(a.tokenizer or a.model)
        data = {}
        for f in a.data:
            counts = LoadStats()
            data[f] = (load_pairs(f, limit=a.limit, seed=a.seed, stats=counts), counts)
            if not data[f][0]:
                raise ValueError(f"{f}: no pairs to judge ({counts})")
        cands = load_candidates(a.best_of_n, limit=a.limit, seed=a.seed) if a.best_of_n else None
        if cands == []:
            raise ValueError(f"{a.best_of_n}: no Best-of-N prompts")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    return tok, data, cands


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="HF-format model directory or 'smollm2-135m-instruct'")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json or a directory holding one (default: the model's)")
    ap.add_argument("--judge", choices=("genrm", "cot", "bt"), default="cot",
                    help="genrm: indicator-token probability (Fig. 8); cot: sampled rationales + verdict "
                         "(Fig. 6); bt: scalar-head reward difference")
    ap.add_argument("--data", nargs="+", default=[], help="preference JSONL file(s)")
    ap.add_argument("--samples", type=number(int, 1), default=1, help="CoT samples per pair (maj@N)")
    o = ap.add_mutually_exclusive_group()
    o.add_argument("--both-orders", action="store_true",
                   help="judge each pair with the chosen answer as A and as B (the default; a judge that "
                        "always answers A scores 0.5)")
    o.add_argument("--single-order", action="store_true",
                   help="judge each pair once, the chosen answer's letter drawn per pair with --seed "
                        "(as in training)")
    ap.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="CoT rationale length cap")
    ap.add_argument("--temperature", type=number(float, 0), default=1.0,
                    help="CoT sampling temperature, 0 = greedy (paper: 1.0)")
    ap.add_argument("--top-p", type=number(float, above=0, high=1), default=0.95,
                    help="CoT nucleus sampling (paper: 0.95)")
    ap.add_argument("--limit", type=number(int, 1), default=None,
                    help="seeded random subset of this many pairs per file")
    ap.add_argument("--seed", type=int, default=0, help="seed for subsets, single orders and sampling")
    ap.add_argument("--batch-size", type=number(int, 1), default=4,
                    help="prompts per forward / prefill (results do not depend on it)")
    ap.add_argument("--best-of-n", metavar="FILE",
                    help="candidates JSONL (e.g. bon_alpacaeval_tulu2dpo13b.jsonl)")
    ap.add_argument("--out", default=None,
                    help="run directory (default runs/eval-<time>); a finished one is never overwritten")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="model dtype for judging (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--threads", type=number(int, 1), default=None,
                    help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.data and not a.best_of_n:
        ap.error("give --data FILE... and/or --best-of-n FILE")
    # Every input is read and checked first, so a bad file fails before any run directory exists.
    tok, data, cands = _read_inputs(a)
    dist.init()  # under torchrun, judgements are spread over the ranks; rank 0 writes
    out = Path(a.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    _out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model = Llama.from_pretrained(a.model, dtype=dtype, device=a.device).eval()
    if a.judge == "bt" and model.score is None:
        sys.exit(f"{a.model}: --judge bt needs a checkpoint with a scalar head (score.weight); "
                 "train one with --method bt_rm")
    results, t0 = {}, time.time()
    for f, (pairs, counts) in data.items():
        # Over-long pairs are dropped and counted as skips.
        pairs = fitting_pairs(model, tok, pairs, a.judge, a.max_new_tokens, counts)
        print(f"{f}: {counts}")
        if not pairs:
            raise SystemExit(f"error: {f}: no pair fits the model's "
                             f"{model.config.max_position_embeddings} positions")
        recs = judge_pairs(model, tok, pairs, a.judge, samples=a.samples, both_orders=not a.single_order,
                           max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                           seed=a.seed, batch_size=a.batch_size, progress=not a.no_progress)
        results[Path(f).name] = {**summarize(pairs, recs), "read": counts.read, "skipped": counts.skipped}
        if dist.rank() == 0:
            write_jsonl(out / f"judgements_{Path(f).stem}.jsonl", recs)
    if a.best_of_n:
        scores = best_of_n(model, tok, cands, batch_size=a.batch_size, progress=not a.no_progress)
        results["best_of_n"] = best_of_n_report(cands, best_of_n_picks(scores))
    # The results are written once, after every file is judged: a results.json means a finished run.
    summary = {"args": vars(a), "seconds": time.time() - t0, "results": results}
    md = markdown({k: v for k, v in results.items() if k != "best_of_n"})
    if "best_of_n" in results:
        md += "\n### best-of-n\n\n" + json.dumps(results["best_of_n"]) + "\n"
    if dist.rank() == 0:
        write_json(out / "results.json", summary)
        write_text(out / "results.md", md)
        print(md)
        print(f"written: {out}/results.json, {out}/results.md")
    dist.finish()
    return summary


if __name__ == "__main__":
    main()
