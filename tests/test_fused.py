"""fused_logprobs against the naive log_softmax(h @ W.T / T).gather, values and gradients."""

import pytest
import torch

from kernels import (
    IGNORE_INDEX,
    FusedLogprobs,
    FusedLogprobSum,
    _pair_chunks,
    fused_logprob_sum,
    fused_logprobs,
)
from losses import dpo_loss, fused_dpo_loss


def naive(h, w, t, temperature=1.0):
    lp = torch.log_softmax((h.float() @ w.float().T) / temperature, -1)
    out = lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(t != IGNORE_INDEX, out, 0.0)


def inputs(N=37, H=24, V=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_naive(temperature):
    h, w, t = inputs()
    up = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1))
    got = fused_logprobs(h, w, t, temperature=temperature, chunk=8)
    ref = naive(h, w, t, temperature)
    assert torch.allclose(got, ref, atol=1e-5)
    assert (got[t == IGNORE_INDEX] == 0).all()
    gh, gw = torch.autograd.grad((got * up).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * up).sum(), (h, w))
    for a, b in ((gh, rh), (gw, rw)):  # 1e-4 relative (to the gradient's norm), and elementwise
        assert (a - b).norm() / b.norm() < 1e-4 and torch.allclose(a, b, rtol=1e-4, atol=5e-5)
    assert (gh[t == IGNORE_INDEX] == 0).all()


def test_entropy_output():
    h, w, t = inputs()
    _, ent = fused_logprobs(h, w, t, temperature=0.8, return_entropy=True)
    p = torch.softmax((h @ w.T) / 0.8, -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-4)


def test_bfloat16_inputs_float32_accumulation():
    """bf16 inputs: the result is float32 and within 2e-2 of the float32 computation on the same
    (bf16-rounded) inputs; gradients keep the input dtype and match to 5e-2 relative."""
    h, w, t = inputs(dtype=torch.bfloat16)
    got = fused_logprobs(h, w, t, chunk=16)
    assert got.dtype == torch.float32
    ref = naive(h.detach().float(), w.detach().float(), t)
    assert (got - ref).abs().max() < 2e-2
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    rh, rw = torch.autograd.grad(naive(hf, wf, t).sum(), (hf, wf))
    assert (gh.float() - rh).norm() / rh.norm() < 5e-2 and (gw.float() - rw).norm() / rw.norm() < 5e-2


def test_chunk_size_does_not_change_the_result():
    h, w, t = inputs(N=50)
    outs = [fused_logprobs(h, w, t, chunk=c) for c in (1, 7, 50, 4096)]
    grads = [torch.autograd.grad(o.sum(), (h, w)) for o in outs]
    for o, g in zip(outs[1:], grads[1:]):
        assert torch.allclose(o, outs[0], atol=1e-6)
        assert (torch.allclose(g[0], grads[0][0], rtol=1e-5, atol=1e-5)
                and torch.allclose(g[1], grads[0][1], rtol=1e-5, atol=1e-5))


def test_gradcheck_float64():
    h, w, t = inputs(N=6, H=5, V=9)
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: FusedLogprobs.apply(a, b, t, 1.3, 4, False)[0], (h, w))


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_weighted_sum_with_gradients_in_forward_matches_naive(temperature):
    h, w, t = inputs(seed=3)
    wt = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(4))
    got = fused_logprob_sum(h, w, t, wt, temperature=temperature, chunk=6)
    ref = (naive(h, w, t, temperature) * wt).sum()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-4)
    gh, gw = torch.autograd.grad(got * -2.5, (h, w))  # the upstream scalar scales the saved grads
    rh, rw = torch.autograd.grad(ref * -2.5, (h, w))
    for a, b in ((gh, rh), (gw, rw)):
        assert (a - b).norm() / b.norm() < 1e-4 and torch.allclose(a, b, rtol=1e-4, atol=5e-5)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: FusedLogprobSum.apply(a, b, t, wt.double(), 1.3, 5),
                                    (h64, w64))


# ----------------------------------------------------------------------------------------------
# fused_dpo_loss: DPO / cDPO / IPO with gradients in forward, against the full-logits computation

PAIRS = [(3, 5), (7, 2), (1, 1), (6, 4), (2, 9)]  # ragged (chosen rows, rejected rows) per pair


