"""genrm.py: the paper's prompts word for word, verdict parsing, preferences, votes, STaR steps."""
import json
import math

import pytest
import torch

import genrm
from conftest import CharTok, tiny_model
from data import Pair

# Appendix A, typed from the paper (Fig. 6, 7, 8)
FIG6 = ('Please act as an impartial judge and evaluate the quality of the responses provided by two AI '
        'assistants to the user question displayed below. You should choose the assistant that follows the '
        'user\'s instructions and answers the user\'s question better. Your evaluation should consider '
        'factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of '
        'their responses. Begin your evaluation by comparing the two responses and provide a short '
        'explanation. Avoid any position biases and ensure that the order in which the responses were '
        'presented does not influence your decision. Do not allow the length of the responses to influence '
        'your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After '
        'providing your explanation, output your final verdict by strictly following this format: "[[A]]" '
        'if assistant A is better, "[[B]]" if assistant B is better')
FIG7 = ('Please act as an impartial judge and evaluate the quality of the responses provided by two AI '
        'assistants to the user question displayed below. You should choose the assistant that follows the '
        'user\'s instructions and answers the user\'s question better. Your evaluation should consider '
        'factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of '
        'their responses. Begin your evaluation by comparing the two responses and provide a short '
        'explanation. Avoid any position biases and ensure that the order in which the responses were '
        'presented does not influence your decision. Do not allow the length of the responses to influence '
        'your evaluation. Do not favor certain names of the assistants. Be as objective as possible.')
FIG8 = ('Please act as an impartial judge and evaluate the quality of the responses provided by two AI '
        'assistants to the user question displayed below. You should choose the assistant that follows the '
        'user\'s instructions and answers the user\'s question better. Your evaluation should consider '
        'factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of '
        'their responses. Avoid any position biases and ensure that the order in which the responses were '
        'presented does not influence your decision. Do not allow the length of the responses to influence '
        'your evaluation. Do not favor certain names of the assistants. Be as objective as possible. '
        'Output your verdict by strictly following this format: "A" if assistant A is better, "B" if '
        'assistant B is better')


def test_prompts_are_the_papers_words():
    assert genrm.SYSTEM_COT == FIG6 and genrm.SYSTEM_RATIONALIZER == FIG7 and genrm.SYSTEM_GENRM == FIG8
    p = Pair("i", "What is 2+2?", "4", "5")
    for kind, system in (("cot", FIG6), ("genrm", FIG8), ("rationalizer", FIG7)):
        for a_is_chosen, (a, b) in ((True, ("4", "5")), (False, ("5", "4"))):
            m = genrm.judge_messages(p, a_is_chosen, kind)
            assert m[0] == {"role": "system", "content": system}
            u = m[1]["content"]
            assert u.startswith("[Chat Context]\nWhat is 2+2?\n\n")
            assert f"[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]" in u
            assert f"[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]" in u
            assert u.index("Assistant A's Answer") < u.index("Assistant B's Answer")
            if kind == "rationalizer":
                win, lose = ("A", "B") if a_is_chosen else ("B", "A")
                assert u.endswith(f"Explain why response {win} is better than response {lose}.")
    with pytest.raises(ValueError, match="kind must be one of"):
        genrm.judge_messages(p, True, "other")


def test_multi_turn_context():
    p = Pair("i", "and then?", "c", "r", messages=[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"},
                                                   {"role": "user", "content": "and then?"}])
    assert genrm.chat_context(p) == "User: hi\n\nAssistant: hello\n\nUser: and then?"


@pytest.mark.parametrize("text,want", [
    ("Assistant A is better. [[A]]", "A"),
    ("At first [[A]] seemed right, but final verdict: [[B]]", "B"),
    ("[[B]] ... on reflection [[A]]", "A"),
    ("[[ A ]] or [A] or [[a]] or [[C]]", None),
    ("[[[A]]]", "A"),
    ("no verdict here", None),
    ("", None),
    ("[[AB]] [[B]", None),
])
def test_parse_verdict(text, want):
    assert genrm.parse_verdict(text) == want


def test_preference_equals_hand_computation():
    m, tok = tiny_model(seed=1), CharTok()
    p = Pair("i", "Q", "good answer", "bad")
    seq = tok.apply_chat(genrm.judge_messages(p, True, "genrm"))
    with torch.no_grad():
        lg = m(torch.tensor([seq]))[0, -1]
    la, lb = float(lg[tok.token_id("A")]), float(lg[tok.token_id("B")])
    want = math.exp(la) / (math.exp(la) + math.exp(lb))
    res = genrm.genrm_preference(m, tok, [p, Pair("j", "Q2", "x", "yy")], both_orders=True)
    assert abs(float(res["p_a_chosen"][0]) - want) < 1e-5
    seq_b = tok.apply_chat(genrm.judge_messages(p, False, "genrm"))
    with torch.no_grad():
        lg = m(torch.tensor([seq_b]))[0, -1]
    pb = math.exp(lg[tok.token_id("B")]) / (math.exp(lg[tok.token_id("A")]) + math.exp(lg[tok.token_id("B")]))
    assert abs(float(res["p"][0]) - (want + pb) / 2) < 1e-5


