"""compare.py: the subsets every method shares, and the table built from eval.py summaries."""
import argparse
from collections import Counter

import pytest

import compare as C
from files import read_jsonl, write_jsonl


def test_stratified_counts_order_and_seed():
    rows = [{"i": i, "g": "a" if i % 3 else "b"} for i in range(30)]   # 20 a, 10 b
    sub = C.stratified(rows, lambda r: r["g"], lambda g: 12, seed=1)
    assert Counter(r["g"] for r in sub) == {"a": 12, "b": 10}          # a smaller group is kept whole
    assert [r["i"] for r in sub] == sorted(r["i"] for r in sub)        # file order
    assert sub == C.stratified(rows, lambda r: r["g"], lambda g: 12, seed=1)
    assert sub != C.stratified(rows, lambda r: r["g"], lambda g: 12, seed=2)


def test_subsets_sections_with_math_and_code_halves(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    pair = lambda i, cat, pre="x": {"id": f"{pre}-{i}", "prompt": "q", "chosen": "c", "rejected": "r", "category": cat}  # noqa: E731
    rb = ([pair(i, "chat") for i in range(9)] + [pair(i, "safety") for i in range(3)] +
          [pair(i, "reasoning", "gsm8k") for i in range(9)] + [pair(i, "reasoning", "hep") for i in range(9)])
    write_jsonl(d / "ood_rewardbench_like.jsonl", rb)
    for f in ("train_alpacaeval_gpt4.jsonl", "test_id_alpacaeval_gpt4.jsonl", "ood_hh_harmless.jsonl"):
        write_jsonl(d / f, [pair(i, "x") for i in range(20)])
    a = argparse.Namespace(data_dir=d, train=7, id=5, rb_per_section=6, hh=3, seed=0)
    files = C.build_subsets(a, tmp_path / "out")
    got = Counter(C.rb_group(r) for _, r in read_jsonl(files["rewardbench"]))
    assert got == {"chat": 6, "safety": 3, "reasoning/math": 3, "reasoning/code": 3}
    assert [sum(1 for _ in read_jsonl(files[k])) for k in ("train", "id", "hh_harmless")] == [7, 5, 3]


def summary(acc, pooled, longer, sections=None):
    pc = {"all": {"maj@N": acc, "maj@1": acc, "pooled": pooled, "longer": longer}}
    for s, v in (sections or {}).items():
        pc[s] = {"maj@N": v, "maj@1": v, "pooled": v, "longer": 0.25}
    return {"per_category": pc, "position": {"acc_chosen_as_A": 1.0, "acc_chosen_as_B": 0.0, "swap_consistency": 0.0},
            "tie_rate": 0.0, "no_verdict_rate": 0.0}


def test_table_takes_each_number_from_its_summary():
    files = {"id": "x/id.jsonl", "rewardbench": "x/rewardbench.jsonl", "hh_harmless": "x/hh_harmless.jsonl"}
    secs = {"chat": 0.8, "chat_hard": 0.4, "safety": 0.6, "reasoning": 0.2}
    res = {"J": {"samples": 1, "judge": "genrm", "train_s": 150, "eval_s": 30,
                 "files": {"id.jsonl": summary(0.625, 0.75, 0.7), "rewardbench.jsonl": summary(0.5, 0.5, 0.3, secs),
                           "hh_harmless.jsonl": summary(0.375, 0.25, 0.6)}}}
    rows = {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")[1:]]
            for line in C.table(res, files).split("\n\n")[0].splitlines() if line.startswith("| ") and "ID (" not in line}
    assert rows["chance"] == ["0.500"] * 7
    assert rows["length baseline (longer answer wins)"][0] == "0.700" and rows["length baseline (longer answer wins)"][6] == "0.600"
    assert rows["J"] == ["0.625", "0.800", "0.400", "0.600", "0.200", f"{sum(secs.values()) / 4:.3f}", "0.375"]
    assert rows["J, both orders pooled"][0] == "0.750" and rows["J, both orders pooled"][6] == "0.250"
    assert C.table(res, files).count("| J | id.jsonl |") == 1   # diagnostics row per eval set
    assert "| J | 2.5 min | 0.5 min |" in C.table(res, files)


@pytest.mark.parametrize("samples", [1, 4])
def test_table_shows_maj1_and_majN_rows_only_when_sampled_more_than_once(samples):
    files = {"id": "id.jsonl", "rewardbench": "rewardbench.jsonl", "hh_harmless": "hh_harmless.jsonl"}
    res = {"CoT": {"samples": samples, "judge": "cot", "files": {"id.jsonl": summary(0.5, 0.5, 0.5)}}}
    md = C.table(res, files)
    assert ("| CoT, maj@1 |" in md) == (samples > 1) and ("| CoT, maj@4 |" in md) == (samples == 4)
