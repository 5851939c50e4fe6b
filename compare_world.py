"""The paper's comparison in the small world (world.py): every method trained from the same base
judge on the same training pairs, every judge evaluated on the same in-distribution (ID) and
out-of-distribution (OOD, 4-digit) pairs in both orders, with 95% intervals and paired tests
against the base judge of its kind, the maj@N curve (N = 1..16), and two controls.

  python3 compare.py --world small                 # about 30 minutes on 2 CPU cores
  python3 compare.py --world small --train 600 --id 200 --ood 200 --cot-samples 4   # smaller

Controls: STaR-SFT with a random filter (as many rationales kept as the label filter keeps, but
whatever their verdict: it must not learn) and SFT on the world's true rationales of the same
training pairs (what a perfect filter could reach: the ceiling). Each step is `train.py` or
`eval.py` as a subprocess with the small world's recipe written out in full on its command line
(train.WORLD_DEFAULTS, WORLD_LR), so a step is exactly that command; finished steps are skipped
when the comparison is run again.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import genrm
import stats
import train
import world
from data import Pair
from files import read_jsonl, write_json, write_jsonl, write_text
from scores import KS, fmt_acc, fmt_minutes

EVAL_SPLITS = ("id", "ood", "ood_errors")  # world.py's held-out levels: 1-3 digits, 4 digits, new error kinds
BASE_COT, BASE_GENRM = "LLM-as-a-judge (base, CoT)", "GenRM (base, zero-shot)"
# STaR-SFT keeps every rationale whose verdict is right (6,000-7,400 of 8,000 per iteration here)
# where STaR-DPO makes 200-700 pairs of them: at the recipe's two epochs it trained for 8 minutes,
# its random-filter control as long, while every other row trained in 1-4. One epoch over what it
# keeps (still 2-3 times STaR-DPO's optimizer steps) brings the comparison inside 30 minutes; the
# main job and train.py alone keep two.
STAR_SFT_EPOCHS = ["--epochs", 1]
# (row, train.py --method or None for the base judge, extra train.py flags, eval.py --judge,
#  the judge it is compared with)
ROWS = [(BASE_GENRM, None, [], "genrm", None),
        (BASE_COT, None, [], "cot", None),
        ("Bradley-Terry RM (Eq. 2)", "bt_rm", [], "bt", BASE_COT),
        ("GenRM (Eq. 7)", "genrm", [], "genrm", BASE_GENRM),
        ("STaR-SFT", "star_sft", STAR_SFT_EPOCHS, "cot", BASE_COT),
        ("STaR-DPO", "star_dpo", [], "cot", BASE_COT),
        ("STaR-Rationalizer (Eq. 8)", "rationalizer", [], "cot", BASE_COT),
        ("control: STaR-SFT, random filter", "star_sft", [*STAR_SFT_EPOCHS, "--star-filter", "random"], "cot",
         BASE_COT),
        ("control: SFT on true rationales (ceiling)", "sft", [], "cot", BASE_COT)]


def run(cmd):
    """One step as a subprocess; a failing step stops the comparison (a rerun skips finished steps)."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], check=True)


def recipe_flags(method) -> list:
    """The small world's recipe as train.py flags: what `train.py` alone would default to."""
    d = {**train.WORLD_DEFAULTS, **train.WORLD_METHOD_DEFAULTS.get(method, {})}
    return ["--lr", train.WORLD_LR[method], "--dtype", d["dtype"], "--batch-size", d["batch_size"],
            "--max-len", d["max_len"], "--max-new-tokens", d["max_new_tokens"], "--samples-per-prompt",
            d["samples_per_prompt"], "--pairs-per-prompt", d["pairs_per_prompt"], "--dpo-nll", d["dpo_nll"],
            "--sample-batch", d["sample_batch"], "--iterations", d["iterations"],
            "--epochs", d["epochs"], "--warmup", d["warmup"], "--save-every", d["save_every"],
            *(["--ref-from-previous"] if d.get("ref_from_previous") else [])]


