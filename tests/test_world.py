"""The small world: its pairs, rationales and tokenizer, checked against plain integer arithmetic."""
import random

import pytest

import genrm
import world
from data import Pair, load_pairs, load_tokenizer


def _int(lsb_text):
    return int(lsb_text[::-1])


@pytest.mark.parametrize("split", world.SPLITS)
def test_pairs_are_a_right_sum_and_a_near_miss_of_its_length(split):
    rows = world.make_pairs(300, 5, split)
    lo, hi = world.DIGITS[split]
    kinds = set()
    for r in rows:
        a, b = _int(r["prompt"].split("+")[0]), _int(r["prompt"].split("+")[1])
        assert (a, b) == (r["a"], r["b"]) and lo <= len(str(a)) <= hi and lo <= len(str(b)) <= hi
        right, wrong = _int(r["chosen"]), _int(r["rejected"])
        assert right == a + b and wrong != right and len(r["rejected"]) == len(r["chosen"])
        diff = [i for i, (x, y) in enumerate(zip(r["chosen"], r["rejected"])) if x != y]
        moved = abs(int(r["chosen"][diff[0]]) - int(r["rejected"][diff[0]]))
        if r["kind"] == "carry":  # a dropped carry takes away exactly one power of ten that received a carry
            k = len(str(right - wrong)) - 1
            assert right - wrong == 10 ** k and world.carries(a, b)[k] == 1
        elif r["kind"] == "swap":  # two neighbouring digits exchanged
            assert len(diff) == 2 and diff[1] == diff[0] + 1 and sorted(r["chosen"]) == sorted(r["rejected"])
        else:  # one digit moved: by one in the trained kinds, by 2 to 5 in the new ones
            assert len(diff) == 1 and (moved == 1 if r["kind"] == "digit" else 2 <= moved <= 5)
        kinds.add(r["kind"])
    assert kinds == ({"swap", "far"} if split == "ood_errors" else {"carry", "digit"})
    assert world.make_pairs(300, 5, split) == rows and world.make_pairs(300, 6, split) != rows  # seeded


def test_train_and_heldout_never_share_a_question():
    train = {r["prompt"] for r in world.make_pairs(4000, 0, "train")}
    held = {r["prompt"] for r in world.make_pairs(1500, 0, "id")}
    assert not train & held and not train & {r["prompt"] for r in world.make_pairs(500, 0, "ood_errors")}
    assert 0.15 < len(held) / (len(held) + len(train)) < 0.5  # both sides of the division are populated


def test_careful_rationale_adds_correctly_and_names_the_right_answer():
    rng = random.Random(1)
    for r in world.make_pairs(200, 1, "train") + world.make_pairs(50, 1, "ood"):
        for a_is_chosen in (True, False):
            a, b = (r["chosen"], r["rejected"]) if a_is_chosen else (r["rejected"], r["chosen"])
            text, verdict = world.rationale(r["prompt"], a, b, rng, drop=0.0)
            assert verdict == genrm.label(a_is_chosen) == genrm.parse_verdict(text)
            digits = "".join(line.split("=")[1].split()[0][-1] for line in text.split("\n\n")[0].split("\n"))
            assert _int(digits) == r["a"] + r["b"]  # the column digits spell the sum


def test_sloppy_rationales_forget_carries_at_the_set_rate():
    rng = random.Random(2)
    forgot = received = 0
    for r in world.make_pairs(400, 2, "train"):
        text, _ = world.rationale(r["prompt"], r["chosen"], r["rejected"], rng, drop=0.6)
        # a column whose left neighbour summed to 10 or more receives a carry; '+1' where it kept it
        lines = text.split("\n\n")[0].split("\n")
        for k in range(1, len(lines)):
            if int(lines[k - 1].split("=")[1].split()[0]) >= 10:
                received += 1
                forgot += "+1=" not in lines[k]
    assert received > 100 and 0.5 < forgot / received < 0.7


def test_demonstrations_use_the_papers_judge_prompt_and_both_orders():
    rows = world.demonstrations(200, 3)
    assert all(r["messages"][0]["content"] == genrm.SYSTEM_COT for r in rows)
    labels = [genrm.parse_verdict(r["completion"]) for r in rows]
    assert None not in labels
    firsts = [r["messages"][1]["content"].split("Answer]\n")[1].split("\n")[0] for r in rows]
    pairs = {p["id"]: p for p in world.make_pairs(200, 3, "train")}
    chosen_first = sum(f == pairs[r["id"]]["chosen"] for f, r in zip(firsts, rows))
    assert 60 < chosen_first < 140  # the chosen answer is A about half the time


def test_tokenizer_one_token_per_character_and_per_prompt_piece(tmp_path):
    world.write_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert tok.template == "chatml"
    for s in ("0123456789", "7+9=16 66 AB\n", genrm.SYSTEM_COT, genrm.VERDICT_PREFIX):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert len(ids) == (1 if s in world.PROMPT_PIECES else len(s))
    row = world.make_pairs(1, 0, "train")[0]
    pair = Pair(id="x", prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
    for kind in genrm.PROMPT_KINDS:
        for order in (True, False):
            ids = tok.apply_chat(genrm.judge_messages(pair, order, kind))
            assert "<unk>" not in tok.decode(ids, skip_special=False)
            assert len(ids) == 4 + len(row["prompt"] + row["chosen"] + row["rejected"])
    assert tok.encode("A") != tok.encode("B") and len(tok.encode("A")) == 1


def test_true_rationale_of_a_judge_conversation():
    row = world.make_pairs(1, 4, "train")[0]
    pair = Pair(id="x", prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
    for order in (True, False):
        text = world.true_rationale({"messages": genrm.judge_messages(pair, order, "cot")})
        assert genrm.parse_verdict(text) == genrm.label(order)


def test_cli_writes_pairs_the_loader_reads(tmp_path):
    out = tmp_path / "ood.jsonl"
    world.main(["--n", "7", "--seed", "9", "--split", "ood", "--out", str(out)])
    pairs = load_pairs(out)
    assert len(pairs) == 7 and all(len(p.prompt) == 9 for p in pairs)
    with pytest.raises(SystemExit):
        world.main(["--n", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        world.main(["--n", "3", "--split", "nope", "--out", str(out)])


def test_train_runs_in_the_world_only_without_model_and_data(tmp_path, monkeypatch):
    import train
    monkeypatch.setenv("GENRM_CACHE", str(tmp_path))
    world_cfg = train.parse_args([])
    assert world_cfg.world and world_cfg.learning_rate == train.WORLD_LR["star_dpo"]
    expected = {**train.WORLD_DEFAULTS, **train.WORLD_METHOD_DEFAULTS["star_dpo"]}
    assert all(getattr(world_cfg, k) == v for k, v in expected.items())
    assert train.parse_args(["--method", "star_sft"]).epochs == train.WORLD_DEFAULTS["epochs"]
    for argv in (["--data", "x.jsonl"], ["--model", "m"], ["--data=x.jsonl"]):
        real = train.parse_args(argv)
        assert not real.world and real.learning_rate == train.LR["star_dpo"] and real.dtype == "bfloat16"
    paths = train.world_inputs(world_cfg, tmp_path / "run")
    assert paths.model == str(tmp_path / "world" / world.base_dir().name / "model")
    assert paths.data.endswith("world_train.jsonl") and paths.eval_data.endswith("world_id.jsonl")
    monkeypatch.setitem(world.BASE_RECIPE, "lr", 1.0)  # another recipe is another base, never a stale one
    assert world.base_dir().name not in paths.model
