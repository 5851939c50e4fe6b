"""sample.py against a no-cache argmax loop, batch invariance, log-probs, top-p, stops, one prefill."""
import pytest
import torch

import sample
from conftest import tiny_model
from engine import Engine
from sample import decode_one, generate, pick_next, prefill, top_p_filter


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
    for p, kept in ((0.45, {1}), (0.5, {1, 2}), (0.6, {1, 2}), (0.74, {1, 2}), (0.76, {1, 2, 3}),
                    (1.0, {0, 1, 2, 3})):
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
    orig = Engine.hidden

    def spy(self, idx, **kw):
        calls.append(idx.shape)
        return orig(self, idx, **kw)
    monkeypatch.setattr(Engine, "hidden", spy)
    generate(m, prompts(), n=5, max_new_tokens=4, progress=False)
    prefills = [s for s in calls if s[1] > 1]
    assert len(prefills) == 1 and prefills[0][0] == 4       # one prefill of the 4 prompts
    assert all(s[1] == 1 for s in calls[1:]) and calls[1][0] == 20  # then 4 x 5 rows decode


def test_too_long_is_an_error_before_work():
    m = tiny_model(seed=8)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        generate(m, [[5] * 500], max_new_tokens=20, progress=False)


def _sorted_nucleus_sample(logits, temperature, p, u):
    """The sampler before top-k: sort the whole vocabulary, top_p_filter, inverse CDF."""
    probs = torch.softmax(logits / temperature, -1)
    ps, order = top_p_filter(probs, p) if p < 1.0 else probs.sort(-1, descending=True)
    cdf = ps.cumsum(-1)
    k = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)
    return order.gather(1, k).squeeze(1)


def test_pick_next_equals_full_sort_sampling():
    g = torch.Generator().manual_seed(0)
    V = 5000  # > the top-k candidates, so every path occurs
    scale = torch.tensor([0.1, 1.0, 3.0, 8.0, 20.0]).repeat_interleave(40)[:, None]  # flat .. peaked
    logits = torch.randn(len(scale), V, generator=g) * scale
    mass = torch.softmax(logits, -1).sort(-1, descending=True).values.cumsum(-1)
    k256, k4096 = mass[:, 255] > 0.95, mass[:, 4095] > 0.95
    assert k256.any() and (k4096 & ~k256).any() and (~k4096).any()  # top-256, top-4096 and full-sort rows
    for temperature, p in ((1.0, 0.95), (0.7, 0.5), (1.0, 0.999), (1.3, 1.0)):
        for _ in range(5):
            u = torch.rand(len(scale), generator=g)
            want = _sorted_nucleus_sample(logits, temperature, p, u)
            assert torch.equal(pick_next(logits, temperature, p, u), want), (temperature, p)
    assert torch.equal(pick_next(logits, 0, 0.95, u), logits.argmax(-1))


def _spy_hidden(monkeypatch):
    calls = []
    orig = Engine.hidden

    def spy(self, idx, **kw):
        calls.append(tuple(idx.shape))
        return orig(self, idx, **kw)
    monkeypatch.setattr(Engine, "hidden", spy)
    return calls


