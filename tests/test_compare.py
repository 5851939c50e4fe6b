"""compare.py: the subsets every method shares, and the table built from eval.py summaries."""
import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

import compare as C
import scores as S
import stats
from data import load_pairs
from files import read_jsonl, write_jsonl


def test_stratified_counts_order_and_seed():
    rows = [{"i": i, "g": "a" if i % 3 else "b"} for i in range(30)]   # 20 a, 10 b
    sub = C.stratified(rows, lambda r: r["g"], {"a": 12, "b": 10}, seed=1)
    assert Counter(r["g"] for r in sub) == {"a": 12, "b": 10}
    assert [r["i"] for r in sub] == sorted(r["i"] for r in sub)        # file order
    assert sub == C.stratified(rows, lambda r: r["g"], {"a": 12, "b": 10}, seed=1)
    assert sub != C.stratified(rows, lambda r: r["g"], {"a": 12, "b": 10}, seed=2)
    assert Counter(r["g"] for r in C.stratified(rows, lambda r: r["g"], {"a": 3}, seed=1)) == {"a": 3}
    with pytest.raises(ValueError, match="group 'b' has 10 pairs, 12 asked"):
        C.stratified(rows, lambda r: r["g"], {"a": 12, "b": 12}, seed=1)


def pair(i, cat, pre="x"):
    return {"id": f"{pre}-{i}", "prompt": "q", "chosen": "c" * (1 + i % 3), "rejected": "rr", "category": cat}


def full_data(d, n_safety=9):
    """A planted stand-in for ../shared/data: the four source files and a PROVENANCE.md."""
    d.mkdir()
    rb = ([pair(i, "chat") for i in range(9)] + [pair(i, "chat_hard") for i in range(9)] +
          [pair(i, "safety") for i in range(n_safety)] + [pair(i, "reasoning", "gsm8k") for i in range(9)] +
          [pair(i, "reasoning", "hep") for i in range(9)])
    write_jsonl(d / "ood_rewardbench_like.jsonl", rb)
    for f in ("train_alpacaeval_gpt4.jsonl", "test_id_alpacaeval_gpt4.jsonl", "ood_hh_harmless.jsonl"):
        write_jsonl(d / f, [pair(i, "x", f[:5]) for i in range(20)])
    prov = ["# Staged data", "", "| file | n | bytes | labels | licence |", "|---|---|---|---|---|"]
    prov += ([f"| `{f}` | 1 | 2 | MODEL labels | licence of {f} |" for f in C.SOURCES.values()]
             + ["| `other.jsonl` | 1 | 2 | x | y |"])
    for f in C.SOURCES.values():
        prov += ["", f"### {f}", "", f"(x) what {f} is.", "", "Inputs:", "", f"- the inputs of {f}", ""]
    (d / "PROVENANCE.md").write_text("\n".join(prov) + "\n### other.jsonl\n\nnot ours\n")
    return d


def sizes(**kw):
    return argparse.Namespace(**{"train": 7, "id": 5, "rb_per_section": 6, "hh": 3, "seed": 0,
                                 "data_dir": None, **kw})


def test_subsets_sections_with_math_and_code_halves(tmp_path):
    a = sizes(data_dir=full_data(tmp_path / "full"))
    files = C.build_subsets(a, tmp_path / "out", C.sources(a))
    got = Counter(C.rb_group(r) for _, r in read_jsonl(files["rewardbench"]))
    assert got == {"chat": 6, "chat_hard": 6, "safety": 6, "reasoning/math": 3, "reasoning/code": 3}
    assert [sum(1 for _ in read_jsonl(files[k])) for k in ("train", "id", "hh_harmless")] == [7, 5, 3]
    assert C.build_subsets(a, tmp_path / "out", C.sources(a)) == files            # resumed: the same files
    with pytest.raises(SystemExit, match=r"train\.jsonl: holds \{'': 7\} pairs per group, \{'': 8\} asked"):
        C.build_subsets(sizes(data_dir=a.data_dir, train=8), tmp_path / "out", C.sources(a))
    with pytest.raises(SystemExit, match=r"ood_rewardbench_like\.jsonl: group 'safety' has 3 pairs, 6 asked"):
        b = sizes(data_dir=full_data(tmp_path / "short", n_safety=3))
        C.build_subsets(b, tmp_path / "out2", C.sources(b))