def dpo_inputs(dtype=torch.float32, pairs=PAIRS, seed=5, H=24, V=101):
    seq = torch.cat([torch.full((n,), 2 * i + j) for i, p in enumerate(pairs) for j, n in enumerate(p)])
    # Every 5th row is IGNORE_INDEX; no completion is all ignored.
    h, w, t = inputs(N=len(seq), H=H, V=V, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rc, rr = torch.randn(len(pairs), generator=g) * 3, torch.randn(len(pairs), generator=g) * 3
    return h, w, t, seq, rc, rr


def naive_dpo(h, w, t, seq, rc, rr, beta, eps, loss_type, temperature):
    """Full logits -> log_softmax -> gather -> per-completion sums (ipo: means over the non-ignored
    rows) -> the DPO closed form, mean over pairs."""
    lp = naive(h, w, t, temperature)                                             # [N]
    s = torch.zeros(2 * len(rc), dtype=lp.dtype).index_add(0, seq, lp)          # [2P]
    if loss_type == "ipo":
        s = s / torch.zeros(2 * len(rc), dtype=lp.dtype).index_add(0, seq, (t != IGNORE_INDEX).to(lp.dtype))
    z = (s[0::2] - rc) - (s[1::2] - rr)
    if loss_type == "ipo":
        loss = (z - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - eps) * torch.log(torch.sigmoid(beta * z)) - eps * torch.log(torch.sigmoid(-beta * z))
    return loss.mean(), s[0::2], s[1::2]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_values_and_grads_match_naive(loss_type, eps):
    """1e-5 on values, 1e-4 on gradients, for every chunk size (1 row: smaller than any pair; 7; all
    rows in one chunk), temperature 0.7, with an upstream gradient != 1; the same mean as
    losses.dpo_loss on the naive log-probs (the convention step_dpo uses)."""
    h, w, t, seq, rc, rr = dpo_inputs()
    kw = dict(beta=0.3, label_smoothing=eps, loss_type=loss_type, temperature=0.7)
    ref, ref_c, ref_r = naive_dpo(h, w, t, seq, rc, rr, 0.3, eps, loss_type, 0.7)
    assert torch.allclose(ref, dpo_loss(ref_c, ref_r, rc, rr, beta=0.3, label_smoothing=eps,
                                        loss_type=loss_type).mean())
    rh, rw = torch.autograd.grad(ref * -2.5, (h, w))
    for chunk in (1, 7, 4096):
        loss, pc, pr = fused_dpo_loss(h, w, t, seq, rc, rr, chunk=chunk, **kw)
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7), (chunk, loss, ref)
        assert (torch.allclose(pc, ref_c, rtol=1e-5, atol=1e-5)
                and torch.allclose(pr, ref_r, rtol=1e-5, atol=1e-5))
        assert not pc.requires_grad and not pr.requires_grad
        gh, gw = torch.autograd.grad(loss * -2.5, (h, w))
        for a, b in ((gh, rh), (gw, rw)):
            assert ((a - b).norm() / b.norm() < 1e-4
                    and torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max()))
        assert (gh[t == IGNORE_INDEX] == 0).all()


def test_dpo_chunks_hold_whole_pairs():
    """Chunks end on pair boundaries; a pair longer than the chunk is a chunk of its own."""
    rows = [a + b for a, b in PAIRS]                                             # [8, 9, 2, 10, 11]
    assert _pair_chunks(rows, 1) == [(0, 8, 0, 1), (8, 17, 1, 2), (17, 19, 2, 3), (19, 29, 3, 4),
                                     (29, 40, 4, 5)]
    assert _pair_chunks(rows, 19) == [(0, 19, 0, 3), (19, 29, 3, 4), (29, 40, 4, 5)]  # 8 + 9 + 2 fit
    assert _pair_chunks(rows, 40) == [(0, 40, 0, 5)]


def test_dpo_gradcheck_float64_and_second_backward():
    h, w, t, seq, rc, rr = dpo_inputs(pairs=[(2, 1), (1, 3)], seed=7, H=5, V=9)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    for loss_type, eps in (("sigmoid", 0.1), ("ipo", 0.0)):
        f = lambda a, b: fused_dpo_loss(a, b, t, seq, rc.double(), rr.double(), beta=0.5, label_smoothing=eps,  # noqa: E731
                                        loss_type=loss_type, temperature=1.3, chunk=3)[0]
        assert torch.autograd.gradcheck(f, (h64, w64))
    loss = fused_dpo_loss(h, w, t, seq, rc, rr, beta=0.5)[0] * 2  # saved gradients are scaled in place once
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_dpo_bfloat16_inputs():
    """bf16 inputs: float32 loss within 1e-2 of the float32 computation on the same rounded inputs;
    gradients in bf16 within 5e-2 relative."""
    h, w, t, seq, rc, rr = dpo_inputs(dtype=torch.bfloat16)
    loss, pc, _ = fused_dpo_loss(h, w, t, seq, rc, rr, beta=0.3, chunk=16)
    assert loss.dtype == torch.float32 and pc.dtype == torch.float32
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = naive_dpo(hf, wf, t, seq, rc, rr, 0.3, 0.0, "sigmoid", 1.0)[0]
    assert (loss - ref).abs() < 1e-2
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (hf, wf))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert (gh.float() - rh).norm() / rh.norm() < 5e-2 and (gw.float() - rw).norm() / rw.norm() < 5e-2


def test_dpo_bad_input_is_a_clear_error():
    h, w, t, seq, rc, rr = dpo_inputs()
    with pytest.raises(ValueError, match="non-decreasing"):
        fused_dpo_loss(h, w, t, seq.flip(0), rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="pair 1 lacks rows"):
        # Pair 1 has no rejected rows.
        fused_dpo_loss(h, w, t, torch.where(seq == 3, 2, seq), rc, rr, beta=0.1)
    t2 = t.clone()
    t2[seq == 4] = IGNORE_INDEX  # pair 2's chosen: all ignored
    with pytest.raises(ValueError, match="completion 4 has none"):
        fused_dpo_loss(h, w, t2, seq, rc, rr, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss"):
        fused_dpo_loss(h, w, t, seq, rc, rr, beta=0.1, loss_type="hinge")