def test_shared_prefix_prefilled_once_same_outputs(monkeypatch):
    m = tiny_model(seed=9)
    head = [1] + list(range(40, 60))                    # 21 tokens every prompt starts with
    ps = [head + p for p in prompts()]
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, progress=False)
    calls = _spy_hidden(monkeypatch)
    shared = generate(m, ps, **kw)
    assert calls[0] == (1, 21)                          # the prefix, once
    assert calls[1] == (4, 11)                          # then only the prompts' own tokens
    monkeypatch.setattr(sample, "_MIN_SHARED_PREFIX", 10 ** 9)
    calls.clear()
    plain = generate(m, ps, **kw)
    assert calls[0] == (4, 32)                          # no sharing: whole prompts
    for a, b in zip(shared, plain):
        for x, y in zip(a, b):
            assert x.tokens == y.tokens and x.finish == y.finish
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_samples_of_one_prompt_read_it_once_same_outputs(monkeypatch):
    """n samples of one prompt: its KV is attended once per decode step for all rows (cascade),
    with stops ending rows early; same tokens and log-probs (1e-5) as every row attending its copy."""
    m = tiny_model(seed=12)
    p = prompts()[1] + prompts()[3] + list(range(50, 70))          # 39 tokens
    kw = dict(n=4, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, progress=False)
    kw["stop_ids"] = [c.tokens[3] for c in generate(m, [p], **kw)[0]][:2]  # ends some rows early
    used = []
    orig = sample.Engine.share_prefix
    monkeypatch.setattr(sample.Engine, "share_prefix", lambda self, n: used.append(n) or orig(self, n))
    shared = generate(m, [p], **kw)[0]
    assert used == [len(p) - 1]                                      # all but its last token
    monkeypatch.setattr(sample, "_MIN_SHARED_PREFIX", 10 ** 9)
    plain = generate(m, [p], **kw)[0]
    assert any(c.finish == "stop" for c in plain)
    for x, y in zip(shared, plain):
        assert x.tokens == y.tokens and x.finish == y.finish
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_rows_grouped_by_prompt_same_as_each_row_alone(monkeypatch):
    """Rows sampling the same prompt read its keys once per step (DecodeLayout groups), their
    sampled tokens in slots after the longest prompt: log-probs equal a no-cache forward of
    prompt + sample (1e-5), and tokens and log-probs equal the step without groups, with ragged
    prompts (shared prefix and not), stops, rows refilled from other prompts, and free rows kept
    while fewer than half are free, a suffix fed after each sample (suffix_logits against the
    no-cache forward); the static step (CUDA graphs) with the layout samples the same."""
    m = tiny_model(seed=14)
    for head in ([], list(range(30, 50))):              # no shared prefix; a 20-token one
        ps = [head + p for p in prompts()]
        kw = dict(n=3, max_new_tokens=7, temperature=1.0, top_p=0.95, seed=2, prompt_batch=2, progress=False)
        kw["stop_ids"] = [c.tokens[2] for o in generate(m, ps, **kw) for c in o][:3]
        kw.update(suffix=[7, 8], suffix_logit_ids=[3, 4])  # fed after each sample, as the judge's verdict
        layouts = []
        orig = sample._layout
        monkeypatch.setattr(sample, "_layout", lambda *a, **k: layouts.append(orig(*a, **k)) or layouts[-1])
        grouped = generate(m, ps, **kw)
        assert all(x.members.shape[1] == 3 for x in layouts[:3])  # two prompts' 3 rows each at first
        sizes = [len(x.prompt_len) for x in layouts]
        shrinks = [(a, b) for a, b in zip(sizes, sizes[1:]) if a != b]
        assert shrinks and all(b <= a // 2 for a, b in shrinks)  # free rows kept until half are free
        # No groups.
        monkeypatch.setattr(sample, "_layout", lambda *a, **k: orig(*a, **dict(k, grouped=False)))
        alone = generate(m, ps, **kw)
        monkeypatch.setattr(sample, "_layout", orig)
        step = sample.decode_one                          # the static step (CUDA graphs) with a layout
        monkeypatch.setattr(sample, "decode_one", lambda *a, **k: step(*a, **dict(k, static=True)))
        static = generate(m, ps, **kw)
        monkeypatch.setattr(sample, "decode_one", step)
        for o, q in zip(static, alone):
            for c, d in zip(o, q):
                assert c.tokens == d.tokens
                assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-5, rtol=0)
        assert {c.finish for o in grouped for c in o} == {"stop", "length"}
        for p, o, q in zip(ps, grouped, alone):
            for c, d in zip(o, q):
                assert c.tokens == d.tokens and c.finish == d.finish
                assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-5, rtol=0)
                with torch.no_grad():
                    lp = torch.log_softmax(m(torch.tensor([p + c.tokens]))[0], -1)
                want = torch.tensor([float(lp[len(p) - 1 + t, x]) for t, x in enumerate(c.tokens)])
                assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-5, rtol=0)
                seq = p + [t for t in c.tokens if t not in kw["stop_ids"]] + kw["suffix"]
                with torch.no_grad():
                    after = m(torch.tensor([seq]))[0, -1, kw["suffix_logit_ids"]]
                assert torch.allclose(torch.tensor(c.suffix_logits), after, atol=1e-5, rtol=0)


def test_suffix_logits_equal_a_full_forward():
    """generate(suffix=...) feeds the suffix after each sample (its stop token left out) in the decode
    steps: the samples are unchanged, and suffix_logits equal a no-cache forward of prompt + sample +
    suffix (1e-5), with stops, lengths, a shared prefix (cascade) and continuous batching (2 rows
    for 8 samples)."""
    m = tiny_model(seed=13)
    ps, suffix, ids = [list(range(30, 48)) + p for p in prompts()], [7, 8, 9], [3, 4, 200]  # 18 shared tokens
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, seed=4, prompt_batch=1, progress=False)
    kw["stop_ids"] = [c.tokens[1] for o in generate(m, ps, **kw) for c in o][:3]
    plain = generate(m, ps, **kw)
    out = generate(m, ps, suffix=suffix, suffix_logit_ids=ids, **kw)
    assert {c.finish for o in out for c in o} == {"stop", "length"}
    for p, o, q in zip(ps, out, plain):
        for c, d in zip(o, q):
            assert c.tokens == d.tokens and c.finish == d.finish and d.suffix_logits is None
            seq = p + [t for t in c.tokens if t not in kw["stop_ids"]] + suffix
            with torch.no_grad():
                want = m(torch.tensor([seq]))[0, -1, ids]
            assert torch.allclose(torch.tensor(c.suffix_logits), want, atol=1e-5, rtol=0)