def test_build_assets_is_deterministic_with_counts_and_licences(tmp_path):
    a = sizes()
    d = full_data(tmp_path / "full")
    C.build_assets(a, d, tmp_path / "one")
    C.build_assets(a, d, tmp_path / "two")
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["PROVENANCE.md", "hh_harmless.jsonl", "id.jsonl", "rewardbench.jsonl", "train.jsonl"]
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()
    prov = (tmp_path / "one" / "PROVENANCE.md").read_text()
    assert ("| `rewardbench.jsonl` | 24 | chat 6, chat_hard 6, reasoning/code 3, reasoning/math 3, "
            "safety 6 |") in prov
    assert "compare.py --build-assets --seed 0 --train 7 --id 5 --rb-per-section 6 --hh 3`" in prov
    for f in C.SOURCES.values():  # each source's licence row and its section, quoted
        assert f"licence of {f}" in prov and f"- the inputs of {f}" in prov
    assert "other.jsonl" not in prov
    assert hashlib.sha256((tmp_path / "one" / "train.jsonl").read_bytes()).hexdigest() in prov


def test_shipped_assets_hold_the_default_sizes_and_rebuild_to_the_same_bytes(tmp_path):
    a = C.parser().parse_args([])
    for name, (group, counts) in C.plan(a).items():
        assert Counter(group(r) for _, r in read_jsonl(C.ASSETS / f"{name}.jsonl")) == counts
    assert (a.train, a.id, a.rb_per_section, a.hh) == (384, 256, 48, 128)
    if not C.DATA.exists():
        pytest.skip(f"{C.DATA} absent: the rebuild from the full data is not checked")
    C.build_assets(a, C.DATA, tmp_path)
    for p in C.ASSETS.iterdir():
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_main_needs_nothing_outside_the_repo(tmp_path, monkeypatch):
    """The whole of compare.main on the shipped subsets with ../shared unreachable: the steps are
    replaced by a stand-in that writes what train.py / eval.py would (an always-"A" CoT judge)."""
    monkeypatch.setattr(C, "DATA", tmp_path / "missing")
    cmds = []

    def fake_run(cmd):
        cmd = [str(c) for c in cmd]
        cmds.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if cmd[0] == "train.py":
            (out / "report.json").write_text(json.dumps({"final_model": "m", "seconds": 60}))
            return
        n = int(cmd[cmd.index("--samples") + 1])
        res = {}
        for f in cmd[cmd.index("--data") + 1:cmd.index("--both-orders")]:
            pairs = load_pairs(f)
            recs = [{"id": p.id, "category": p.category, "margin": 1.0} if "bt" in cmd else
                    {"id": p.id, "category": p.category,
                     "order": {k: {"votes": [["A", True]] * n} for k in "AB"}}
                    for p in pairs]
            res[Path(f).name] = S.summarize(pairs, recs)
        (out / "results.json").write_text(json.dumps({"seconds": 30, "results": res}))

    monkeypatch.setattr(C, "run", fake_run)
    C.main(["--train", "6", "--id", "4", "--rb-per-section", "2", "--hh", "2", "--cot-samples", "2",
            "--out", str(tmp_path / "out")])
    assert ([sum(1 for _ in read_jsonl(tmp_path / "out" / "data" / f"{k}.jsonl")) for k in C.SOURCES]
            == [6, 4, 8, 2])
    epochs = {c[c.index("--method") + 1]: c[c.index("--epochs") + 1] for c in cmds if c[0] == "train.py"}
    assert epochs == {"bt_rm": "1", "genrm": "1", "star_sft": "3", "star_dpo": "3", "rationalizer": "1"}
    samples = [c[c.index("--samples") + 1] for c in cmds if c[0] == "eval.py" and "cot" in c]
    assert samples == ["2"] * 4                               # every CoT judge, base and trained
    assert {c[c.index("--dtype") + 1] for c in cmds} == {"bfloat16"}  # every step, by default
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| STaR-DPO | LLM-as-a-judge (base, CoT) | maj@2 | +0.000 [+0.00, +0.00] p=1.000 |" in md
    assert ("| Bradley-Terry RM, maj@1" not in md
            and "| LLM-as-a-judge (base, CoT), maj@2 | 0.500 [0.50, 0.50] |" in md)
    comp = json.loads((tmp_path / "out" / "comparison.json").read_text())["comparisons"]
    assert {(c["judge"], c["score"]) for c in comp} >= {
        ("Bradley-Terry RM", "reward margin > 0 vs longer answer"),
        ("GenRM (Eq. 7)", "p(chosen) > 0.5, each order"),
        ("GenRM (Eq. 7)", "both orders pooled")}


