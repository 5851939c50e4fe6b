"""train.py: losses against closed forms, the loop's conventions, resume, bad data."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train as T
from conftest import CharTok, tiny_model
from data import LoadStats, Pair, load_pairs, pair_examples, sft_examples
from eval import judge_change
from fit import TrainConfig, accumulate_gradients, fit
from genrm import genrm_examples
from losses import add_reference_logps, bt_loss, dpo_loss, make_step_dpo, step_genrm, step_sft
from model import Llama


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bt_loss_closed_form():
    got = bt_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    want = [-math.log(sig(1.0)), math.log(2), -math.log(sig(-2.0))]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_dpo_losses_closed_form():
    z = torch.tensor([-5.0, -12.0])
    assert torch.allclose(dpo_loss(z, z - 3, z, z - 3, beta=0.1), torch.full((2,), math.log(2)))
    pc, pr, rc, rr = (torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]),
                      torch.tensor([-17.0]))
    h = (-10 + 12) - (-20 + 17)  # = 5
    assert math.isclose(float(dpo_loss(pc, pr, rc, rr, beta=0.1)), -math.log(sig(0.5)), rel_tol=1e-6)
    eps = 0.2
    want = -(1 - eps) * math.log(sig(0.5)) - eps * math.log(sig(-0.5))
    assert math.isclose(float(dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)), want, rel_tol=1e-6)
    assert math.isclose(float(dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")), (h - 1 / 0.2) ** 2,
                        rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown DPO loss kind"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")


def test_sft_step_equals_naive_cross_entropy():
    m, tok = tiny_model(seed=1), CharTok()
    rows = [{"prompt": "hello there", "completion": "general kenobi"},
            {"prompt": "q", "completion": "a much longer answer"}]
    ex = sft_examples(tok, rows, 500, LoadStats())
    s, _ = step_sft(m, ex, tok.pad_id)
    tot, n = 0.0, 0
    for e in ex:
        ids = torch.tensor([e.prompt + e.completion])
        lg = m(ids)[0]
        tgt = ids[0, len(e.prompt):]
        tot += F.cross_entropy(lg[len(e.prompt) - 1:-1], tgt, reduction="sum")
        n += len(tgt)
    assert torch.allclose(s, tot, rtol=1e-5) and n == sum(e.loss_terms for e in ex)


def test_bt_reward_same_with_left_or_right_padding():
    m = tiny_model(seed=2, score_head=True)
    from data import pad
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    with torch.no_grad():
        r_right = m.reward(*pad(seqs, 0, "right"))
        r_left = m.reward(*pad(seqs, 0, "left"))
        alone = torch.stack([m.reward(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))[0]
                             for s in seqs])
    assert torch.allclose(r_right, r_left, atol=1e-5) and torch.allclose(r_right, alone, atol=1e-5)


def genrm_pairs(k=8):
    return [Pair(f"p{i}", f"task {i}", f"good answer {i}", f"poor {i}") for i in range(k)]


def test_tiny_model_overfits_8_genrm_pairs(tmp_path):
    m, tok = tiny_model(seed=3), CharTok()
    ex = genrm_examples(tok, genrm_pairs(), 500, LoadStats(), seed=0)
    assert {e.completion[0] for e in ex} == {tok.token_id("A"), tok.token_id("B")}  # both orders occur
    cfg = TrainConfig(lr=3e-3, epochs=30, batch_size=4, warmup=0.05, progress=False)
    hist = fit(m, ex, step_genrm, cfg, tmp_path, tok.pad_id, log=lambda *_: None)
    with torch.no_grad():
        _, correct = step_genrm(m, ex, tok.pad_id)
    assert int(correct) == 8 and hist[-1]["loss"] < hist[0]["loss"]


def test_grad_accumulation_is_a_global_mean():
    """One step over 4 examples: batch 4 == batch 1 x accum 4 == 2 x 2 (token-mean over the step),
    and the loss equals the naive mean NLL over all completion tokens."""
    tok = CharTok()
    rows = [{"prompt": f"p{i}", "completion": "x" * (3 + 5 * i)} for i in range(4)]
    ex = sft_examples(tok, rows, 500, LoadStats())
    grads, losses = [], []
    for bs in (4, 1, 2):
        m = tiny_model(seed=4)
        loss, _ = accumulate_gradients(m, [ex[i:i + bs] for i in range(0, 4, bs)], step_sft, tok.pad_id)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        losses.append(loss)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
    m = tiny_model(seed=4)
    nll = [F.cross_entropy(m(torch.tensor([e.prompt + e.completion]))[0, len(e.prompt) - 1:-1],
                           torch.tensor(e.completion), reduction="sum")
           for e in ex]
    assert math.isclose(losses[0], float(sum(nll).detach()) / sum(len(e.completion) for e in ex),
                        rel_tol=1e-5)
    assert math.isclose(losses[0], losses[1], rel_tol=1e-6)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    tok = CharTok()
    ex = genrm_examples(tok, genrm_pairs(6), 500, LoadStats(), seed=0)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=2, save_every=2, progress=False)
    full = tiny_model(seed=5)
    h_full = fit(full, ex, step_genrm, cfg, tmp_path / "a", tok.pad_id, log=lambda *_: None)
    killed = tiny_model(seed=5)
    fit(killed, ex, step_genrm, TrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path / "b", tok.pad_id,
          log=lambda *_: None)
    (tmp_path / "b" / "latest").write_text("ckpt-000002")  # as if killed after the step-2 checkpoint
    resumed = tiny_model(seed=99)  # whatever the process starts with, the checkpoint wins
    h_res = fit(resumed, ex, step_genrm, cfg, tmp_path / "b", tok.pad_id, log=lambda *_: None)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [r["step"] for r in h_res] == list(range(1, 7))
    assert [round(r["loss"], 5) for r in h_res] == [round(r["loss"], 5) for r in h_full]
    m = Llama.from_pretrained(tmp_path / "b" / "ckpt-000006")  # checkpoints are HF-format models
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), resumed.parameters()))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    tok = CharTok()
    ex = genrm_examples(tok, genrm_pairs(4), 500, LoadStats(), seed=0)
    m = tiny_model(seed=6)
    cfg = TrainConfig(lr=1e-3, batch_size=1, save_every=1, progress=False)
    calls = {"n": 0}

    def step(model, batch, pad_id):
        calls["n"] += 1
        s, c = step_genrm(model, batch, pad_id)
        return (s * float("nan") if calls["n"] == 3 else s), c
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 2.*ckpt-000002"):
        fit(m, ex, step, cfg, tmp_path, tok.pad_id, log=lambda *_: None)
    good = Llama.from_pretrained(tmp_path / "ckpt-000002")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_dpo_starts_at_log2_and_reference_cache_is_reused(tmp_path, monkeypatch):
    tok = CharTok()
    base = tmp_path / "base"
    tiny_model(seed=7).save_pretrained(base)
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no no {i}"} for i in range(4)]
    ex = pair_examples(tok, rows, 500, LoadStats())
    add_reference_logps(base, ex, tok.pad_id, tmp_path / "ref.pt", 2, torch.float32, "cpu", progress=False)
    step = make_step_dpo(0.1, 0.0, "sigmoid")
    s, _ = step(Llama.from_pretrained(base), ex, tok.pad_id)
    assert math.isclose(float(s.detach()) / 4, math.log(2), rel_tol=1e-5)
    loads = []
    orig = Llama.from_pretrained.__func__
    monkeypatch.setattr(Llama, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or orig(cls, *a, **k)))
    ex2 = pair_examples(tok, rows, 500, LoadStats())
    add_reference_logps(base, ex2, tok.pad_id, tmp_path / "ref.pt", 2, torch.float32, "cpu", progress=False)
    assert loads == [] and [e.ref for e in ex2] == [e.ref for e in ex]


def test_over_long_examples_are_counted_skips():
    tok = CharTok()
    rows = [{"prompt": "p", "chosen": "c" * 10, "rejected": "r"},
            {"prompt": "p", "chosen": "c" * 300, "rejected": "r"}]
    st = LoadStats(read=2)
    ex = pair_examples(tok, rows, 100, st)
    assert len(ex) == 1 and st.kept == 1 and st.skipped == {"over-long pair (> 100 tokens)": 1}


def test_cli_bad_data_and_existing_run_dir(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_pairs(bad)
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        T.main(["--method", "dpo", "--out", str(out), "--data", str(bad)])
    assert (out / "x").read_text() == "keep me"


def test_cli_end_to_end_on_the_default_model(tmp_path, smollm):
    """`train.py --method sft` on 2 short pairs: a complete model directory (weights, config,
    tokenizer) that loads back, a metrics row per step, and a report."""
    from data import load_tokenizer
    d = tmp_path / "d.jsonl"
    d.write_text("\n".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"})
                           for w in ("yes", "ok")))
    rep = T.main(["--method", "sft", "--data", str(d), "--no-eval", "--out", str(tmp_path / "run"),
                  "--no-progress"])
    out = tmp_path / "run" / "model"
    m = Llama.from_pretrained(out)
    assert (load_tokenizer(out).encode("Hello world")
            == load_tokenizer("smollm2-135m-instruct").encode("Hello world"))
    assert not all(torch.equal(a, b) for a, b in zip(m.parameters(), smollm.parameters()))  # it trained
    rows = [json.loads(l) for l in open(tmp_path / "run" / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert rep["final_model"] == str(out)


def test_before_after_change_is_paired_over_the_same_pairs():
    """The main job's "[after - before]" line: the mean of per-pair differences (maj@N, a pair
    judged in both orders scores 0, 0.5 or 1), a paired interval around it, pairs without a score
    left out, and no pairing at all when the evaluated pairs differ."""
    ids = [f"p{i}" for i in range(40)]
    before = {"per_pair": {"id": ids, "maj@N": [0.5] * 40}}
    after = {"per_pair": {"id": ids, "maj@N": [1.0] * 10 + [0.5] * 25 + [0.0] * 4 + [None]}}
    lines = []
    d = judge_change(before, after, lines.append)
    diffs = [0.5] * 10 + [0.0] * 25 + [-0.5] * 4
    assert abs(d["diff"] - sum(diffs) / len(diffs)) < 1e-12
    assert d["ci"][0] < d["diff"] < d["ci"][1] and d["ci"][0] > -0.5 and d["ci"][1] < 0.5
    assert "39 held-out pairs" in lines[0]
    moved = {"per_pair": {"id": ids[::-1], "maj@N": [1.0] * 40}}
    assert judge_change(before, moved, lines.append) is None and "not paired" in lines[-1]
