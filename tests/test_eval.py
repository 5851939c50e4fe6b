"""eval.py on planted judgements against hand-computed values; Best-of-N; batch-size invariance."""
import json

import pytest

import eval as E
import scores as S
import stats
from conftest import CharTok, tiny_model
from data import Pair


def P(i, cat, chosen="cc", rejected="r"):
    return Pair(str(i), "q", chosen, rejected, category=cat)


def votes(*vs):
    return {"votes": [[v, False] for v in vs]}


def test_always_a_judge_scores_half_with_both_orders():
    pairs = [P(i, "chat") for i in range(6)]
    recs = [{"id": p.id, "category": p.category, "order": {"A": votes("A"), "B": votes("A")}} for p in pairs]
    s = S.summarize(pairs, recs)
    assert s["per_category"]["all"]["maj@N"] == 0.5
    assert s["position"] == {"acc_chosen_as_A": 1.0, "acc_chosen_as_B": 0.0, "swap_consistency": 0.0}


def test_planted_accuracy_sections_and_swap_consistency():
    pairs = [P(0, "chat"), P(1, "chat", chosen="c", rejected="rrr"), P(2, "safety"),
             P("gsm8k-1", "reasoning"), P("hep-1", "reasoning"), P("hep-2", "reasoning")]
    recs = [
        {"order": {"A": votes("A", "B", "A"), "B": votes("B", "B", "A")}},   # right, right: maj 1, consistent
        {"order": {"A": votes("B", "B", "A"), "B": votes("A", "A", "A")}},   # wrong, wrong: consistent
        {"order": {"A": votes("A", "B"), "B": votes("B", None, "B")}},      # maj@1: 1 and 1; A order tied
        {"order": {"A": votes("A"), "B": votes("A")}},                       # 0.5, inconsistent
        {"order": {"A": votes(None, None), "B": votes("B")}},               # no verdict, right
        {"order": {"A": votes("A"), "B": votes("B")}},                       # 1
    ]
    for p, r in zip(pairs, recs):
        r.update(id=p.id, category=p.category)
    s = S.summarize(pairs, recs)
    pc = s["per_category"]
    assert pc["chat"]["maj@N"] == 0.5 and pc["chat"]["maj@1"] == 0.5 and pc["chat"]["longer"] == 0.5
    assert pc["safety"]["maj@N"] == 0.5 and pc["safety"]["maj@1"] == 1.0
    # reasoning = mean(math, code) as in RewardBench: math 0.5, code mean(0.5, 1.0) = 0.75
    assert pc["reasoning/math"]["maj@N"] == 0.5 and pc["reasoning/code"]["maj@N"] == 0.75
    assert pc["reasoning"]["maj@N"] == pytest.approx(0.625)
    assert s["sections"]["maj@N"] == pytest.approx((0.5 + 0.5 + 0.625) / 3)
    assert s["sections"]["present"] == ["chat", "safety", "reasoning"]
    # swap consistency over pairs with a verdict in both orders: pairs 0, 1, 3, 5 -> 1, 1, 0, 1
    assert s["position"]["swap_consistency"] == pytest.approx(0.75)
    assert s["tie_rate"] == pytest.approx(1 / 12)         # pair 2, order A: 1-1
    assert s["no_verdict_rate"] == pytest.approx(1 / 12)  # pair 4, order A: no vote at all
    assert s["parse_failure_rate"] == pytest.approx(3 / 24)  # 3 of 24 votes have no verdict
    assert s["per_category"]["all"]["maj@N"] == pytest.approx((1 + 0 + 0.5 + 0.5 + 0.5 + 1) / 6)


def test_pooled_over_both_orders_cancels_position_bias():
    pairs = [P(i, "chat") for i in range(5)]
    g = lambda a, b: {"order": {"A": {"p": a}, "B": {"p": b}}}  # noqa: E731  p(chosen > rejected) per order
    recs = [g(0.9, 0.3), g(0.6, 0.2), g(0.7, 0.3),   # position-biased judge: means 0.6, 0.4, 0.5
            {"order": {"A": votes("A", "A", "B"), "B": votes("A", "B", None)}},  # chosen 2 + 1 of 5 votes
            {"order": {"A": votes("A", "A"), "B": votes("A", "A")}}]               # always A: 2 of 4
    for p, r in zip(pairs, recs):
        r.update(id=p.id, category=p.category)
    s = S.summarize(pairs, recs)
    # by hand: 1, 0, 0.5 (exact tie), 1 (3 of 5 votes), 0.5
    assert s["per_category"]["all"]["pooled"] == pytest.approx((1 + 0 + 0.5 + 1 + 0.5) / 5)
    assert s["per_category"]["all"]["maj@N"] == 0.5  # each pair right in one order only (or a tie)


def test_bt_accuracy_from_rewards():
    pairs = [P(i, "chat") for i in range(4)]
    recs = [{"id": str(i), "category": "chat", "margin": m} for i, m in enumerate([0.3, -0.1, 2.0, 0.0])]
    s = S.summarize(pairs, recs)
    assert s["per_category"]["all"]["maj@N"] == 0.5 and "position" not in s


