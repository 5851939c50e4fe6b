"""torchrun with 2 CPU processes (gloo, FSDP2) gives what one process gives (issue: scale out)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_workers, tiny_model
from model import Llama

HERE = Path(__file__).resolve().parent
torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


def launch(case, tmp, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "dist_worker.py"), case, str(tmp)] if nproc > 1 else \
          [sys.executable, str(HERE / "dist_worker.py"), case, str(tmp)]
    run_workers(cmd)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tiny_model(seed=11, tie_word_embeddings=True).save_pretrained(d / "base")
    return d


def params(path):
    return torch.cat([p.detach().flatten() for p in Llama.from_pretrained(path).parameters()])


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradients_on_two_ranks_equal_one_process(tmp, kind):
    """The loss is the global mean (not a mean of per-rank means): same loss, same gradient."""
    launch(f"grad_{kind}", tmp, 1)
    launch(f"grad_{kind}", tmp, 2)
    one, two = (torch.load(tmp / f"grad_{kind}_{w}.pt") for w in (1, 2))
    assert abs(one["loss"] - two["loss"]) < 1e-6
    for n, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][n], atol=1e-6), n


def test_activation_checkpointing_under_fsdp2_same_gradients(tmp):
    """Blocks recomputed in backward inside FSDP2's shards (2 ranks) give one process's gradients
    without checkpointing."""
    launch("grad_dpo", tmp, 1)
    launch("grad_dpo_ckpt", tmp, 2)
    one, two = (torch.load(tmp / f) for f in ("grad_dpo_1.pt", "grad_dpo_ckpt_2.pt"))
    assert abs(one["loss"] - two["loss"]) < 1e-6
    for n, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][n], atol=1e-6), n


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_one_step_on_two_ranks_equals_one_process(tmp, kind):
    launch(kind, tmp, 1)
    launch(kind, tmp, 2)
    one, two = params(tmp / f"{kind}_1" / "model"), params(tmp / f"{kind}_2" / "model")
    assert not torch.equal(one, params(tmp / "base"))  # the step changed the model
    assert torch.allclose(one, two, atol=1e-5), (one - two).abs().max()
    ref1, ref2 = (torch.load(tmp / f"ref_{w}.pt")["ref"] for w in (1, 2)) if kind == "dpo" else ([], [])
    for a, b in zip(ref1, ref2):  # the sharded reference cache equals the single-process one
        assert all(abs(x - y) < 1e-5 for x, y in zip(a["sum"], b["sum"]))


def test_star_sampling_two_ranks_same_artefacts(tmp):
    launch("sample", tmp, 1)
    launch("sample", tmp, 2)
    one, two = (json.loads((tmp / f"samples_{w}.json").read_text()) for w in (1, 2))
    assert len(one) == 15 and one == two


def test_checkpoint_from_two_ranks_loads_and_resumes_on_one(tmp):
    launch("ckpt", tmp, 2)
    ck = tmp / "ckpt"
    assert (ck / "latest").read_text() == "ckpt-000002"
    assert torch.equal(params(ck / "ckpt-000002"), params(ck / "model"))
    # resume on one process from the 2-rank step-1 checkpoint: ends where the 2-rank run ended
    import shutil
    res = tmp / "resume"
    shutil.copytree(ck, res)
    shutil.rmtree(res / "ckpt-000002")
    shutil.rmtree(res / "model")
    (res / "latest").write_text("ckpt-000001")
    sys.path.insert(0, str(HERE))
    import dist_worker
    dist_worker.run_fit("sft", tmp, 2, res, save_every=1)
    assert torch.allclose(params(res / "model"), params(ck / "model"), atol=1e-5)
