"""The paper's comparison (Fig. 2) at small scale: every method trained on the same AlpacaEval
training pairs, every judge evaluated on the same held-out in-distribution pairs and the two
out-of-distribution sets (RewardBench-like sections, HH harmless), one table.

  python3 compare.py                       # the subsets shipped in assets/compare, defaults below
  python3 compare.py --train 96 --id 64 --rb-per-section 12 --hh 32 --cot-samples 4   # smaller
  python3 compare.py --data-dir ../shared/data --train 1000 ...   # subsets drawn from the full data
  python3 compare.py --build-assets        # rebuild assets/compare from ../shared/data (deterministic)

By default the pairs come from assets/compare/ (seeded subsets of the staged data at the default
sizes, with their PROVENANCE.md), so a clone needs nothing else; smaller sizes take seeded subsets
of those. Each step is `train.py` or `eval.py` run as a subprocess, so what it measures is exactly
what those commands do. Steps whose report/results file exists are skipped and an interrupted
training run is resumed, so a killed comparison continues where it stopped. Output in --out: data/
(the exact subsets used), train/<method>/, eval/<row>/, comparison.json and comparison.md. Every
accuracy carries its 95% interval and every trained judge is compared, on the same pairs, with the
base judge of its kind (paired bootstrap, stats.py).
"""
import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import compare_world
import stats
from files import read_jsonl, write_json, write_jsonl, write_text
from scores import KS, SECTIONS, fmt_acc, fmt_minutes, grouped_scores, reasoning_half, section_weights

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "shared" / "data"   # the full staged data (--data-dir, --build-assets)
ASSETS = HERE / "assets" / "compare"     # the shipped subsets (the default)
SOURCES = {"train": "train_alpacaeval_gpt4.jsonl", "id": "test_id_alpacaeval_gpt4.jsonl",
           "rewardbench": "ood_rewardbench_like.jsonl", "hh_harmless": "ood_hh_harmless.jsonl"}
STAR = ("star_sft", "star_dpo")          # iterative methods: --iterations x --star-epochs
LENGTH = "length baseline (longer answer wins)"

# (row name, train.py --method or None for the base model, eval.py --judge, compared with: the
# base judge of its kind; BT, which has no base judge, with the length baseline it may have learned)
ROWS = [("GenRM (base, zero-shot)", None, "genrm", None),
        ("LLM-as-a-judge (base, CoT)", None, "cot", None),
        ("Bradley-Terry RM", "bt_rm", "bt", LENGTH),
        ("GenRM (Eq. 7)", "genrm", "genrm", "GenRM (base, zero-shot)"),
        ("STaR-SFT", "star_sft", "cot", "LLM-as-a-judge (base, CoT)"),
        ("STaR-DPO", "star_dpo", "cot", "LLM-as-a-judge (base, CoT)"),
        ("STaR-Rationalizer", "rationalizer", "cot", "LLM-as-a-judge (base, CoT)")]


def stratified(rows, group, counts: dict, seed):
    """counts[g] rows of each group g, seeded, in file order. Rows of groups not in counts are
    left out; a group with fewer rows than asked is an error."""
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[group(r)].append(i)
    keep = []
    # Each group draws from its own seeded generator, so one group's size never changes another's draw.
    for g, n in sorted(counts.items()):
        if len(by[g]) < n:
            raise ValueError(f"group {g or 'all'!r} has {len(by[g])} pairs, {n} asked")
        keep += random.Random(f"{seed}:{g}").sample(by[g], n)
    return [rows[i] for i in sorted(keep)]


def rb_group(r):
    """RewardBench sections, reasoning split into its math and code halves (scores.reasoning_half)."""
    return reasoning_half(r["id"]) if r.get("category") == "reasoning" else r.get("category", "")


def whole_file(r):
    """One group: every row of the file."""
    return ""