def test_best_of_n_on_planted_file(tmp_path):
    rows = [{"prompt": "a", "reference_output": "r",
             "candidates": [{"output": "x", "judge_pref": s} for s in (0.1, 0.9, 0.5)]},
            {"prompt": "b", "reference_output": "r",
             "candidates": [{"output": "x", "judge_pref": s} for s in (0.2, 0.4)]}]
    f = tmp_path / "bon.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    rows = E.load_candidates(f)
    picks = E.best_of_n_picks([[0.0, 1.0, 3.0], [2.0, 2.0]])
    assert picks == [2, 0]  # argmax, first on ties
    rep = E.best_of_n_report(rows, picks)
    assert rep["picked"] == pytest.approx((0.5 + 0.2) / 2)
    assert rep["random"] == pytest.approx((0.5 + 0.3) / 2) and rep["oracle"] == pytest.approx((0.9 + 0.4) / 2)
    f.write_text(json.dumps({"prompt": "a", "candidates": []}))
    with pytest.raises(ValueError, match=r"bon\.jsonl:1: missing field 'reference_output'"):
        E.load_candidates(f)


def test_judgements_do_not_depend_on_batch_size():
    m, tok = tiny_model(seed=1), CharTok()
    pairs = [Pair(str(i), f"question {i}" * (1 + i % 3), f"answer {i}", f"other {i}!") for i in range(5)]
    for judge, kw in (("genrm", {}), ("cot", dict(samples=2, max_new_tokens=5))):
        a = E.judge_pairs(m, tok, pairs, judge, both_orders=True, batch_size=1, progress=False, **kw)
        b = E.judge_pairs(m, tok, pairs, judge, both_orders=True, batch_size=4, progress=False, **kw)
        if judge == "genrm":
            for x, y in zip(a, b):
                for k in ("A", "B"):
                    assert abs(x["order"][k]["p"] - y["order"][k]["p"]) < 1e-5
        else:
            assert a == b


def test_intervals_and_per_pair_scores_kept_for_paired_comparisons():
    pairs = [P(i, "chat") for i in range(4)] + [P(4, "safety", chosen="c", rejected="rrr")]
    recs = [{"order": {"A": votes("A"), "B": votes("B")}},   # 1
            {"order": {"A": votes("A"), "B": votes("A")}},   # 0.5
            {"order": {"A": votes("B"), "B": votes("A")}},   # 0
            {"order": {"A": votes("A"), "B": votes("B")}},   # 1
            {"order": {"A": votes("A"), "B": votes("B")}}]   # 1
    for p, r in zip(pairs, recs):
        r.update(id=p.id, category=p.category)
    s = S.summarize(pairs, recs)
    pp = s["per_pair"]
    assert pp["id"] == ["0", "1", "2", "3", "4"] and pp["group"] == ["chat"] * 4 + ["safety"]
    assert pp["maj@N"] == [1, 0.5, 0, 1, 1] and pp["longer"] == [1, 1, 1, 1, 0]
    al = s["per_category"]["all"]
    assert al["maj@N"] == pytest.approx(0.7)
    # A 0.5 score: bootstrap over pairs.
    assert al["ci"]["maj@N"] == list(stats.bootstrap_ci([[1, 0.5, 0, 1, 1]]))
    assert al["ci"]["longer"] == list(stats.wilson(4, 5))                     # 0/1 scores: Wilson
    assert al["ci"]["maj@N"][0] < 0.7 < al["ci"]["maj@N"][1]
    # sections: chat and safety weighted 1/2 each, the stratified bootstrap
    sec = s["sections"]
    assert sec["maj@N"] == pytest.approx((2.5 / 4 + 1) / 2) and sec["present"] == ["chat", "safety"]
    assert sec["ci"]["maj@N"] == list(stats.bootstrap_ci([[1, 0.5, 0, 1], [1]], [0.5, 0.5]))


def test_majority_curve_from_the_first_k_votes():
    pairs = [P(0, "chat"), P(1, "chat")]
    recs = [{"order": {"A": votes("B", "A", "A", "A"), "B": votes("B", "A", None, "A")}},
            {"order": {"A": votes("A", "B", "B", "B"), "B": votes("A", "A", "A", "B")}}]
    for p, r in zip(pairs, recs):
        r.update(id=p.id, category=p.category)
    s = S.summarize(pairs, recs)
    # by hand, per order (chosen is the key letter): k=1, k=2 (a 1-1 tie counts 0), k=4
    #   pair 0, A: B | B,A tie | 3A-1B -> 0, 0, 1;  B: B | tie | 1B-2A -> 1, 0, 0
    #   pair 1, A: A | tie | 1A-3B -> 1, 0, 0;      B: A | A,A | 3A-1B -> 0, 0, 0
    assert s["per_pair"]["maj@k"] == {"1": [0.5, 0.5], "2": [0.0, 0.0], "4": [0.5, 0.0]}
    curve = s["per_category"]["all"]["maj@k"]
    assert curve == {"1": 0.5, "2": 0.0, "4": 0.25}
    assert curve["1"] == s["per_category"]["all"]["maj@1"] and curve["4"] == s["per_category"]["all"]["maj@N"]
    assert set(s["per_category"]["all"]["ci"]["maj@k"]) == {"1", "2", "4"}
    genrm = [{"id": "0", "category": "chat", "order": {"A": {"p": 0.7}, "B": {"p": 0.4}}}]
    assert S.summarize(pairs[:1], genrm)["per_pair"]["maj@k"] == {}  # no votes, no curve
    assert "maj@2" in S.markdown({"f": s}) and "[0." in S.markdown({"f": s})
