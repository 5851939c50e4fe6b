"""oracle.py against independent computations: a float64 forward written in the tests (test_model's
naive_forward), the DPO / Bradley-Terry formulas by hand, the nucleus rule in float64, the GenRM
indicator tokens from full logits; --compare on a dump against itself and a perturbed copy; bad
input; --diagnose."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

import oracle
import oracle_compare
from conftest import tiny_model
from data import Pair, load_tokenizer
from genrm import judge_messages
from test_model import naive_forward


def _ids(g, n):
    return torch.randint(3, 300, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny Llama (the policy), a second one (the reference), token-id rows and their dump."""
    d = tmp_path_factory.mktemp("oracle")
    policy, ref = tiny_model(seed=3), tiny_model(seed=4)
    policy.save_pretrained(d / "policy")
    ref.save_pretrained(d / "ref")
    g = torch.Generator().manual_seed(5)
    rows = [{"id": "c0", "prompt_ids": _ids(g, 6), "completion_ids": _ids(g, 9)},
            {"id": "p0", "prompt_ids": _ids(g, 5), "chosen_ids": _ids(g, 7), "rejected_ids": _ids(g, 4)},
            {"id": "p1", "prompt_ids": _ids(g, 8), "chosen_ids": _ids(g, 3), "rejected_ids": _ids(g, 10)}]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "ours.jsonl"
    assert oracle.main(["--model", str(d / "policy"), "--data", str(d / "data.jsonl"), "--out", str(out),
                        "--ref", str(d / "ref"), "--temperature", "0.7", "--top-p", "0.9"]) == 0
    dump = [json.loads(x) for x in out.read_text().splitlines()]
    return {"dir": d, "policy": policy, "ref": ref, "rows": rows, "out": out, "dump": dump}


def _naive_logprobs(m, prompt, comp):
    """Float64 log-probs [C] of comp after prompt, and the float64 logits [C, V] that predict them."""
    logits = naive_forward(m, prompt + comp)[len(prompt) - 1:-1]
    lp = torch.log_softmax(logits, -1)
    return lp.gather(1, torch.tensor(comp)[:, None]).squeeze(1), logits


def _seqs(row, dump_row):
    if "completion_ids" in row:
        return [(row["completion_ids"], dump_row)]
    return [(row["chosen_ids"], dump_row["chosen"]), (row["rejected_ids"], dump_row["rejected"])]


def test_float32_logprobs_match_an_independent_float64_forward(setup):
    for row, got in zip(setup["rows"], setup["dump"]):
        assert got["id"] == row["id"] and got["prompt_ids"] == row["prompt_ids"]
        for comp, rec in _seqs(row, got):
            want, logits = _naive_logprobs(setup["policy"], row["prompt_ids"], comp)
            assert rec["token_ids"] == comp
            assert (torch.tensor(rec["logprobs"], dtype=torch.float64) - want).abs().max() < 1e-4
            assert rec["logprob_sum"] == pytest.approx(want.sum().item(), abs=1e-4)
            assert rec["logprob_mean"] == pytest.approx(want.mean().item(), abs=1e-5)
            # the oracle's own float64 recompute is another float64 forward; the two differ only by the
            # RoPE frequencies (float32 by convention there, float64 in naive_forward): ~2e-7 here
            assert rec["logprob_sum_float64"] == pytest.approx(want.sum().item(), abs=1e-6)
            assert 0 < rec["float64_max_abs_diff"] < 1e-4
            lp = torch.log_softmax(logits, -1)
            assert rec["top5_ids"] == lp.topk(5, -1).indices.tolist()
            top = torch.tensor(rec["top5_logprobs"], dtype=torch.float64)
            assert torch.allclose(top, lp.topk(5, -1).values, atol=1e-4)