def test_reward_eq6_is_log_odds():
    p = torch.tensor([0.5, 0.9, 0.1])
    assert torch.allclose(genrm.reward_eq6(p), torch.tensor([0.0, math.log(9), -math.log(9)]), atol=1e-5)


def test_majority_vote_ties_and_failures():
    assert genrm.majority_vote(["A", "B", "A"])[::2] == ("A", "ok")
    assert genrm.majority_vote(["A", None, None, "B", "B"])[::2] == ("B", "ok")
    assert genrm.majority_vote(["A", "B"])[::2] == (None, "tie")
    assert genrm.majority_vote([None, None])[::2] == (None, "no-verdict")
    assert genrm.majority_vote(["A", "B", None])[1] == {"A": 1, "B": 1}


def test_forced_verdicts_are_argmax_and_counted():
    m, tok = tiny_model(seed=2), CharTok()
    pairs = [Pair(str(i), f"Q{i}", f"ans {i}", f"other {i}") for i in range(3)]
    res = genrm.cot_judge(m, tok, pairs, [True, False, True], n=2, max_new_tokens=5, progress=False)
    prompt = tok.apply_chat(genrm.judge_messages(pairs[0], True))
    for s in res[0]:
        assert s["forced"] and s["verdict"] in ("A", "B")  # a random tiny model never writes [[A]]
        ids = prompt + tok.encode(s["completion"]) + tok.encode(genrm.VERDICT_PREFIX)
        with torch.no_grad():
            lg = m(torch.tensor([ids]))[0, -1]
        want = "A" if lg[tok.token_id("A")] >= lg[tok.token_id("B")] else "B"
        assert s["verdict"] == want
    none = genrm.cot_judge(m, tok, pairs, [True] * 3, n=1, max_new_tokens=5, force=None, progress=False)
    assert all(s["verdict"] is None and not s["forced"] for r in none for s in r)


def test_sampled_forced_verdict_follows_the_tempered_indicator_probabilities():
    """cot_judge(force="sample") draws 'A' iff u < softmax(ab / T)[A], u from the rationale's seed,
    ab computed here from a full forward of prompt + rationale + VERDICT_PREFIX (the sampler feeds
    the prefix in its decode steps instead); T=1 is the paper's sampler, a tiny T the argmax."""
    m, tok = tiny_model(seed=4), CharTok()
    pairs = [Pair(str(i), f"Q{i}", "yes", "no") for i in range(24)]
    for T in (1.0, 3.0, 0.5, 1e-6):
        res = genrm.cot_judge(m, tok, pairs, [True] * 24, n=1, max_new_tokens=4, seed=100, force="sample",
                              verdict_temperature=T, progress=False)
        u, pa = [], []
        for i, (p, r) in enumerate(zip(pairs, res)):
            ids = tok.apply_chat(genrm.judge_messages(p, True)) + tok.encode(r[0]["completion"]) + \
                tok.encode(genrm.VERDICT_PREFIX)
            with torch.no_grad():
                lg = m(torch.tensor([ids]))[0, -1]
            ab = torch.tensor([float(lg[tok.token_id("A")]), float(lg[tok.token_id("B")])])
            pa.append(float(torch.softmax(ab / T, -1)[0]))
            u.append(torch.rand(1, generator=torch.Generator().manual_seed((100 + i) * 7919)).item())
        want = ["A" if x < q else "B" for x, q in zip(u, pa)]
        # a draw within float noise of its threshold could go either way; none is here
        assert all(abs(x - q) > 1e-4 for x, q in zip(u, pa)) and [r[0]["verdict"] for r in res] == want, T
        assert all(r[0]["forced"] for r in res)
    assert 0 < want.count("A") < 24                                  # T -> 0: the argmax, both letters


def test_star_sampling_in_both_orders():
    m, tok = tiny_model(seed=5), CharTok()
    pairs = [Pair(f"q{i}", f"question {i}", f"good {i}", f"bad {i}") for i in range(3)]
    one = genrm.sample_rationales(m, tok, pairs, n=2, max_new_tokens=4, seed=3, progress=False)
    both = genrm.sample_rationales(m, tok, pairs, n=2, max_new_tokens=4, seed=3, both_orders=True,
                                   progress=False)
    assert len(one) == 6 and len(both) == 12
    for p in pairs:
        rows = [r for r in both if r["id"] == p.id]
        assert sorted(r["label"] for r in rows) == ["A", "A", "B", "B"]
        for r in rows:  # the label is where the chosen answer stands in that row's prompt
            assert r["messages"] == genrm.judge_messages(p, r["label"] == "A", "cot")
        first = [r["label"] for r in one if r["id"] == p.id]
        assert [r["label"] for r in rows][:2] == first  # the seeded order first, then the other


def planted(pid, label, verdicts, forced=()):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": pid}]
    return [{"id": pid, "messages": msgs, "label": label, "completion": f"r{k}", "verdict": v,
             "forced": k in forced}
            for k, v in enumerate(verdicts)]