def cell(x):
    """The planted interval of accuracy x and the table cell it must give."""
    return [x / 2, (1 + x) / 2], f"{x:.3f} [{x / 2:.2f}, {(1 + x) / 2:.2f}]"


def acc_entry(a, pooled, longer, **extra):
    return {"maj@N": a, "maj@1": a, "pooled": pooled, "longer": longer, **extra,
            "ci": {"maj@N": cell(a)[0], "maj@1": cell(a)[0], "pooled": cell(pooled)[0],
                   "longer": cell(longer)[0]}}


def summary(acc, pooled, longer, sections=None, per_pair=None, curve=None):
    pc = {"all": acc_entry(acc, pooled, longer)}
    if curve:
        pc["all"]["maj@k"], pc["all"]["ci"]["maj@k"] = curve, {k: cell(v)[0] for k, v in curve.items()}
    for s, v in (sections or {}).items():
        pc[s] = acc_entry(v, v, 0.25)
    out = {"per_category": pc,
           "position": {"acc_chosen_as_A": 1.0, "acc_chosen_as_B": 0.0, "swap_consistency": 0.0},
           "tie_rate": 0.0, "no_verdict_rate": 0.0}
    if sections:
        m = sum(sections.values()) / len(sections)
        out["sections"] = {**acc_entry(m, m, 0.25), "present": list(sections)}
    if per_pair:
        out["per_pair"] = per_pair
    return out


FILES = {"id": "x/id.jsonl", "rewardbench": "x/rewardbench.jsonl", "hh_harmless": "x/hh_harmless.jsonl"}


def table_rows(md):
    return {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")[1:]]
            for line in md.split("\n\n")[0].splitlines() if line.startswith("| ") and "ID (" not in line}


def test_table_takes_each_number_and_interval_from_its_summary():
    secs = {"chat": 0.8, "chat_hard": 0.4, "safety": 0.6, "reasoning": 0.2}
    res = {"J": {"samples": 1, "judge": "genrm", "train_s": 150, "eval_s": 30,
                 "files": {"id.jsonl": summary(0.625, 0.75, 0.7),
                           "rewardbench.jsonl": summary(0.5, 0.5, 0.3, secs),
                           "hh_harmless.jsonl": summary(0.375, 0.25, 0.6)}}}
    md = C.table(res, FILES)
    rows = table_rows(md)
    assert rows["chance"] == ["0.500"] * 7
    assert rows[C.LENGTH][0] == cell(0.7)[1] and rows[C.LENGTH][6] == cell(0.6)[1]
    assert rows["J"] == [cell(x)[1] for x in (0.625, 0.8, 0.4, 0.6, 0.2, sum(secs.values()) / 4, 0.375)]
    assert (rows["J, both orders pooled"][0] == cell(0.75)[1]
            and rows["J, both orders pooled"][6] == cell(0.25)[1])
    assert md.count("| J | id.jsonl |") == 1   # diagnostics row per eval set
    assert "| J | 2.5 min | 0.5 min |" in md
    three = {k: v for k, v in secs.items() if k != "safety"}   # a section missing: no RB mean
    res["J"]["files"]["rewardbench.jsonl"] = summary(0.5, 0.5, 0.3, three)
    assert table_rows(C.table(res, FILES))["J"][5] == "-"


@pytest.mark.parametrize("samples", [1, 4])
def test_table_shows_maj1_and_majN_rows_only_when_sampled_more_than_once(samples):
    files = {"id": "id.jsonl", "rewardbench": "rewardbench.jsonl", "hh_harmless": "hh_harmless.jsonl"}
    res = {"CoT": {"samples": samples, "judge": "cot", "files": {"id.jsonl": summary(0.5, 0.5, 0.5)}}}
    md = C.table(res, files)
    assert ("| CoT, maj@1 |" in md) == (samples > 1) and ("| CoT, maj@4 |" in md) == (samples == 4)