def test_dpo_quantities_in_trl_convention(setup):
    beta = 0.1
    for row, got in zip(setup["rows"][1:], setup["dump"][1:]):
        pw, _ = _naive_logprobs(setup["policy"], row["prompt_ids"], row["chosen_ids"])
        pl, _ = _naive_logprobs(setup["policy"], row["prompt_ids"], row["rejected_ids"])
        rw, _ = _naive_logprobs(setup["ref"], row["prompt_ids"], row["chosen_ids"])
        rl, _ = _naive_logprobs(setup["ref"], row["prompt_ids"], row["rejected_ids"])
        h = (pw.sum() - rw.sum()) - (pl.sum() - rl.sum())
        assert got["h"] == pytest.approx(h.item(), abs=1e-4)
        assert got["loss"] == pytest.approx(math.log1p(math.exp(-beta * h.item())), abs=1e-5)
        assert got["chosen_reward"] == pytest.approx(beta * (pw.sum() - rw.sum()).item(), abs=1e-5)
        assert got["rejected_reward"] == pytest.approx(beta * (pl.sum() - rl.sum()).item(), abs=1e-5)
        assert got["chosen"]["ref_logprob_sum"] == pytest.approx(rw.sum().item(), abs=1e-4)


def test_processed_logprobs_are_the_renormalised_nucleus(setup):
    row, got = setup["rows"][0], setup["dump"][0]
    _, logits = _naive_logprobs(setup["policy"], row["prompt_ids"], row["completion_ids"])
    probs = torch.softmax(logits / 0.7, -1)
    inside = 0
    for t, tok in enumerate(row["completion_ids"]):
        ps, order = probs[t].sort(descending=True)
        keep = (ps.cumsum(0) - ps) <= 0.9  # Meta's rule: drop a token once the mass before it exceeds p
        kept = dict(zip(order[keep].tolist(), (ps[keep] / ps[keep].sum()).tolist()))
        if tok in kept:
            inside += 1
            assert got["processed_logprobs"][t] == pytest.approx(math.log(kept[tok]), abs=1e-4)
        else:
            assert got["processed_logprobs"][t] is None
    assert 0 < inside < len(row["completion_ids"])  # both cases happen in this row
    assert got["processed_logprob_sum"] is None and got["processing"] == {"temperature": 0.7, "top_p": 0.9}


def test_tempered_logprobs_and_entropy_match_the_naive_tempered_softmax(setup):
    """--temperature 0.7: each completion token's log softmax(logits / T) and the entropy of
    softmax(logits / T), against a float64 forward written in the tests; pairs included."""
    for row, got in zip(setup["rows"], setup["dump"]):
        for name, rec in oracle_compare.row_sequences(got):
            comp = row["completion_ids"] if name == "" else row[f"{name}_ids"]
            _, logits = _naive_logprobs(setup["policy"], row["prompt_ids"], comp)
            lp = torch.log_softmax(logits / 0.7, -1)                                  # [C, V]
            want = lp.gather(1, torch.tensor(comp)[:, None]).squeeze(1)
            entropy = -(lp.exp() * lp).sum(-1)
            assert rec["tempered_logprobs"] == pytest.approx(want.tolist(), abs=1e-5)
            assert rec["entropy"] == pytest.approx(entropy.tolist(), abs=1e-5)
            assert rec["tempered_logprobs"] != pytest.approx(rec["logprobs"], abs=1e-3)  # T matters


def test_compare_passes_itself_and_fails_a_moved_token_naming_the_row(setup, tmp_path, capsys):
    assert oracle.main(["--compare", str(setup["out"]), str(setup["out"])]) == 0
    assert capsys.readouterr().out.strip().endswith("PASS")
    theirs = [json.loads(json.dumps(r)) for r in setup["dump"]]
    theirs[2]["rejected"]["logprobs"][3] += 0.3
    f = tmp_path / "theirs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in theirs))
    assert oracle.main(["--compare", str(setup["out"]), str(f), "--tol", "1e-3"]) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith("FAIL")
    assert "worst rows: p1/rejected (0.3 at token 3)" in out
    n = sum(len(rec["logprobs"]) for r in setup["dump"] for _, rec in oracle_compare.row_sequences(r))
    assert "max 0.3 " in out and f"[0.8, 1.2]: {1 / n:.4f}" in out  # one token, exp(0.3) = 1.35
    # a tolerance above the moved token passes
    assert oracle.main(["--compare", str(setup["out"]), str(f), "--tol", "0.31"]) == 0