def test_star_filter_and_pairing_rules():
    s = planted("p1", "A", ["A", "B", None, "A"], forced=(3,)) + planted("p2", "B", ["A", "A"]) + \
        planted("p3", "B", ["B", "A", "B", "A"])
    sft = genrm.star_sft_examples(s)
    assert [(r["id"], r["completion"]) for r in sft] == [
        ("p1", "r0"), ("p1", "r3" + genrm.VERDICT_PREFIX + "A]]"), ("p3", "r0"), ("p3", "r2")]
    dpo = genrm.star_dpo_pairs(s, pairs_per_prompt=1, seed=0)
    assert sorted(r["id"] for r in dpo) == ["p1", "p3"]  # p2 has no correct rationale
    for r in dpo:
        good = {x["completion"] for x in s if x["id"] == r["id"] and x["verdict"] == x["label"]}
        bad = {x["completion"] for x in s if x["id"] == r["id"] and x["verdict"] not in (x["label"], None)}
        assert r["chosen"].split(genrm.VERDICT_PREFIX)[0] in good and r["rejected"] in bad
    dpo2 = genrm.star_dpo_pairs(s, pairs_per_prompt=5, seed=0)
    assert sum(r["id"] == "p3" for r in dpo2) == 2 and sum(r["id"] == "p1" for r in dpo2) == 1
    rep = genrm.star_report(s)
    assert rep == {"sampled": 10, "parsed": 8, "forced": 1, "correct": 4, "kept": None, "paired": None}


def test_splits_disjoint_and_cover():
    pairs = [Pair(str(i), "p", "c", "r") for i in range(13)]
    parts = genrm.split_pairs(pairs, 3, seed=4)
    ids = [p.id for part in parts for p in part]
    assert sorted(ids, key=int) == [str(i) for i in range(13)] and len(set(ids)) == 13
    assert sorted(len(x) for x in parts) == [4, 4, 5]
    assert [p.id for p in genrm.split_pairs(pairs, 3, seed=4)[0]] == [p.id for p in parts[0]]


def test_star_driver_artefacts_and_resume(tmp_path, monkeypatch):
    import train as T
    base = tmp_path / "base"
    tiny_model(seed=3).save_pretrained(base)
    tok = CharTok()
    pairs = [Pair(f"q{i}", f"question {i}", f"good {i}", f"bad {i}") for i in range(12)]
    calls = {"sample": 0, "train": []}
    orig = genrm.sample_rationales

    def counting(*a, **k):
        calls["sample"] += 1
        return orig(*a, **k)
    monkeypatch.setattr(genrm, "sample_rationales", counting)
    from model import Llama

    def train_fn(src, rows, ref, out_dir, fail_on=None):
        i = int(out_dir.name.split("_")[1])
        if i == fail_on:
            raise KeyboardInterrupt("killed")
        calls["train"].append((i, src, ref, len(rows)))
        Llama.from_pretrained(src).save_pretrained(out_dir / "model")

    cfg = T.RunConfig(method="star_dpo", iterations=3, model=str(base), samples_per_prompt=4,
                      max_new_tokens=6, seed=1, no_progress=True, device="cpu")
    run = tmp_path / "run"
    monkeypatch.setattr(T, "train_on", lambda c, src, rows, d, tk, obj, ref_path=None:
                        train_fn(src, rows, ref_path, d, fail_on=1))
    with pytest.raises(KeyboardInterrupt):
        T.star(cfg, pairs, tok, run, log=lambda *_: None)
    assert calls["sample"] == 2 and [c[0] for c in calls["train"]] == [0]
    monkeypatch.setattr(T, "train_on", lambda c, src, rows, d, tk, obj, ref_path=None:
                        train_fn(src, rows, ref_path, d))
    final, reps = T.star(cfg, pairs, tok, run, log=lambda *_: None)
    assert calls["sample"] == 3  # iteration 0 and 1 samples were not redone
    trained = [i for i in range(3) if reps[i]["paired"]]  # an iteration with no pairs carries the model over
    assert [c[0] for c in calls["train"]] == trained and trained[0] == 0
    assert all((run / f"iter_{i}" / "model" / "config.json").exists() for i in range(3))
    for i, src, _, n in calls["train"]:  # each iteration trains the latest model
        assert (src == (str(base) if i == 0 else str(run / f"iter_{i - 1}" / "model"))
                and n == reps[i]["paired"])
    assert all(c[2] == str(base) for c in calls["train"])          # reference = base model
    assert final == str(run / "iter_2" / "model")
    seen = []
    for i in range(3):
        rows = [json.loads(l) for l in open(run / f"samples_{i}.jsonl")]
        assert len(rows) == 4 * 4 and all(set(genrm.SCHEMAS["samples"]) <= set(r) for r in rows)
        seen += sorted({r["id"] for r in rows})
        dpo = [json.loads(l) for l in open(run / f"dpo_{i}.jsonl")]
        assert reps[i]["paired"] == len(dpo) and reps[i]["sampled"] == 16
        for r in dpo:
            assert r["id"] in {x["id"] for x in rows}
    assert sorted(seen) == sorted(p.id for p in pairs)  # disjoint splits covering the data
    assert json.loads((run / "star_report.json").read_text()) == reps
