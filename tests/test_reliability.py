"""Issue 16: faults and bad input, as a new user meets them. One test per defect of the issue:
eval's default order, resume with changed arguments, bad numbers, disk use, corrupt checkpoints,
bad files, lost results and stuck reruns, over-long pairs, --help. The CLIs run on a complete tiny
model directory (tiny_model's weights and a byte-level tokenizer.json), in seconds."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import compare
import eval as E
import train as T
from conftest import ROOT, CharTok, tiny_model
from data import LoadStats, Pair, load_pairs, load_tokenizer
from files import atomic_write
from fit import TrainConfig, fit
from genrm import genrm_examples, seeded_orders
from losses import step_genrm
from model import Llama


def model_dir(path, seed=0, always_a=False, **kw) -> Path:
    """A complete HF-format model directory: tiny_model (4096 positions) and a byte-level BPE
    tokenizer.json without merges (one token per byte) with ChatML's special tokens. always_a:
    every layer adds nothing and the head reads one large embedding component into the 'A' logit,
    so the model answers 'A' to everything (a pure position bias)."""
    path = Path(path)
    path.mkdir(parents=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    m = tiny_model(seed, **{"max_position_embeddings": 4096, **kw})
    if always_a:
        a = tok.token_to_id("A")
        with torch.no_grad():
            m.model.embed_tokens.weight[:, 0] = 100.0
            for layer in m.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            m.lm_head.weight.zero_()
            m.lm_head.weight[a, 0] = 10.0
    m.save_pretrained(path)
    return path


def pairs_file(path, n, seed=0, long_answer=None) -> Path:
    rnd = random.Random(seed)
    rows = [{"id": f"p{i}", "prompt": f"question {i}?", "chosen": "yes " * rnd.randint(1, 4) + str(i),
             "rejected": "no " * rnd.randint(1, 4) + str(i), "category": "chat"} for i in range(n)]
    if long_answer:
        rows[-1]["chosen"] = "x" * long_answer
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def size(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- 1. eval.py's default order --------------------------------------------------------------

def test_always_a_judge_scores_half_with_eval_defaults(tmp_path):
    """eval.py with its defaults judges both orders, so an always-"A" judge scores 0.5 (GenRM and
    CoT); --single-order draws each pair's order with the seed: its score is the share of pairs
    whose chosen answer drew the letter A."""
    m = model_dir(tmp_path / "m", always_a=True)
    data = pairs_file(tmp_path / "d.jsonl", 8)
    for judge, extra in (("genrm", []), ("cot", ["--max-new-tokens", "2"])):
        s = E.main(["--model", str(m), "--judge", judge, "--data", str(data), "--out", str(tmp_path / judge),
                    "--no-progress", *extra])
        al = s["results"]["d.jsonl"]["per_category"]["all"]
        assert al["maj@1"] == 0.5 and al["maj@N"] == 0.5
    s = E.main(["--model", str(m), "--judge", "genrm", "--data", str(data), "--single-order", "--seed", "3",
                "--out", str(tmp_path / "single"), "--no-progress"])
    orders = seeded_orders([None] * 8, 3)
    assert 0 < sum(orders) < 8  # both letters drawn
    assert s["results"]["d.jsonl"]["per_category"]["all"]["maj@1"] == sum(orders) / 8


# ---- 2. --resume with changed arguments ------------------------------------------------------

def test_resume_with_changed_arguments_refuses_and_keeps_args_json(tmp_path):
    m = model_dir(tmp_path / "m")
    data = pairs_file(tmp_path / "d.jsonl", 6)
    out = tmp_path / "run"
    base = ["--method", "dpo", "--model", str(m), "--data", str(data), "--no-eval", "--out", str(out),
            "--no-progress"]
    with pytest.raises(SystemExit, match="--max-steps 1"):
        T.main(base + ["--limit", "4", "--max-steps", "1"])
    record = (out / "args.json").read_bytes()
    with pytest.raises(SystemExit, match=r"--limit 4 -> 6; --lr 5e-06 -> 0.0001"):
        T.main(base + ["--limit", "6", "--resume", "--lr", "1e-4"])
    base += ["--limit", "4"]
    with pytest.raises(SystemExit, match=r"--beta 0.1 -> 0.2"):
        T.main(base + ["--resume", "--beta", "0.2"])
    assert (out / "args.json").read_bytes() == record
    rep = T.main(base + ["--resume", "--lr", "5e-6", "--keep-checkpoints"])  # the same work: accepted
    assert (out / "args.json").read_bytes() == record and Path(rep["final_model"]).is_dir()


# ---- 3. bad numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--lr", "0"), ("--epochs", "0"), ("--epochs", "-1"),
                                        ("--batch-size", "-1"), ("--batch-size", "0"), ("--grad-accum", "0"),
                                        ("--iterations", "0"), ("--samples-per-prompt", "0"),
                                        ("--limit", "-1"), ("--warmup", "1.5"), ("--lr", "nan"),
                                        ("--label-smoothing", "0.7"), ("--max-new-tokens", "0")])
def test_bad_numbers_are_one_line_errors_and_write_nothing(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.chdir(tmp_path)  # the default run directory would be runs/<method> here
    with pytest.raises(SystemExit) as e:
        # Were the number accepted, the run would stop at the model.
        T.main([flag, value, "--model", "absent"])
    assert e.value.code == 2 and f"error: argument {flag}: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["--samples", "0"], ["--limit", "-1"], ["--batch-size", "0"],
                                  ["--top-p", "0"], ["--threads", "0"]])
def test_bad_numbers_in_eval_and_compare(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        E.main(argv + ["--data", "x.jsonl", "--model", "absent"])
    assert f"error: argument {argv[0]}: " in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        # --rb-per-section 1 would drop the reasoning section.
        compare.main(["--rb-per-section", "1", "--out", str(tmp_path / "c")])
    assert "--rb-per-section: must be an even number >= 2" in capsys.readouterr().err


def test_limit_applies_to_sft_completion_files(tmp_path):
    m = model_dir(tmp_path / "m")
    d = tmp_path / "c.jsonl"
    d.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"ok {i}"}) + "\n"
                         for i in range(5)))
    T.main(["--method", "sft", "--model", str(m), "--data", str(d), "--limit", "2", "--batch-size", "8",
            "--no-eval", "--out", str(tmp_path / "run"), "--no-progress"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in rows] == [2]


# ---- 4. disk -------------------------------------------------------------------------------

def test_a_finished_stage_keeps_only_its_final_model(tmp_path):
    """A DPO run checkpointing every step ends with its model and small records only: no ckpt-*,
    no `latest`; the run directory is the model's size plus a few kB (before: two checkpoints of
    model plus AdamW state, about 7x). --keep-checkpoints keeps them."""
    m = model_dir(tmp_path / "m")
    data = pairs_file(tmp_path / "d.jsonl", 6)
    common = ["--method", "dpo", "--model", str(m), "--data", str(data), "--no-eval", "--no-progress",
              "--batch-size", "1", "--save-every", "1"]
    T.main(common + ["--out", str(tmp_path / "run")])
    run = tmp_path / "run"
    assert not list(run.rglob("ckpt-*")) and not (run / "train" / "latest").exists()
    model = size(run / "model")
    assert abs(model - size(m)) < 1000  # the final model (weights, config, tokenizer) is there, whole
    assert size(run) - model < 100_000  # args, metrics, report, reference log-probs
    T.main(common + ["--out", str(tmp_path / "keep"), "--keep-checkpoints"])
    assert (len(list((tmp_path / "keep" / "train").glob("ckpt-*"))) == 2
            and size(tmp_path / "keep") > 4 * model)


# ---- 5. corrupt checkpoints --------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated model", "truncated state", "empty latest", "garbage latest"])
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, damage):
    """Killed after step 4 (checkpoints 3 and 4 on disk), the newest damaged: the resume starts from
    the newest checkpoint that loads, says which it skipped, and ends on the uninterrupted run's
    weights."""
    tok = CharTok()
    ex = genrm_examples(tok, [Pair(f"p{i}", f"task {i}", f"good {i}", f"poor {i}") for i in range(6)], 500,
                        LoadStats(), seed=0)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=2, save_every=1, progress=False)
    full = tiny_model(seed=5)
    fit(full, ex, step_genrm, cfg, tmp_path / "a", tok.pad_id, log=lambda *_: None)
    fit(tiny_model(seed=5), ex, step_genrm, TrainConfig(**{**cfg.__dict__, "max_steps": 4}), tmp_path / "b",
        tok.pad_id, log=lambda *_: None)
    b = tmp_path / "b"
    assert sorted(p.name for p in b.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000004"]
    if damage == "truncated model":
        f = b / "ckpt-000004" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "truncated state":
        f = b / "ckpt-000004" / "state.pt"
        f.write_bytes(f.read_bytes()[:100])
    else:
        (b / "latest").write_text("" if damage == "empty latest" else "\x00garbage")
    logs = []
    resumed = tiny_model(seed=99)
    fit(resumed, ex, step_genrm, cfg, b, tok.pad_id, log=logs.append)
    for x, y in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(x, y, atol=1e-6)
    want = "resumed from " + str(b / ("ckpt-000003" if damage.startswith("truncated") else "ckpt-000004"))
    assert any(want in line for line in logs), logs
    skipped = str(b / "ckpt-000004") if damage.startswith("truncated") else str(b / "latest")
    assert any(line.startswith(f"skipped {skipped}") for line in logs), logs


# ---- 6. bad files ---------------------------------------------------------------------------

def test_bad_files_are_errors_naming_the_file(tmp_path):
    m = model_dir(tmp_path / "m")
    good = pairs_file(tmp_path / "good.jsonl", 4)

    def run(*a):
        T.main(["--method", "dpo", "--no-eval", "--no-progress", "--out", str(tmp_path / "run"), *a])
    bad = tmp_path / "latin1.jsonl"
    first_line = good.read_bytes().splitlines(keepends=True)[0]
    # \xe9 is a Latin-1 e-acute.
    bad.write_bytes(first_line + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(SystemExit, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9"):
        run("--model", str(m), "--data", str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match=r"empty\.jsonl: nothing to train on"):
        run("--model", str(m), "--data", str(empty), "--method", "sft")
    with pytest.raises(SystemExit, match=r"nowhere: model directory not found"):
        run("--model", str(tmp_path / "nowhere"), "--data", str(good))
    trunc = model_dir(tmp_path / "trunc")
    (trunc / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(SystemExit, match=r"trunc/model\.safetensors: unreadable safetensors file"):
        run("--model", str(trunc), "--data", str(good))
    broken = model_dir(tmp_path / "broken")
    (broken / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(SystemExit, match=r"broken/config\.json: malformed JSON"):
        run("--model", str(broken), "--data", str(good))
    for judge in ("genrm", "cot"):
        with pytest.raises(SystemExit, match=r"empty\.jsonl: no pairs to judge"):
            E.main(["--model", str(m), "--judge", judge, "--data", str(good), str(empty),
                    "--out", str(tmp_path / "e")])
    # Nothing is written, so the rerun is free.
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_cli_user_errors_exit_1_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    for argv in (["train.py", "--method", "dpo", "--no-eval", "--data", str(bad),
                  "--out", str(tmp_path / "r")],
                 ["eval.py", "--data", str(bad), "--out", str(tmp_path / "e")]):
        m = model_dir(tmp_path / f"m-{argv[0]}")
        p = subprocess.run([sys.executable, *argv, "--model", str(m)], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1] == f"error: {bad}:1: missing field 'rejected'"


# ---- 7. lost results and stuck reruns ------------------------------------------------------

def test_eval_never_overwrites_a_finished_evaluation(tmp_path):
    m = model_dir(tmp_path / "m")
    a, b = pairs_file(tmp_path / "a.jsonl", 3), pairs_file(tmp_path / "b.jsonl", 3, seed=1)
    out = tmp_path / "e"
    E.main(["--model", str(m), "--judge", "genrm", "--data", str(a), "--out", str(out), "--no-progress"])
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(SystemExit, match="holds results.json"):
        E.main(["--model", str(m), "--judge", "genrm", "--data", str(b), "--out", str(out), "--no-progress"])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    (out / "results.json").unlink()  # an interrupted evaluation: judgements only, started again
    (out / "results.md").unlink()
    E.main(["--model", str(m), "--judge", "genrm", "--data", str(b), "--out", str(out), "--no-progress"])
    assert sorted(f.name for f in out.iterdir()) == ["judgements_b.jsonl", "results.json", "results.md"]


def test_a_failed_run_writes_no_record_so_the_rerun_is_free(tmp_path):
    m = model_dir(tmp_path / "m")
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": 3}\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"d\.jsonl:1: field 'rejected' must be a string"):
        T.main(["--method", "dpo", "--model", str(m), "--data", str(bad), "--no-eval", "--out", str(out)])
    assert not out.exists()
    pairs_file(bad, 2)
    T.main(["--method", "dpo", "--model", str(m), "--data", str(bad), "--no-eval", "--out", str(out),
            "--no-progress"])
    assert json.loads((out / "args.json").read_text())["data"] == str(bad)


# ---- 8. over-long pairs ------------------------------------------------------------------------

def test_over_long_pairs_are_counted_skips_for_every_judge(tmp_path):
    """A pair longer than the model's positions (4096) is skipped and counted by the GenRM, CoT
    and BT judges alike; judge_pairs refuses one outright."""
    m = model_dir(tmp_path / "m")
    bt = model_dir(tmp_path / "m-bt", score_head=True)
    data = pairs_file(tmp_path / "d.jsonl", 3, long_answer=5000)
    for judge, model in (("genrm", m), ("cot", m), ("bt", bt)):
        s = E.main(["--model", str(model), "--judge", judge, "--data", str(data), "--max-new-tokens", "2",
                    "--out", str(tmp_path / judge), "--no-progress"])["results"]["d.jsonl"]
        assert s["n"] == 2 and s["read"] == 3
        assert s["skipped"] == {f"over-long for the {judge} judge (> 4096 positions)": 1}
    with pytest.raises(ValueError, match="longer than the model's 4096 positions"):
        E.judge_pairs(Llama.from_pretrained(m), load_tokenizer(m), load_pairs(data), "genrm", progress=False)


# ---- 9. --help and progress ---------------------------------------------------------------

def test_help_shows_defaults_and_genrm_has_a_progress_bar(tmp_path, capsys):
    helps = []
    # train.py's defaults depend on the run: a real-data run's here, the small world's below
    for main, argv in ((T.main, ["--data", "pairs.jsonl", "--help"]), (E.main, ["--help"]),
                       (T.main, ["--help"])):
        with pytest.raises(SystemExit):
            main(argv)
        helps.append(" ".join(capsys.readouterr().out.split()))
    assert "examples (pairs) per micro-batch (default: 16)" in helps[2]
    assert ("examples (pairs) per micro-batch (default: 2)" in helps[0]
            and "what a run directory keeps" in helps[0])
    assert "CoT rationale length cap (default: 256)" in helps[1] and "(default: None)" not in helps[1]
    m = model_dir(tmp_path / "m")
    E.main(["--model", str(m), "--judge", "genrm", "--data", str(pairs_file(tmp_path / "d.jsonl", 2)),
            "--out", str(tmp_path / "e")])
    assert "genrm:" in capsys.readouterr().err


def test_atomic_write_replaces_the_file_only_when_the_block_ends_without_error(tmp_path):
    dst = tmp_path / "report.json"
    dst.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(dst) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("killed mid-write")
    assert dst.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with atomic_write(dst) as tmp:
        Path(tmp).write_text("new")
        assert dst.read_text() == "old"  # the old file stands until the block ends
    assert dst.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