def test_bad_input_is_one_line_naming_file_line_field(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(setup["rows"][0])
    cases = [(json.dumps({"id": "x", "prompt_ids": [1, 2], "chosen_ids": [3]}),
              "bad.jsonl:2: missing field 'rejected_ids'"),
             (json.dumps({"id": "x", "prompt_ids": [1, 2], "completion_ids": [3, 999]}),
              "bad.jsonl:2: field 'completion_ids' must be a non-empty list of token ids in [0, 300)"),
             (json.dumps({"id": "c0", "prompt_ids": [1], "completion_ids": [3]}),
              "bad.jsonl:2: field 'id': duplicate"),
             ("{oops", "bad.jsonl:2: malformed JSON")]
    for line, msg in cases:
        bad.write_text(good + "\n" + line + "\n")
        assert oracle.main(["--model", str(setup["dir"] / "policy"), "--data", str(bad)]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    bad.write_text(json.dumps({"id": "a", "token_ids": [1, 2], "logprobs": [-1.0]}) + "\n")
    assert oracle.main(["--compare", str(bad), str(bad)]) == 1
    assert "bad.jsonl:1: field 'logprobs' must be a list as long as its token_ids" in capsys.readouterr().err


def _char_tokenizer(directory):
    """A character-level ChatML tokenizer.json that fits the tiny model's 300-token vocabulary."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    tok = HFTokenizer(models.BPE(vocab={s: i for i, s in enumerate(specials + chars)}, merges=[]))
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))


def test_text_pairs_bradley_terry_and_genrm(tmp_path):
    m = tiny_model(seed=6, score_head=True, max_position_embeddings=4096)
    m.save_pretrained(tmp_path / "m")
    _char_tokenizer(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    row = {"id": "t0", "prompt": "Sum 2+2?", "chosen": "4", "rejected": "5, surely"}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    assert oracle.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out",
                        str(tmp_path / "o.jsonl"), "--genrm", "--no-float64"]) == 0
    got = json.loads((tmp_path / "o.jsonl").read_text())
    prompt = tok.apply_chat([{"role": "user", "content": row["prompt"]}])
    assert got["prompt_ids"] == prompt
    assert got["rejected"]["token_ids"] == tok.encode(row["rejected"]) + [tok.eot_id]
    rewards = []
    with torch.no_grad():
        for k in ("chosen", "rejected"):
            ids = torch.tensor([prompt + got[k]["token_ids"]])
            rewards.append((m.hidden(ids)[0, -1] @ m.score.weight[0]).item())  # the last token's hidden state
            assert got[k]["reward"] == pytest.approx(rewards[-1], abs=1e-5)
        assert got["bt_loss"] == pytest.approx(math.log1p(math.exp(rewards[1] - rewards[0])), abs=1e-5)
        pair = Pair(id="t0", prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
        a, b = tok.token_id("A"), tok.token_id("B")
        for key, chosen_is_a in (("chosen_is_a", True), ("chosen_is_b", False)):
            lg = m(torch.tensor([tok.apply_chat(judge_messages(pair, chosen_is_a, "genrm"))]))[0, -1]
            p_a = torch.softmax(lg[[a, b]].double(), 0)[0].item()
            assert got["genrm_p_a"][key] == pytest.approx(p_a, abs=1e-5)
    assert got["genrm_p_a"]["chosen_is_a"] != pytest.approx(got["genrm_p_a"]["chosen_is_b"], abs=1e-3)


def test_diagnose_reports_batching_and_bf16(setup, capsys):
    assert oracle.main(["--model", str(setup["dir"] / "policy"), "--data", str(setup["dir"] / "data.jsonl"),
                        "--diagnose"]) == 0
    out = capsys.readouterr().out
    batched, bf16 = out.split("== ")[1:]
    assert batched.startswith("float32, batch size 8") and bf16.startswith("bfloat16")

    def max_diff(section):
        return float(section.split("max ")[1].split(" ")[0])
    assert max_diff(batched) < 1e-4 < max_diff(bf16)  # padding changes rounding only; bf16 much more
