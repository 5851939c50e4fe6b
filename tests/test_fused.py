"""fused_logprobs against the naive log_softmax(h @ W.T / T).gather, values and gradients."""
import os
import subprocess
import sys

import pytest
import torch

from kernels import IGNORE_INDEX, FusedLogprobs, FusedLogprobSum, fused_logprob_sum, fused_logprobs


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
        assert torch.allclose(g[0], grads[0][0], rtol=1e-5, atol=1e-5) and torch.allclose(g[1], grads[0][1], rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    h, w, t = inputs(N=6, H=5, V=9)
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: FusedLogprobs.apply(a, b, t, 1.3, 4, False)[0], (h, w))


def test_triton_kernel_matches_under_interpreter():
    """The Triton forward kernel, run by Triton's CPU interpreter in a subprocess."""
    pytest.importorskip("triton", reason="triton is not installed (optional; pip install triton)")
    code = (
        "import torch, kernels\n"
        "from tests.test_fused import inputs, naive\n"
        "h, w, t = inputs(N=45, H=40, V=150)\n"
        "out, lse, ent = kernels._triton_forward(h.detach(), w.detach(), t, 0.9)\n"
        "ref = naive(h.detach(), w.detach(), t, 0.9)\n"
        "lg = (h.detach() @ w.detach().T) / 0.9\n"
        "assert (out - ref).abs().max() < 1e-4, (out - ref).abs().max()\n"
        "assert (lse - lg.logsumexp(-1)).abs().max() < 1e-4\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


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
    assert torch.autograd.gradcheck(lambda a, b: FusedLogprobSum.apply(a, b, t, wt.double(), 1.3, 5), (h64, w64))
