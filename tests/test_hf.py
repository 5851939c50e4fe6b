"""Differential tests against HF transformers itself (requirements-oracle.txt; skipped where it is
not installed): our logits, greedy tokens and their log-probs against `LlamaForCausalLM` and
`generate` on a tiny random Llama-3.1 in float32, and an oracle.py dump against the same fields
dumped from transformers (ORACLE.md's example), through `oracle.py --compare`."""
import json

import pytest
import torch

import oracle
from conftest import tiny_model
from sample import generate

transformers = pytest.importorskip("transformers", reason="not installed (requirements-oracle.txt)")


def _hf(m, directory):
    m.save_pretrained(directory)
    return transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_llama_for_causal_lm(tmp_path, tie):
    m = tiny_model(seed=11, tie_word_embeddings=tie)
    hf = _hf(m, tmp_path / "m")
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() < 1e-5
        # positions past original_max_position_embeddings (64 here), where 'llama3' scaling matters
        pos = torch.arange(40)[None].expand(2, 40) + 300
        assert (m(ids, pos=pos) - hf(ids, position_ids=pos).logits).abs().max() < 1e-5
        # a right-padded batch: the real positions agree
        valid = torch.ones(2, 40, dtype=torch.bool)
        valid[1, 25:] = False
        ours, theirs = m(ids, valid=valid), hf(ids, attention_mask=valid.long()).logits
        assert (ours[valid] - theirs[valid]).abs().max() < 1e-5


def test_greedy_tokens_and_logprobs_match_generate(tmp_path):
    m = tiny_model(seed=12)
    hf = _hf(m, tmp_path / "m")
    prompts = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(prompts, max_new_tokens=24, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    want = out.sequences[:, 8:]
    want_lp = torch.stack(out.scores, 1).log_softmax(-1).gather(2, want[..., None]).squeeze(2)
    got = generate(m, prompts.tolist(), max_new_tokens=24, temperature=0, progress=False)
    assert [c[0].tokens for c in got] == want.tolist()
    assert (torch.tensor([c[0].logprobs for c in got]) - want_lp).abs().max() < 1e-5


def hf_dump(model_dir, rows):
    """The oracle's per-sequence fields from HF transformers, one sequence at a time (ORACLE.md's
    example, so it is tested): token ids, per-token log-probs, sum, mean, top-5."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for r in rows:
        prompt, comp = r["prompt_ids"], r["completion_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:-1].float()
        lp = logits.log_softmax(-1)
        tok = lp.gather(1, torch.tensor(comp)[:, None]).squeeze(1)
        top = lp.topk(5, -1)
        out.append({"id": r["id"], "token_ids": comp, "logprobs": tok.tolist(),
                    "logprob_sum": tok.sum().item(), "logprob_mean": tok.mean().item(),
                    "top5_ids": top.indices.tolist(), "top5_logprobs": top.values.tolist()})
    return out


def test_oracle_dump_agrees_with_a_transformers_dump(tmp_path, capsys):
    tiny_model(seed=13).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(4)
    rows = [{"id": f"r{i}", "prompt_ids": torch.randint(3, 300, (5 + i,), generator=g).tolist(),
             "completion_ids": torch.randint(3, 300, (12 - i,), generator=g).tolist()} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = hf_dump(tmp_path / "m", rows)
    (tmp_path / "hf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
    assert oracle.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                        "--out", str(tmp_path / "ours.jsonl"), "--no-float64"]) == 0
    assert oracle.main(["--compare", str(tmp_path / "ours.jsonl"), str(tmp_path / "hf.jsonl"),
                        "--tol", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "rows: 4 matched, 0 in only one dump" in out
    assert "top-1 agreement 1.0000, top-5 overlap 1.0000" in out
