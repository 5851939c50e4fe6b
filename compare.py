"""The paper's comparison (Fig. 2) at small scale: every method trained on the same AlpacaEval
training pairs, every judge evaluated on the same held-out in-distribution pairs and the two
out-of-distribution sets (RewardBench-like sections, HH harmless), one table.

  python3 compare.py                       # defaults below: 2 h on 2 CPU cores
  python3 compare.py --train 96 --id 64 --rb-per-section 12 --hh 32 --cot-samples 4

Each step is `train.py` or `eval.py` run as a subprocess, so what it measures is exactly what those
commands do. Steps whose report/results file exists are skipped and an interrupted training run
is resumed, so a killed comparison continues where it stopped. Output in --out: data/ (the exact
subsets used), train/<method>/, eval/<row>/, comparison.json and comparison.md.
"""
import argparse
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from eval import SECTIONS, reasoning_half
from files import atomic_write, read_jsonl, write_jsonl

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# (row name, train.py --method or None for the base model, eval.py --judge)
ROWS = [("GenRM (base, zero-shot)", None, "genrm"),
        ("LLM-as-a-judge (base, CoT)", None, "cot"),
        ("Bradley-Terry RM", "bt_rm", "bt"),
        ("GenRM (Eq. 7)", "genrm", "genrm"),
        ("STaR-SFT", "star_sft", "cot"),
        ("STaR-DPO", "star_dpo", "cot"),
        ("STaR-Rationalizer", "rationalizer", "cot")]


def stratified(rows, group, k, seed):
    """k(group) rows from each group (all of a smaller group), seeded, in file order."""
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[group(r)].append(i)
    keep = []
    for g in sorted(by):
        idx, n = by[g], k(g)
        keep += idx if len(idx) <= n else random.Random(f"{seed}:{g}").sample(idx, n)
    return [rows[i] for i in sorted(keep)]


def rb_group(r):
    """RewardBench sections, reasoning split into its math and code halves (eval.reasoning_half)."""
    return reasoning_half(r["id"]) if r.get("category") == "reasoning" else r.get("category", "")


def build_subsets(a, d: Path) -> dict:
    """The exact train / eval subsets, written once to d so every method sees the same pairs."""
    per_section = lambda g: a.rb_per_section // 2 if g.startswith("reasoning/") else a.rb_per_section  # noqa: E731
    specs = {"train": ("train_alpacaeval_gpt4.jsonl", lambda r: "", lambda g: a.train),
             "id": ("test_id_alpacaeval_gpt4.jsonl", lambda r: "", lambda g: a.id),
             "rewardbench": ("ood_rewardbench_like.jsonl", rb_group, per_section),
             "hh_harmless": ("ood_hh_harmless.jsonl", lambda r: "", lambda g: a.hh)}
    out = {}
    for name, (src, group, k) in specs.items():
        dst = d / f"{name}.jsonl"
        if not dst.exists():
            write_jsonl(dst, stratified([r for _, r in read_jsonl(a.data_dir / src)], group, k, a.seed))
        out[name] = dst
    return out


