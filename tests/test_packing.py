"""Packed pairs [prompt | chosen | rejected]: each prompt run once, and every number the same as
running prompt + chosen and prompt + rejected as separate sequences (issue 15)."""
import math

import pytest
import torch

from conftest import tiny_model
from data import Example, packed_pair_batch, prompt_completion_batch
from fit import TrainConfig, fit
from kernels import pair_logps, pair_rewards
from losses import add_reference_logps, bt_loss, dpo_loss, make_step_dpo, step_bt
from model import Llama


def ragged_pairs(seed=0, shapes=((5, 3, 7), (9, 6, 2), (2, 1, 1))):
    """Pairs of (prompt, chosen, rejected) lengths, random ids, reference log-probs attached."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    ex = [Example(ids(p), ids(c), ids(r)) for p, c, r in shapes]
    for e in ex:
        e.ref = {"sum": (-float(torch.rand(1, generator=g)) * 10, -float(torch.rand(1, generator=g)) * 10)}
    return ex


def separate_logps(model, batch, average=False):
    """The plain way: chosen and rejected as separate right-padded sequences, full logits,
    log_softmax + gather, summed over the completion tokens."""
    seqs = [(e.prompt, e.completion) for e in batch] + [(e.prompt, e.rejected) for e in batch]
    idx, valid, mask = prompt_completion_batch(seqs, 0)
    logits = model(idx, valid=valid)[:, :-1]                                  # [2B, T-1, V]
    lp = torch.log_softmax(logits, -1).gather(-1, idx[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    lp = lp.sum(-1) / (mask.sum(-1) if average else 1)
    return lp[:len(batch)], lp[len(batch):]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for n in a:
        err = (a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)
        assert err < rtol, (n, float(err))


def test_layout_positions_mask_and_loss_rows():
    """Written out by hand for one pair (prompt 3, chosen 2, rejected 2) beside a shorter one."""
    pk = packed_pair_batch([([10, 11, 12], [20, 21], [30, 31]), ([40], [50], [60])], pad_id=0)
    T = 7
    assert pk.idx.tolist() == [[10, 11, 12, 20, 21, 30, 31], [40, 50, 60, 0, 0, 0, 0]]
    assert pk.pos.tolist()[0] == [0, 1, 2, 3, 4, 3, 4]  # rejected continue from the prompt
    assert pk.pos.tolist()[1][:3] == [0, 1, 1]
    m = pk.mask[0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 1, 0, 0],
                 [1, 1, 1, 0, 0, 1, 0],                                          # rejected: never the chosen
                 [1, 1, 1, 0, 0, 1, 1]]
    m1 = pk.mask[1].int()
    assert m1[:3, :3].tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert torch.equal(m1[3:], torch.eye(T, dtype=torch.int)[3:])               # padding sees only itself
    assert m1[:3, 3:].sum() == 0                                               # and is never seen
    # loss rows: pair 0 chosen (from 2, 3), rejected (from 2 = the last prompt token, then 5); pair 1
    assert pk.src.tolist() == [2, 3, 2, 5, T + 0, T + 0]
    assert pk.tgt.tolist() == [20, 21, 30, 31, 50, 60]
    assert pk.seq.tolist() == [0, 0, 1, 1, 2, 3]
    assert pk.last.tolist() == [[4, 6], [T + 1, T + 2]]
    with pytest.raises(ValueError, match="pair 0: empty"):
        packed_pair_batch([([1], [], [2])], 0)


@pytest.mark.parametrize("average", [False, True])
def test_pair_logps_equal_separate_sequences_values_and_grads(average):
    model = tiny_model(seed=3).float()
    batch = ragged_pairs()
    pc, pr = pair_logps(model, batch, pad_id=0, average=average)
    sc, sr = separate_logps(model, batch, average=average)
    assert torch.allclose(pc, sc, atol=1e-5) and torch.allclose(pr, sr, atol=1e-5)
    w = torch.tensor([0.7, -1.3, 0.4])                                        # distinct weight per pair
    g_packed = grads(model, (w * pc).sum() - (w.flip(0) * pr).sum())
    sc, sr = separate_logps(model, batch, average=average)
    g_sep = grads(model, (w * sc).sum() - (w.flip(0) * sr).sum())
    assert_grads_close(g_packed, g_sep)


def test_pair_logps_do_not_depend_on_batch_companions():
    model = tiny_model(seed=4)
    batch = ragged_pairs(seed=1)
    pc, pr = pair_logps(model, batch, pad_id=0)
    for i, e in enumerate(batch):
        c, r = pair_logps(model, [e], pad_id=0)
        assert torch.allclose(c, pc[i:i + 1], atol=1e-5) and torch.allclose(r, pr[i:i + 1], atol=1e-5)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_step_equals_separate_computation(loss_type, eps):
    """The step (loss sum over pairs, correct count) against dpo_loss on separately computed
    log-probs, values and gradients."""
    model = tiny_model(seed=5)
    batch = ragged_pairs(seed=2)
    for e in batch:
        e.ref["avg"] = (e.ref["sum"][0] / len(e.completion), e.ref["sum"][1] / len(e.rejected))
    key = "avg" if loss_type == "ipo" else "sum"
    loss, correct = make_step_dpo(0.1, eps, loss_type)(model, batch, 0)
    g_step = grads(model, loss)
    sc, sr = separate_logps(model, batch, average=loss_type == "ipo")
    rc = torch.tensor([e.ref[key][0] for e in batch])
    rr = torch.tensor([e.ref[key][1] for e in batch])
    want = dpo_loss(sc, sr, rc, rr, beta=0.1, label_smoothing=eps, loss_type=loss_type).sum()
    # IPO sums are ~40.
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5 * max(1.0, abs(float(want.detach())))
    assert int(correct) == int((((sc - rc) - (sr - rr)) > 0).sum())
    assert_grads_close(g_step, grads(model, want))


def test_bt_rewards_equal_model_reward_on_separate_sequences():
    """Both rewards from one packed pass, read at the last chosen / last rejected token."""
    model = tiny_model(seed=6, score_head=True)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.3)
    batch = ragged_pairs(seed=3)
    rc, rr = pair_rewards(model, batch, pad_id=0)
    seqs = [(e.prompt, e.completion) for e in batch] + [(e.prompt, e.rejected) for e in batch]
    idx, valid, _ = prompt_completion_batch(seqs, 0)
    r = model.reward(idx, valid)
    assert torch.allclose(rc, r[:3], atol=1e-5) and torch.allclose(rr, r[3:], atol=1e-5)
    loss, correct = step_bt(model, batch, 0)
    assert int(correct) == int((r[:3] > r[3:]).sum())
    g_step = grads(model, loss)
    r = model.reward(idx, valid)
    assert_grads_close(g_step, grads(model, bt_loss(r[:3], r[3:]).sum()))


def test_padding_rows_are_finite():
    """Right padding of a short pair beside a long one: every hidden state is finite (a padding
    query attends to itself) and its gradients too."""
    model = tiny_model(seed=7)
    pk = packed_pair_batch([([5] * 20, [6] * 9, [7] * 9), ([8], [9], [10])], 0)
    h = model.hidden(pk.idx, pos=pk.pos, attn_mask=pk.mask)
    assert torch.isfinite(h).all()
    h.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["dpo", "bt"])
def test_bf16_autocast_step_close_to_float32(kind):
    """A step under CPU bf16 autocast (float32 master weights): loss within 3% and every gradient
    within 10% (relative norm) of float32's (bf16 keeps 8 bits: eps 2**-8 = 0.4%, and the tiny
    model's weights are large; measured 2% and 6%), gradients float32, and not bitwise float32's
    (autocast is on). The fused kernels take float32 hidden states (the residual stream and the
    final RMSNorm stay float32) and accumulate in float32."""
    model = tiny_model(seed=8, score_head=kind == "bt")
    batch = ragged_pairs(seed=4)
    step = make_step_dpo(0.1, 0.0, "sigmoid") if kind == "dpo" else step_bt
    loss32, _ = step(model, batch, 0)
    g32 = grads(model, loss32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = step(model, batch, 0)
    g16 = grads(model, loss16)
    assert abs(float(loss16.detach()) - float(loss32.detach())) < 3e-2 * abs(float(loss32.detach()))
    assert float(loss16.detach()) != float(loss32.detach())
    assert all(g.dtype == torch.float32 for g in g16.values())
    assert_grads_close(g16, g32, rtol=1e-1)


def test_fit_bf16_trains_float32_master_weights(tmp_path):
    """fit with bf16=True: the loss curve stays within bf16 tolerance of float32's, and the
    parameters remain float32."""
    curves = {}
    for bf16 in (False, True):
        model = tiny_model(seed=9)
        batch = ragged_pairs(seed=5, shapes=((5, 3, 7), (9, 6, 2), (2, 1, 1), (4, 4, 4)))
        cfg = TrainConfig(lr=1e-3, batch_size=2, epochs=2, progress=False, bf16=bf16)
        curves[bf16] = [r["loss"] for r in fit(model, batch, make_step_dpo(0.1, 0.0, "sigmoid"), cfg,
                                                tmp_path / str(bf16), 0, log=lambda *_: None)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert curves[True] != curves[False]
    assert torch.allclose(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=3e-2)


def test_bf16_reference_equals_bf16_policy_at_the_start(tmp_path):
    """add_reference_logps(dtype=bfloat16) computes under the autocast training uses, so a DPO
    step of the unchanged model on the same batch starts at log 2 (h = 0 up to float rounding;
    other batch compositions move bf16 results by ~1e-3 nats); its cache is keyed by the precision
    (a float32 request recomputes, and gets the exact float32 values)."""
    base = tmp_path / "base"
    tiny_model(seed=7).save_pretrained(base)
    ex = ragged_pairs(seed=6)
    add_reference_logps(base, ex, 0, tmp_path / "ref.pt", 3, torch.bfloat16, "cpu", progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, _ = make_step_dpo(0.1, 0.0, "sigmoid")(Llama.from_pretrained(base), ex, 0)
    assert math.isclose(float(s.detach()) / len(ex), math.log(2), rel_tol=1e-6)
    ex32 = ragged_pairs(seed=6)
    add_reference_logps(base, ex32, 0, tmp_path / "ref.pt", 2, torch.float32, "cpu", progress=False)
    with torch.no_grad():
        sep = separate_logps(Llama.from_pretrained(base), ex32)
    assert all(abs(e.ref["sum"][0] - float(c)) < 1e-5 for e, c in zip(ex32, sep[0]))
    assert [e.ref for e in ex32] != [e.ref for e in ex]