def plan(a) -> dict:
    """subset name -> (group of a row, pairs per group) at the sizes asked."""
    rb = {s: a.rb_per_section for s in SECTIONS if s != "reasoning"}
    rb |= {"reasoning/math": a.rb_per_section // 2, "reasoning/code": a.rb_per_section // 2}
    return {"train": (whole_file, {"": a.train}), "id": (whole_file, {"": a.id}),
            "rewardbench": (rb_group, rb), "hh_harmless": (whole_file, {"": a.hh})}


def _subset(src: Path, group, counts, seed) -> list:
    try:
        return stratified([r for _, r in read_jsonl(src)], group, counts, seed)
    except ValueError as e:
        hint = " (assets/compare holds the default sizes: pass --data-dir with the full data)" \
            if src.parent == ASSETS else ""
        raise SystemExit(f"{src}: {e}{hint}") from None


def build_subsets(a, d: Path, src: dict) -> dict:
    """The exact train / eval subsets of the files src (name -> path), written once to d so every
    method sees the same pairs; a resumed comparison must ask for the sizes it was started with."""
    out = {}
    for name, (group, counts) in plan(a).items():
        dst = d / f"{name}.jsonl"
        if not dst.exists():
            write_jsonl(dst, _subset(Path(src[name]), group, counts, a.seed))
        # A subset written by an earlier invocation must be the one this invocation asks for.
        have = dict(Counter(group(r) for _, r in read_jsonl(dst)))
        if have != counts:
            raise SystemExit(f"{dst}: holds {have} pairs per group, {counts} asked: this --out was started "
                             "with other sizes (give those, or a new --out)")
        out[name] = dst
    return out


def build_assets(a, data_dir: Path, dst: Path):
    """`--build-assets`: the seeded subsets of the full data in data_dir at the sizes asked,
    written (replaced) in dst with a PROVENANCE.md; the same inputs give the same bytes."""
    if not (data_dir / "PROVENANCE.md").exists():
        raise SystemExit(f"{data_dir / 'PROVENANCE.md'}: not found (--data-dir must be the full staged data)")
    for name, (group, counts) in plan(a).items():
        write_jsonl(dst / f"{name}.jsonl", _subset(data_dir / SOURCES[name], group, counts, a.seed))
    write_text(dst / "PROVENANCE.md", provenance(a, data_dir, dst))


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(a, data_dir: Path, dst: Path) -> str:
    """assets/compare/PROVENANCE.md: how each subset was drawn, counts and checksums, then the
    sources' own table rows and sections (licences, labels, inputs) from data_dir/PROVENANCE.md."""
    cmd = (f"python3 compare.py --build-assets --seed {a.seed} --train {a.train} --id {a.id} "
           f"--rb-per-section {a.rb_per_section} --hh {a.hh}")
    lines = ["# Pairs for compare.py (the paper's comparison at small scale)", "",
             f"Built by `{cmd}` from the staged preference data (`../shared/data`, whose PROVENANCE.md is "
             "quoted below). Each file is a seeded stratified sample of its source (`compare.stratified`: "
             f"per group, `random.Random(f\"{{seed}}:{{group}}\").sample`, seed {a.seed}, kept in file "
             "order), one pair per line with every field of the source row; the same command on the same "
             "sources gives the same bytes. `compare.py` reads these files unless given `--data-dir`.", "",
             "| file | pairs | per group | source | source sha256 | sha256 |", "|---|---|---|---|---|---|"]
    for name, (group, _) in plan(a).items():
        f = dst / f"{name}.jsonl"
        per = Counter(group(r) for _, r in read_jsonl(f))
        groups = ", ".join(f"{g} {n}" for g, n in sorted(per.items())) if len(per) > 1 else "-"
        lines.append(f"| `{f.name}` | {sum(per.values())} | {groups} | `{SOURCES[name]}` | "
                     f"`{_sha256(data_dir / SOURCES[name])}` | `{_sha256(f)}` |")
    # Then the sources' own rows and sections, quoted from the staged data's PROVENANCE.md.
    src = (data_dir / "PROVENANCE.md").read_text().splitlines()
    table = [ln for ln in src if ln.startswith("| file |") or ln.startswith("|---")][:2]
    table += [ln for ln in src if any(ln.startswith(f"| `{s}` |") for s in SOURCES.values())]
    lines += ["", "## The sources (quoted from ../shared/data/PROVENANCE.md)", "", *table]
    for s in SOURCES.values():
        i = src.index(f"### {s}")
        j = next((k for k in range(i + 1, len(src)) if src[k].startswith("#")), len(src))
        lines += ["", *"\n".join(src[i:j]).rstrip().splitlines()]
    return "\n".join(lines).rstrip() + "\n"


def run(cmd):
    """One step as a subprocess (its report carries its wall time). A failing step stops the comparison."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], check=True)


BASE_COT = "LLM-as-a-judge (base, CoT)"


def _acc(res, f, c, key):
    """(accuracy, 95% interval) of one cell from an eval.py summary; c "mean": RewardBench's
    section score, shown only when all four sections are present."""
    s = res["files"].get(f, {})
    v = s.get("sections", {}) if c == "mean" else s.get("per_category", {}).get(c, {})
    if c == "mean" and v.get("present") != list(SECTIONS):
        return None, None
    return v.get(key), v.get("ci", {}).get(key)


def comparisons(results: dict, files: dict) -> list:
    """Each trained judge against the judge it is compared with (ROWS' last column) on the same
    pairs: per eval set (RewardBench: the section score) and per score, the accuracy difference,
    its 95% interval and two-sided p (stats.paired_bootstrap). BT is compared with the length
    baseline on the same pairs."""
    names = [Path(files[k]).name for k in ("id", "rewardbench", "hh_harmless")]
    out = []
    for name, _, _, vs in ROWS:
        res = results.get(name)
        ref = res if vs == LENGTH else results.get(vs)
        if vs is None or res is None or ref is None:
            continue
        # Which scores to compare: BT against the length baseline, a judge at maj@1, maj@N and pooled.
        n = res["samples"]
        each = f"maj@{n}" if res["judge"] == "cot" else "p(chosen) > 0.5, each order"
        scores = [("maj@N", "longer", "reward margin > 0 vs longer answer")] if vs == LENGTH else \
            [(m, m, label) for m, label in (("maj@1", "maj@1"), ("maj@N", each),
                                            ("pooled", "both orders pooled"))
             if m != "maj@1" or n > 1]
        for ma, mb, label in scores:
            cells = {}
            for i, f in enumerate(names):
                a, b = res["files"].get(f, {}).get("per_pair"), ref["files"].get(f, {}).get("per_pair")
                if a is None or b is None or None in a[ma] or None in b[mb]:
                    cells[f] = None
                    continue
                # A paired comparison needs the same pairs in the same order on both sides.
                if a["id"] != b["id"]:
                    raise ValueError(f"{name} and {vs} were judged on different pairs of {f}")
                w = section_weights(a["group"]) if i == 1 else None  # RewardBench: the section score
                sa, sb = grouped_scores(a[ma], a["group"], w), grouped_scores(b[mb], b["group"], w)
                cells[f] = stats.paired_bootstrap(sa[0], sb[0], sa[1])
            out.append({"judge": name, "vs": vs, "score": label, "cells": cells})
    return out


def _curve(results: dict, id_file: str) -> list:
    """Markdown lines: maj@N for N in scores.KS on the ID set (the paper's Fig. 5 x-axis), for the base
    CoT judge and the trained CoT judge with the best ID maj@N ("-" beyond the samples taken)."""
    trained = [n for n, m, j, _ in ROWS if m and j == "cot" and n in results]
    best = max(trained, key=lambda n: _acc(results[n], id_file, "all", "maj@N")[0] or 0, default=None)
    lines = [f"maj@N on the ID set ({id_file}): the base CoT judge and the best trained CoT judge by ID "
             f"maj@{results[best]['samples'] if best else 'N'} ({best or '-'}).", "",
             "| judge | " + " | ".join(f"N = {k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for name in [n for n in (BASE_COT, best) if n in results]:
        v = results[name]["files"].get(id_file, {}).get("per_category", {}).get("all", {})
        curve, ci = v.get("maj@k", {}), v.get("ci", {}).get("maj@k", {})
        lines.append(f"| {name} | "
                     + " | ".join(fmt_acc(curve.get(str(k)), ci.get(str(k))) for k in KS) + " |")
    return lines


def fmt_diff(r) -> str:
    """A comparison cell: the difference in accuracy, its 95% interval and p-value; "-" for none."""
    if r is None:
        return "-"
    return f"{r['diff']:+.3f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] p={r['p']:.3f}"


def table(results: dict, files: dict) -> str:
    """Markdown: accuracy with its 95% interval per eval set and RewardBench section; each trained
    judge against the base judge of its kind on the same pairs (comparisons); the maj@N curve on
    the ID set; the judge diagnostics; wall times.
    results: row name -> {"samples": N, "judge": J, "files": {eval file name -> eval.py summary}}.
    Judges are scored with each order counted on its own (maj@N), and pooled over both orders
    (eval.pooled_outcome), which cancels a pure position bias."""
    names = [Path(files[k]).name for k in ("id", "rewardbench", "hh_harmless")]
    cols = [(names[0], "all")] + [(names[1], s) for s in (*SECTIONS, "mean")] + [(names[2], "all")]
    lines = ["| method | ID (AlpacaEval) | RB chat | RB chat_hard | RB safety | RB reasoning | RB mean "
             "| HH harmless |",
             "|---|---|---|---|---|---|---|---|"]

    def add(name, res, key):
        lines.append(f"| {name} | " + " | ".join(fmt_acc(*_acc(res, f, c, key)) for f, c in cols) + " |")

    lines.append("| chance | " + " | ".join(["0.500"] * len(cols)) + " |")
    add(LENGTH, next(iter(results.values())), "longer")
    for name, res in results.items():
        if res["samples"] > 1:
            add(f"{name}, maj@1", res, "maj@1")
            add(f"{name}, maj@{res['samples']}", res, "maj@N")
        else:
            add(name, res, "maj@N")
        if res["judge"] != "bt":
            add(f"{name}, both orders pooled", res, "pooled")
    lines += ["", "| trained judge | compared with | score | ID (AlpacaEval) | RB mean | HH harmless |",
              "|---|---|---|---|---|---|"]
    for c in comparisons(results, files):
        lines.append(f"| {c['judge']} | {c['vs']} | {c['score']} | "
                     + " | ".join(fmt_diff(c["cells"][f]) for f in names) + " |")
    lines += ["", *_curve(results, names[0])]
    lines += ["", "| method | eval set | parse failures | forced verdicts | tie / no verdict | "
              "acc chosen as A | acc chosen as B | swap consistency |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for f in names:
            s = res["files"].get(f)
            if not s or "position" not in s:  # BT: no verdicts, no order
                continue
            p = s["position"]
            lines.append(f"| {name} | {f} | {fmt_acc(s.get('parse_failure_rate'))} | "
                         f"{fmt_acc(s.get('forced_rate'))} | {fmt_acc(s['tie_rate'])} / "
                         f"{fmt_acc(s['no_verdict_rate'])} | {fmt_acc(p['acc_chosen_as_A'])} | "
                         f"{fmt_acc(p['acc_chosen_as_B'])} | {fmt_acc(p['swap_consistency'])} |")
    lines += ["", "| method | training wall time | evaluation wall time |", "|---|---|---|"]
    lines += [f"| {name} | {fmt_minutes(res.get('train_s'))} | {fmt_minutes(res.get('eval_s'))} |"
              for name, res in results.items()]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/compare"), help="comparison directory (resumable)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the full staged data (e.g. ../shared/data): subsets are drawn from it instead of "
                         "from the shipped assets/compare")
    ap.add_argument("--build-assets", action="store_true",
                    help="write assets/compare (the subsets at the sizes given, and PROVENANCE.md) from "
                         "--data-dir (default ../shared/data), then stop")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base model for every method")
    ap.add_argument("--world", choices=("small",), default=None,
                    help="the comparison in the small world (world.py, compare_world.py) instead of on "
                         "real data")
    ap.add_argument("--train", type=int, default=384,
                    help="training pairs, the same for every method (small world: 3000 unless given)")
    ap.add_argument("--id", type=int, default=256,
                    help="held-out in-distribution pairs (small world: 300 unless given)")
    ap.add_argument("--ood", type=int, default=300,
                    help="small world: pairs of each out-of-distribution level (4 digits; new error kinds)")
    ap.add_argument("--rb-per-section", type=int, default=48,
                    help="RewardBench-like pairs per section (reasoning: half math, half code)")
    ap.add_argument("--hh", type=int, default=128, help="HH harmless pairs")
    ap.add_argument("--cot-samples", type=int, default=8,
                    help="samples per judgement for every CoT judge, base and trained (maj@1 and maj@N; "
                         "small world: 16 unless given)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="rationale cap, sampling and judging")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="STaR rationales per training pair")
    ap.add_argument("--iterations", type=int, default=3,
                    help="STaR iterations (disjoint splits of the training pairs)")
    ap.add_argument("--star-epochs", type=int, default=3,
                    help="epochs per STaR iteration (paper A.3); other methods 1")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                    help="every step's --dtype: bf16 sampling and judging (training under bf16 autocast on "
                         "float32 master weights); float32 for an exact run")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for subsets (the shipped ones are seed 0), orders, sampling and training")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars in the steps")
    return ap


def sources(a) -> dict:
    """subset name -> the file its pairs are drawn from: the full data with --data-dir, else the
    shipped assets/compare (nothing outside the repository)."""
    return ({n: a.data_dir / f for n, f in SOURCES.items()} if a.data_dir
            else {n: ASSETS / f"{n}.jsonl" for n in SOURCES})


def main(argv=None):
    ap = parser()
    a = ap.parse_args(argv)
    world = a.world is not None
    given = {x.split("=")[0] for x in (sys.argv[1:] if argv is None else argv)}
    # The small world's own defaults.
    for flag, size in (("train", 3000), ("id", 300), ("ood", 300), ("cot_samples", 16)):
        if world and "--" + flag.replace("_", "-") not in given:
            setattr(a, flag, size)
    for flag in ("train", "id", "ood", "cot_samples"):
        if getattr(a, flag) < 1:
            ap.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {getattr(a, flag)}")
    if world:
        if a.out == Path("runs/compare"):
            a.out = Path("runs/compare_world")
        return compare_world.main(a)
    if a.rb_per_section < 2 or a.rb_per_section % 2:  # reasoning is half math, half code: 1 would drop it
        ap.error(f"argument --rb-per-section: must be an even number >= 2, got {a.rb_per_section}")
    if a.build_assets:
        build_assets(a, a.data_dir or DATA, ASSETS)
        print(f"written: {ASSETS} "
              f"({', '.join(f'{p.name} {p.stat().st_size} B' for p in sorted(ASSETS.iterdir()))})")
        return
    t0 = time.time()
    (a.out / "data").mkdir(parents=True, exist_ok=True)
    files = build_subsets(a, a.out / "data", sources(a))
    quiet = ["--no-progress"] if a.no_progress else []
    results = {}
    for name, method, judge, _ in ROWS:
        model, train_s = a.model, None
        if method:
            tdir = a.out / "train" / method
            if not (tdir / "report.json").exists():
                run(["train.py", "--method", method, "--model", a.model, "--data", files["train"],
                     "--no-eval", "--out", tdir, "--seed", a.seed, "--iterations", a.iterations,
                     "--epochs", a.star_epochs if method in STAR else 1,
                     "--samples-per-prompt", a.samples_per_prompt,
                     "--max-new-tokens", a.max_new_tokens, "--dtype", a.dtype, *quiet,
                     *(["--resume"] if tdir.exists() else [])])
            rep = json.loads((tdir / "report.json").read_text())
            model, train_s = rep["final_model"], rep["seconds"]
        samples = a.cot_samples if judge == "cot" else 1
        edir = a.out / "eval" / (method or f"base-{judge}")
        if not (edir / "results.json").exists():
            run(["eval.py", "--model", model, "--judge", judge, "--data", files["id"], files["rewardbench"],
                 files["hh_harmless"], "--both-orders", "--samples", samples,
                 "--max-new-tokens", a.max_new_tokens, "--batch-size", 16, "--seed", a.seed,
                 "--dtype", a.dtype, "--out", edir, *quiet])
        ev = json.loads((edir / "results.json").read_text())
        results[name] = {"samples": samples, "judge": judge, "train_s": train_s, "eval_s": ev["seconds"],
                         "files": ev["results"]}
    md = table(results, files)
    sizes = {k: sum(1 for _ in read_jsonl(f)) for k, f in files.items()}
    summary = {"args": {k: str(v) for k, v in vars(a).items()}, "sizes": sizes,
               "seconds_this_invocation": round(time.time() - t0, 1), "results": results,
               "comparisons": comparisons(results, files)}
    write_json(a.out / "comparison.json", summary)
    write_text(a.out / "comparison.md", md)
    print(md + f"\nsizes: {sizes}\nwritten: {a.out}/comparison.md, comparison.json "
          f"({summary['seconds_this_invocation']} s this invocation)")


if __name__ == "__main__":
    main()