def test_continuous_batching_refills_rows_and_keeps_results(monkeypatch):
    m = tiny_model(seed=10)
    ps = prompts()
    free = generate(m, ps, n=3, max_new_tokens=10, temperature=1.0, seed=3, progress=False)
    stop = [c.tokens[2] for o in free for c in o][:4]   # stops that end some samples early
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, seed=3, stop_ids=stop, progress=False)
    calls = _spy_hidden(monkeypatch)
    out = generate(m, ps, prompt_batch=1, **kw)         # 3 rows for 12 (prompt, sample) pairs
    prefills = [s for s in calls if s[1] > 1]
    assert sum(s[0] for s in prefills) == len(ps)        # each prompt prefilled once
    decodes = [s[0] for s in calls if s[1] == 1]
    lens = sorted((len(c.tokens) for o in out for c in o), reverse=True)
    assert len(decodes) < sum(lens[i] for i in range(0, len(lens), 3))  # fewer steps than fixed chunks of 3
    assert decodes[:len(decodes) // 2] == [3] * (len(decodes) // 2)    # the batch stays full while work waits
    for i, p in enumerate(ps):                           # same as each prompt alone
        alone = generate(m, [p], **dict(kw, seed=[3 + i]))
        assert [c.tokens for c in alone[0]] == [c.tokens for c in out[i]]
        assert [c.finish for c in alone[0]] == [c.finish for c in out[i]]
        for x, y in zip(alone[0], out[i]):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    assert (any(c.finish == "stop" for o in out for c in o)
            and any(c.finish == "length" for o in out for c in o))


def test_bfloat16_model_samples_close_to_float32():
    m = tiny_model(seed=11)
    ps = prompts()
    out = generate(m.to(torch.bfloat16), ps, n=2, max_new_tokens=6, temperature=1.0, top_p=0.9,
                   progress=False)
    m = m.float()
    for p, o in zip(ps, out):
        for c in o:
            with torch.no_grad():
                lp = torch.log_softmax(m(torch.tensor([p + c.tokens]))[0], -1)
            want = torch.tensor([float(lp[len(p) - 1 + t, tk]) for t, tk in enumerate(c.tokens)])
            assert (torch.tensor(c.logprobs) - want).abs().max() < 0.25   # bf16 rounding, not a wrong token


def test_static_decode_step_with_a_shared_prefix_equals_plain_attention():
    """The static step (CUDA graphs) with cascade attention over a prompt both rows share equals
    the dynamic step without sharing (logits 1e-5)."""
    m, prompt = tiny_model(seed=3), list(range(40, 60))
    out = []
    with torch.no_grad():
        for static, shared in ((False, 0), (True, len(prompt))):
            e = Engine(m, 2, 32)
            logits = prefill(e, [prompt], torch.zeros(1, dtype=torch.long), 0).repeat(2, 1)
            e.copy_cache_rows(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), len(prompt))
            e.share_prefix(shared)
            tok, pos, steps = torch.tensor([3, 4]), torch.full((2,), len(prompt)), []
            for _ in range(4):
                logits = decode_one(e, tok, pos, static=static)
                steps.append(logits)
                tok, pos = logits.argmax(-1), pos + 1
            out.append(torch.stack(steps))
    assert torch.allclose(out[0], out[1], atol=1e-5, rtol=0)


def test_static_decode_step_equals_dynamic():
    """The static-shape step (all cache slots, masked past each row's position: what a CUDA graph
    replays) gives the logits of the step over the slots in use, and writes the same cache."""
    m = tiny_model(seed=2)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    out = []
    with torch.no_grad():
        for static in (False, True):
            e = Engine(m, 2, 16)
            logits = prefill(e, prompts, torch.arange(2), 0)
            tok, pos = logits.argmax(-1), torch.tensor([len(p) for p in prompts])
            steps = []
            for _ in range(4):
                logits = decode_one(e, tok, pos, static=static)
                steps.append(logits)
                tok, pos = logits.argmax(-1), pos + 1
            out.append((torch.stack(steps), e.layers[1].cache.k[:, :, :10].clone()))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-6)


def test_packed_weights_are_rebuilt_after_an_in_place_update():
    # The engine keeps a model's packed weights between generate calls; a training step changes
    # the weights in place, and the next call must sample from the new weights, not the kept copy.
    m = tiny_model(seed=3)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, n=3, seed=5)):
        generate(m, prompts(), max_new_tokens=5, progress=False, **kw)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)
        again = generate(m, prompts(), max_new_tokens=5, progress=False, **kw)
        fresh = tiny_model(seed=3)
        fresh.load_state_dict(m.state_dict())
        expected = generate(fresh, prompts(), max_new_tokens=5, progress=False, **kw)
        assert [[s.tokens for s in o] for o in again] == [[s.tokens for s in o] for o in expected]
        if kw["temperature"] == 0:
            assert [o[0].tokens for o in again] == [naive_greedy(m, p, 5) for p in prompts()]
