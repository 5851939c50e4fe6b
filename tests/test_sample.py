"""sample.py against a no-cache argmax loop, batch invariance, log-probs, top-p, stops, one prefill."""
import pytest
import torch

from conftest import tiny_model
from model import Llama
from sample import generate, top_p_filter


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]


def naive_greedy(m, p, k):
    ids = list(p)
    with torch.no_grad():
        for _ in range(k):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(p):]


def test_greedy_equals_no_cache_loop_ragged_batch():
    m = tiny_model(seed=1)
    out = generate(m, prompts(), max_new_tokens=7, temperature=0, progress=False)
    for p, o in zip(prompts(), out):
        assert o[0].tokens == naive_greedy(m, p, 7)
        assert o[0].finish == "length"


def test_batch_invariance_greedy_and_sampled():
    m = tiny_model(seed=2)
    ps = prompts()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, n=3, seed=[11, 12, 13, 14])):
        mixed = generate(m, ps, max_new_tokens=6, progress=False, **kw)
        for i, p in enumerate(ps):
            kw1 = dict(kw, seed=[kw["seed"][i]]) if "seed" in kw else kw
            alone = generate(m, [p], max_new_tokens=6, progress=False, **kw1)
            assert [c.tokens for c in alone[0]] == [c.tokens for c in mixed[i]]
        chunked = generate(m, ps, max_new_tokens=6, progress=False, prompt_batch=1, **kw)
        assert [[c.tokens for c in o] for o in chunked] == [[c.tokens for c in o] for o in mixed]


def test_same_seed_same_output_other_seed_differs():
    m = tiny_model(seed=3)
    a = generate(m, prompts(), n=2, max_new_tokens=8, seed=5, progress=False)
    b = generate(m, prompts(), n=2, max_new_tokens=8, seed=5, progress=False)
    c = generate(m, prompts(), n=2, max_new_tokens=8, seed=6, progress=False)
    tok = lambda r: [[x.tokens for x in o] for o in r]  # noqa: E731
    assert tok(a) == tok(b) and tok(a) != tok(c)
    assert a[0][0].tokens != a[0][1].tokens  # the n samples differ


def test_logprobs_equal_full_forward():
    m = tiny_model(seed=4)
    ps = prompts()
    out = generate(m, ps, n=2, max_new_tokens=6, temperature=0.7, top_p=0.8, progress=False)
    for p, o in zip(ps, out):
        for c in o:
            ids = torch.tensor([p + c.tokens])
            with torch.no_grad():
                lp = torch.log_softmax(m(ids)[0], -1)
            want = [float(lp[len(p) - 1 + t, tk]) for t, tk in enumerate(c.tokens)]
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4)


def test_top_p_keeps_the_promised_set():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    # at an exact tie (p = 0.5 = mass of the first token) Meta's strict '>' keeps the next token too
    for p, kept in ((0.45, {1}), (0.5, {1, 2}), (0.6, {1, 2}), (0.74, {1, 2}), (0.76, {1, 2, 3}), (1.0, {0, 1, 2, 3})):
        ps, order = top_p_filter(probs, p)
        got = {int(order[0, j]) for j in range(4) if ps[0, j] > 0}
        assert got == kept, (p, got)
        assert torch.isclose(ps.sum(), torch.tensor(1.0))
    # sampling only ever returns tokens of the kept set
    m = tiny_model(seed=5)
    with torch.no_grad():
        lg = m(torch.tensor([prompts()[0]]))[0, -1]
    ps, order = top_p_filter(torch.softmax(lg, -1)[None], 0.3)
    allowed = {int(order[0, j]) for j in range(ps.shape[1]) if ps[0, j] > 0}
    out = generate(m, [prompts()[0]], n=20, max_new_tokens=1, top_p=0.3, progress=False)
    assert {c.tokens[0] for c in out[0]} <= allowed


def test_stop_ids_end_and_are_reported():
    m = tiny_model(seed=6)
    free = generate(m, prompts(), max_new_tokens=8, temperature=0, progress=False)
    stop = free[1][0].tokens[3]
    out = generate(m, prompts(), max_new_tokens=8, temperature=0, stop_ids=[stop], progress=False)
    for f, o in zip(free, out):
        t = f[0].tokens
        if stop in t:
            k = t.index(stop)
            assert o[0].tokens == t[:k + 1] and o[0].finish == "stop"
        else:
            assert o[0].tokens == t and o[0].finish == "length"


def test_n_samples_share_one_prefill(monkeypatch):
    m = tiny_model(seed=7)
    calls = []
    orig = Llama.hidden

    def spy(self, idx, **kw):
        calls.append(idx.shape)
        return orig(self, idx, **kw)
    monkeypatch.setattr(Llama, "hidden", spy)
    generate(m, prompts(), n=5, max_new_tokens=4, progress=False)
    prefills = [s for s in calls if s[1] > 1]
    assert len(prefills) == 1 and prefills[0][0] == 4       # one prefill of the 4 prompts
    assert all(s[1] == 1 for s in calls[1:]) and calls[1][0] == 20  # then 4 x 5 rows decode


def test_too_long_is_an_error_before_work():
    m = tiny_model(seed=8)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        generate(m, [[5] * 500], max_new_tokens=20, progress=False)