def test_paired_comparisons_against_the_base_judge_and_the_curve_of_the_best():
    rb_groups = ["chat", "chat", "chat_hard", "safety", "reasoning/math", "reasoning/code", "reasoning/code"]
    base = {"id": [0, 0.5, 1, 0.5, 0, 1], "rb": [0.5, 0, 1, 0.5, 1, 0, 0.5]}
    sft = {"id": [1, 0.5, 1, 1, 0, 1], "rb": [1, 0, 1, 1, 1, 0.5, 0.5]}
    dpo = {"id": [1, 1, 1, 1, 0.5, 1], "rb": [1, 1, 1, 1, 1, 1, 1]}

    def judge(sc, acc, curve):
        pp = lambda ids, groups, x: {"id": ids, "group": groups, "maj@1": x[::-1], "maj@N": x, "pooled": x,  # noqa: E731
                                     "longer": [1] * len(x)}
        return {"samples": 4, "judge": "cot", "files": {
            "id.jsonl": summary(acc, acc, 0.7, per_pair=pp(list("abcdef"), ["x"] * 6, sc["id"]), curve=curve),
            "rewardbench.jsonl": summary(0.5, 0.5, 0.5, per_pair=pp(list("ghijklm"), rb_groups, sc["rb"]))}}
    res = {C.BASE_COT: judge(base, 0.5, {"1": 0.4, "2": 0.45, "4": 0.5}),
           "STaR-SFT": judge(sft, 0.75, {"1": 0.6, "2": 0.7, "4": 0.75}),
           "STaR-DPO": judge(dpo, 0.9, {"1": 0.8, "2": 0.85, "4": 0.9})}
    comp = C.comparisons(res, FILES)
    assert [(c["judge"], c["score"]) for c in comp] == [(j, s) for j in ("STaR-SFT", "STaR-DPO")
                                                        for s in ("maj@1", "maj@4", "both orders pooled")]
    got = comp[1]["cells"]                                    # STaR-SFT, maj@4
    assert got["id.jsonl"] == stats.paired_bootstrap([sft["id"]], [base["id"]])
    assert got["id.jsonl"]["diff"] == pytest.approx((4.5 - 3) / 6)
    # RewardBench: strata chat, chat_hard, safety, reasoning code, reasoning math; weights 1/4 and 1/8
    strata = lambda x: [x[0:2], x[2:3], x[3:4], x[5:7], x[4:5]]  # noqa: E731
    want = stats.paired_bootstrap(strata(sft["rb"]), strata(base["rb"]), [0.25, 0.25, 0.25, 0.125, 0.125])
    assert got["rewardbench.jsonl"] == want
    assert want["diff"] == pytest.approx(0.25 * 0.25 + 0.25 * 0 + 0.25 * 0.5 + 0.125 * 0.25 + 0.125 * 0)
    assert got["hh_harmless.jsonl"] is None                   # not evaluated here
    # comp[0]: STaR-SFT, maj@1.
    assert comp[0]["cells"]["id.jsonl"] == stats.paired_bootstrap([sft["id"][::-1]], [base["id"][::-1]])
    md = C.table(res, FILES)
    r = got["id.jsonl"]
    assert (f"| STaR-SFT | {C.BASE_COT} | maj@4 | {r['diff']:+.3f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] "
            f"p={r['p']:.3f} |") in md
    # the curve: the base judge and the trained CoT judge with the best ID maj@N (STaR-DPO)
    assert "best trained CoT judge by ID maj@4 (STaR-DPO)." in md
    assert f"| STaR-DPO | {cell(0.8)[1]} | {cell(0.85)[1]} | {cell(0.9)[1]} | - | - |" in md
    assert f"| {C.BASE_COT} | {cell(0.4)[1]} |" in md and "| STaR-SFT | 0.600" not in md
    res["STaR-SFT"]["files"]["id.jsonl"]["per_pair"]["id"][0] = "z"
    with pytest.raises(ValueError, match="judged on different pairs of id.jsonl"):
        C.comparisons(res, FILES)