def run(cmd):
    """One step as a subprocess (its report carries its wall time). A failing step stops the comparison."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], check=True)


def table(results: dict, files: dict) -> str:
    """Markdown: accuracy per eval set and RewardBench section, then the judge diagnostics.
    results: row name -> {"samples": N, "judge": J, "files": {eval file name -> eval.py summary}}.
    Judges are scored with each order counted on its own (maj@N), and pooled over both orders
    (eval.pooled_outcome), which cancels a pure position bias."""
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    names = [Path(files[k]).name for k in ("id", "rewardbench", "hh_harmless")]
    cols = [(names[0], "all")] + [(names[1], s) for s in SECTIONS] + [(names[2], "all")]
    lines = ["| method | ID (AlpacaEval) | RB chat | RB chat_hard | RB safety | RB reasoning | RB mean | HH harmless |",
             "|---|---|---|---|---|---|---|---|"]

    def add(name, acc):  # acc(file, category) -> float or None
        v = [acc(f, c) for f, c in cols]
        rb = v[1:5]
        mean = sum(rb) / 4 if None not in rb else None
        lines.append(f"| {name} | " + " | ".join(map(fmt, v[:5] + [mean] + v[5:])) + " |")

    def metric(res, key):
        return lambda f, c: res["files"].get(f, {}).get("per_category", {}).get(c, {}).get(key)

    first = next(iter(results.values()))
    add("chance", lambda f, c: 0.5)
    add("length baseline (longer answer wins)", metric(first, "longer"))
    for name, res in results.items():
        if res["samples"] > 1:
            add(f"{name}, maj@1", metric(res, "maj@1"))
            add(f"{name}, maj@{res['samples']}", metric(res, "maj@N"))
        else:
            add(name, metric(res, "maj@N"))
        if res["judge"] != "bt":
            add(f"{name}, both orders pooled", metric(res, "pooled"))
    lines += ["", "| method | eval set | parse failures | forced verdicts | tie / no verdict | acc chosen as A | "
              "acc chosen as B | swap consistency |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for f in names:
            s = res["files"].get(f)
            if not s or "position" not in s:  # BT: no verdicts, no order
                continue
            p = s["position"]
            lines.append(f"| {name} | {f} | {fmt(s.get('parse_failure_rate'))} | {fmt(s.get('forced_rate'))} | "
                         f"{fmt(s['tie_rate'])} / {fmt(s['no_verdict_rate'])} | {fmt(p['acc_chosen_as_A'])} | "
                         f"{fmt(p['acc_chosen_as_B'])} | {fmt(p['swap_consistency'])} |")
    lines += ["", "| method | training wall time | evaluation wall time |", "|---|---|---|"]
    mins = lambda x: "-" if x is None else f"{x / 60:.1f} min"  # noqa: E731
    lines += [f"| {name} | {mins(res.get('train_s'))} | {mins(res.get('eval_s'))} |" for name, res in results.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/compare"), help="comparison directory (resumable)")
    ap.add_argument("--data-dir", type=Path, default=DATA, help="the shared preference data (../shared/data)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base model for every method")
    ap.add_argument("--train", type=int, default=96, help="training pairs (the same for every method)")
    ap.add_argument("--id", type=int, default=64, help="held-out in-distribution pairs")
    ap.add_argument("--rb-per-section", type=int, default=12,
                    help="RewardBench-like pairs per section (reasoning: half math, half code)")
    ap.add_argument("--hh", type=int, default=32, help="HH harmless pairs")
    ap.add_argument("--cot-samples", type=int, default=4, help="maj@N samples for the base LLM-as-a-judge")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="rationale cap, sampling and judging")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="STaR rationales per training pair")
    ap.add_argument("--seed", type=int, default=0, help="seed for subsets, orders, sampling and training")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars in the steps")
    a = ap.parse_args(argv)
    t0 = time.time()
    (a.out / "data").mkdir(parents=True, exist_ok=True)
    files = build_subsets(a, a.out / "data")
    quiet = ["--no-progress"] if a.no_progress else []
    results = {}
    for name, method, judge in ROWS:
        model, train_s = a.model, None
        if method:
            tdir = a.out / "train" / method
            if not (tdir / "report.json").exists():
                run(["train.py", "--method", method, "--model", a.model, "--data", files["train"], "--no-eval",
                     "--out", tdir, "--seed", a.seed, "--iterations", 3, "--samples-per-prompt", a.samples_per_prompt,
                     "--max-new-tokens", a.max_new_tokens, *quiet, *(["--resume"] if tdir.exists() else [])])
            rep = json.loads((tdir / "report.json").read_text())
            model, train_s = rep["final_model"], rep["seconds"]
        samples = a.cot_samples if judge == "cot" and method is None else 1
        edir = a.out / "eval" / (method or f"base-{judge}")
        if not (edir / "results.json").exists():
            run(["eval.py", "--model", model, "--judge", judge, "--data", files["id"], files["rewardbench"],
                 files["hh_harmless"], "--both-orders", "--samples", samples, "--max-new-tokens", a.max_new_tokens,
                 "--batch-size", 16, "--seed", a.seed, "--out", edir, *quiet])
        ev = json.loads((edir / "results.json").read_text())
        results[name] = {"samples": samples, "judge": judge, "train_s": train_s, "eval_s": ev["seconds"],
                         "files": ev["results"]}
    md = table(results, files)
    sizes = {k: sum(1 for _ in read_jsonl(f)) for k, f in files.items()}
    summary = {"args": {k: str(v) for k, v in vars(a).items()}, "sizes": sizes,
               "seconds_this_invocation": round(time.time() - t0, 1), "results": results}
    atomic_write(a.out / "comparison.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    atomic_write(a.out / "comparison.md", lambda p: Path(p).write_text(md))
    print(md + f"\nsizes: {sizes}\nwritten: {a.out}/comparison.md, comparison.json "
          f"({summary['seconds_this_invocation']} s this invocation)")


if __name__ == "__main__":
    main()
