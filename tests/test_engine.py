"""generate's fast paths (KV cache, shared prefix, grouped rows, continuous batching, the suffix)
against reference_generate, the plain loop with a full no-cache forward per step."""
import pytest
import torch

import engine
from conftest import tiny_model
from sample import generate, reference_generate


def _same(fast, ref):
    for o, r in zip(fast, ref):
        for c, d in zip(o, r):
            assert c.tokens == d.tokens and c.finish == d.finish
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-5, rtol=0)
            assert (c.suffix_logits is None) == (d.suffix_logits is None)
            if c.suffix_logits is not None:
                want = torch.tensor(d.suffix_logits)
                assert torch.allclose(torch.tensor(c.suffix_logits), want, atol=1e-5, rtol=0)


def test_generate_equals_the_reference_loop():
    m = tiny_model(seed=6)
    g = torch.Generator().manual_seed(1)
    head = list(range(30, 50))                           # 20 tokens every prompt starts with: the cascade
    ps = [head + torch.randint(3, 300, (k,), generator=g).tolist() for k in (4, 9, 1)]
    greedy = dict(max_new_tokens=6, temperature=0)
    assert generate(m, ps, progress=False, **greedy)[0][0].finish == "length"
    _same(generate(m, ps, progress=False, **greedy), reference_generate(m, ps, **greedy))
    sampled = dict(n=3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7, suffix=[7, 8],
                   suffix_logit_ids=[3, 4])
    sampled["stop_ids"] = [c.tokens[2] for c in reference_generate(m, ps[:1], **sampled)[0]][:2]
    ref = reference_generate(m, ps, **sampled)
    assert {c.finish for o in ref for c in o} == {"stop", "length"}
    for prompt_batch in (1, 8):                          # refilled rows; all rows at once, grouped by prompt
        _same(generate(m, ps, prompt_batch=prompt_batch, progress=False, **sampled), ref)


@pytest.mark.parametrize("one_row_gemv", [True, False])
def test_one_row_generate_equals_the_reference_loop(monkeypatch, one_row_gemv):
    # On an Intel CPU a one-row engine keeps the weights in F.linear's layout (pack_weight,
    # ONE_ROW_GEMV), elsewhere oneDNN's packed one: both kernels are checked against the plain loop
    # on whichever machine the tests run.
    monkeypatch.setattr(engine, "ONE_ROW_GEMV", one_row_gemv)
    m = tiny_model(seed=8)
    if torch.backends.mkldnn.is_available():  # the flag decides which kernel runs
        assert engine.Engine(m, 1, 32).layers[0].wqkv.is_mkldnn == (not one_row_gemv)
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(3, 300, (13,), generator=g).tolist()]
    for kw in (dict(temperature=0),
               dict(temperature=1.0, top_p=0.9, seed=3, suffix=[7, 8], suffix_logit_ids=[3, 4])):
        _same(generate(m, ps, max_new_tokens=9, progress=False, **kw),
              reference_generate(m, ps, max_new_tokens=9, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_rms_norm_is_bitwise_the_models(dtype):
    # The engine's float32 norm is one F.rms_norm call; it must give the module's bits exactly, for
    # every width and scale (the sampler's results may not move), and bf16 must stay the module.
    from model import RMSNorm
    g = torch.Generator().manual_seed(3)
    for H in (8, 64, 576, 1536):
        norm = RMSNorm(H, 1e-5)
        norm.weight.data = torch.randn(H, generator=g)
        norm = norm.to(dtype)
        for rows, scale in ((1, 1e-3), (8, 1.0), (37, 40.0)):
            x = (torch.randn(rows, 1, H, generator=g) * scale).to(dtype)
            with torch.no_grad():
                assert torch.equal(engine.rms_norm(norm, x), norm(x))


def test_prefill_from_slot_zero_is_bitwise_the_masked_prefill(monkeypatch):
    # A prefill from slot 0 lets SDPA apply the causal mask itself; the hidden states and every
    # cached key and value must be bitwise those of the explicit additive mask.
    m = tiny_model(seed=8).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(3, 300, (3, 40), generator=g)                 # right-padded rows look the same
    pos = torch.arange(40)[None].expand(3, 40)
    assert engine.prefill_from_slot_zero(pos) and not engine.prefill_from_slot_zero(pos + 1)

    def run():
        e = engine.Engine(m, 3, 48)
        with torch.no_grad():
            h = e.hidden(idx, pos=pos)
        return h, [(layer.cache.k.clone(), layer.cache.v.clone()) for layer in e.layers]

    fast, fast_cache = run()
    monkeypatch.setattr(engine, "prefill_from_slot_zero", lambda slot: False)
    masked, masked_cache = run()
    assert torch.equal(fast, masked)
    assert all(torch.equal(a, b) for x, y in zip(fast_cache, masked_cache) for a, b in zip(x, y))
