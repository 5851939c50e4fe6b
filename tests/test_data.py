"""Tokenizers and chat templates against golden ids; pair JSONL errors and counted skips."""
import json

import pytest

from conftest import golden, need_shared
from data import LoadStats, load_pairs, load_tokenizer, pad, prompt_completion_batch


def test_smollm2_tokenizer_golden(smoltok):
    for r in json.loads(golden("smollm2_tokenizer_golden.json").read_text()):
        assert smoltok.encode(r["text"]) == r["ids"], r["text"]
    # every digit is its own token
    ids = smoltok.encode("year 20481")
    assert [smoltok.decode([i]) for i in ids[-5:]] == list("20481")


def test_smollm2_chat_template_golden(smoltok):
    g = json.loads(golden("smollm2_135m_instruct_golden.json").read_text())
    for r in g["records"]:
        ids = smoltok.apply_chat(r["messages"])
        assert ids == r["input_ids"]
        assert ids[0] != smoltok.eot_id and smoltok.bos_id is None  # ChatML: no BOS


def test_llama3_tokenizer_and_chat_golden():
    g = json.loads(golden("llama3_tokenizer_golden.json").read_text())
    tok = load_tokenizer(need_shared("assets", "llama3-tokenizer"))
    for r in g["plain"]:
        assert tok.encode(r["text"]) == r["ids"], r["text"]
    for r in g["chat"]:
        ids = tok.apply_chat(r["messages"], add_generation_prompt=r["add_generation_prompt"])
        assert ids == r["ids"]
        assert ids.count(tok.bos_id) == 1 and ids[0] == 128000
    assert tok.eot_id == 128009
    assert tok.decode(tok.encode("naïve café")) == "naïve café"


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_pairs_errors_name_file_line_field(tmp_path):
    ok = json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"})
    p = _write(tmp_path, [ok, "{not json"])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: malformed JSON"):
        load_pairs(p)
    p = _write(tmp_path, [ok, ok, json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: missing field 'rejected'"):
        load_pairs(p)
    p = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"})])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'chosen' must be a string"):
        load_pairs(p)


def test_pairs_skips_are_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "  ", "rejected": "r"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": "c2", "rejected": "r2"}]
    st = LoadStats()
    pairs = load_pairs(_write(tmp_path, [json.dumps(r) for r in rows]), stats=st)
    assert [x.chosen for x in pairs] == ["c", "c2"]
    assert st.read == 4 and st.kept == 2
    assert st.skipped == {"empty answer": 1, "chosen == rejected": 1}


def test_seeded_limit_is_deterministic(tmp_path):
    rows = [json.dumps({"id": str(i), "prompt": "p", "chosen": f"c{i}", "rejected": "r"}) for i in range(50)]
    p = _write(tmp_path, rows)
    a = [x.id for x in load_pairs(p, limit=10, seed=3)]
    assert a == [x.id for x in load_pairs(p, limit=10, seed=3)]
    assert a != [x.id for x in load_pairs(p, limit=10, seed=4)]
    assert a == sorted(a, key=int)


def test_padding_and_loss_masks():
    idx, valid, mask = prompt_completion_batch([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=0)
    assert idx.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert valid.tolist() == [[True, True, True, False], [True] * 4]
    assert mask.tolist() == [[False, False, True, False], [False, True, True, True]]
    idx, valid = pad([[1], [2, 3]], 9, side="left")
    assert idx.tolist() == [[9, 1], [2, 3]] and valid.tolist() == [[False, True], [True, True]]