def true_rationales(pairs_file, out, seed):
    """SFT rows for the ceiling: each training pair in a seeded A/B order, judged by the world's
    careful rationale (no carry forgotten), whose verdict is always the label."""
    pairs = [Pair(id=r["id"], prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
             for _, r in read_jsonl(pairs_file)]
    rows = []
    for pair, a_is_chosen in zip(pairs, genrm.seeded_orders(pairs, seed)):
        messages = genrm.judge_messages(pair, a_is_chosen, "cot")
        rows.append({"id": pair.id, "messages": messages,
                     "completion": world.true_rationale({"messages": messages})})
    write_jsonl(out, rows)


def paired(res, ref, file, key):
    """res - ref on the same pairs of one eval file (per-pair scores `key`), paired bootstrap."""
    a, b = res["files"][file]["per_pair"], ref["files"][file]["per_pair"]
    if a["id"] != b["id"]:
        raise ValueError(f"judged on different pairs of {file}")
    ref_key = key if ref["judge"] != "bt" and key in b else "maj@N"
    return stats.paired_bootstrap([a[key]], [b[ref_key]])


def table(results: dict, files: dict, samples: int) -> str:
    """Markdown: accuracy [95% CI] per row on ID and OOD (maj@1, maj@N, both orders pooled), the
    paired differences against each row's reference judge, the maj@k curve of every CoT judge,
    the judges' diagnostics (forced verdicts, position bias) and wall times."""
    names = {k: Path(f).name for k, f in files.items()}
    keys = [("maj@1", "maj@1"), (f"maj@{samples}", "maj@N"), ("pooled", "pooled")]
    head = [f"{split} {label}" for split in EVAL_SPLITS for label, _ in keys]
    lines = ["| judge | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt_acc(*_acc(res, names[s], k))
                                                 for s in EVAL_SPLITS for _, k in keys) + " |")
    cols = [f"{split} {key}" for split in EVAL_SPLITS for key in ("maj@1", "maj@N")]
    lines += ["", "| judge | compared with | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, _, _, _, vs in ROWS:
        if vs is None or name not in results or vs not in results:
            continue
        diffs = []
        for split in EVAL_SPLITS:
            for key in ("maj@1", "maj@N"):
                d = paired(results[name], results[vs], names[split], key)
                diffs.append(f"{d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] p={d['p']:.3f}")
        lines.append(f"| {name} | {vs} | " + " | ".join(diffs) + " |")
    ks = [k for k in KS if k <= samples]
    for split in EVAL_SPLITS:
        lines += ["", f"maj@N curve, {split.upper()} ({names[split]}):", "",
                  "| CoT judge | " + " | ".join(f"N = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, res in results.items():
            if res["judge"] != "cot":
                continue
            v = res["files"][names[split]]["per_category"]["all"]
            lines.append(f"| {name} | " + " | ".join(fmt_acc(v["maj@k"][str(k)], v["ci"]["maj@k"][str(k)])
                                                   for k in ks) + " |")
    lines += ["",
              "| judge | eval set | forced verdicts | parse failures | acc chosen as A | acc chosen as B |",
              "|---|---|---|---|---|---|"]
    for name, res in results.items():
        for split in EVAL_SPLITS:
            s = res["files"][names[split]]
            if "position" in s:
                p = s["position"]
                lines.append(f"| {name} | {split.upper()} | {fmt_acc(s.get('forced_rate'))} | "
                             f"{fmt_acc(s.get('parse_failure_rate'))} | {fmt_acc(p['acc_chosen_as_A'])} | "
                             f"{fmt_acc(p['acc_chosen_as_B'])} |")
    lines += ["", "| judge | training | evaluation |", "|---|---|---|"]
    lines += [f"| {name} | {fmt_minutes(res['train_s'])} | {fmt_minutes(res['eval_s'])} |"
              for name, res in results.items()]
    return "\n".join(lines) + "\n"


def _acc(res, file, key):
    v = res["files"][file]["per_category"]["all"]
    return v.get(key), v["ci"].get(key)


def main(a):
    """compare.py --world small: a is compare.py's parsed arguments (--out, --train, --id, --ood,
    --cot-samples, --seed, --no-progress)."""
    t0 = time.time()
    out = a.out
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = {split: out / "data" / f"{split}.jsonl" for split in ("train", *EVAL_SPLITS)}
    sizes = {"train": a.train, "id": a.id, "ood": a.ood, "ood_errors": a.ood}
    for split, path in files.items():
        if not path.exists():
            write_jsonl(path, world.make_pairs(sizes[split], a.seed, split))
        have = sum(1 for _ in read_jsonl(path))
        if have != sizes[split]:
            raise SystemExit(f"{path}: holds {have} pairs, {sizes[split]} asked: this --out was started with "
                             "other sizes (give those, or a new --out)")
    true_file = out / "data" / "true_rationales.jsonl"
    if not true_file.exists():
        true_rationales(files["train"], true_file, a.seed)
    base = train.world_base(train.parse_args([]))
    quiet = ["--no-progress"] if a.no_progress else []
    max_new = train.WORLD_DEFAULTS["max_new_tokens"]
    results = {}
    for name, method, extra, judge, _ in ROWS:
        model, train_s = base, None
        if method:
            tdir = out / "train" / (method + "".join("_" + str(x).lstrip("-") for x in extra))
            if not (tdir / "report.json").exists():
                data = true_file if method == "sft" else files["train"]
                run(["train.py", "--method", method, "--model", base, "--data", data, "--no-eval",
                     "--out", tdir, "--seed", a.seed, *recipe_flags(method), *extra, *quiet,
                     *(["--resume"] if tdir.exists() else [])])
            rep = json.loads((tdir / "report.json").read_text())
            model, train_s = rep["final_model"], rep["seconds"]
        samples = a.cot_samples if judge == "cot" else 1
        edir = out / "eval" / (tdir.name if method else f"base-{judge}")
        if not (edir / "results.json").exists():
            run(["eval.py", "--model", model, "--judge", judge, "--data", *(files[s] for s in EVAL_SPLITS),
                 "--both-orders", "--samples", samples, "--max-new-tokens", max_new, "--batch-size", 64,
                 "--seed", a.seed + 1, "--dtype", "float32", "--out", edir, *quiet])
        ev = json.loads((edir / "results.json").read_text())
        results[name] = {"judge": judge, "samples": samples, "train_s": train_s, "eval_s": ev["seconds"],
                         "files": ev["results"]}
    md = table(results, {k: files[k] for k in EVAL_SPLITS}, a.cot_samples)
    summary = {"args": {k: str(v) for k, v in vars(a).items()}, "sizes": sizes, "base_model": base,
               "seconds_this_invocation": round(time.time() - t0, 1), "results": results}
    write_json(out / "comparison.json", summary)
    write_text(out / "comparison.md", md)
    print(md + f"\nwritten: {out}/comparison.md, comparison.json ({summary['seconds_this_invocation']} s "
          "this invocation)")
