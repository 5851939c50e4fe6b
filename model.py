"""Llama-3.1 in one file: config, RMSNorm, RoPE (with 'llama3' scaling), grouped-query attention,
SwiGLU, an optional scalar head (Bradley-Terry reward model, paper Eq. 1-2), one forward, and
Hugging Face safetensors load/save.

Parameter names are the Hugging Face `LlamaForCausalLM` names, so a state dict is a checkpoint.
The network only: the sampler's KV-cache forward is engine.py, the fused log-prob kernels are
kernels.py, the default model's GGUF conversion is gguf.py.
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import (
    load_state_dict,
    read_json,
    read_safetensors,
    require,
    resolve_model,
    weight_files,
    write_json,
    write_safetensors,
)

# ----------------------------------------------------------------------------------------------
# config

ROPE_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


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
        require(d, cls.REQUIRED, source)
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind == "default":
                rope = None
            elif kind != "llama3":
                raise ValueError(f"{source}: field 'rope_scaling.rope_type' = {kind!r} is not supported "
                                 "(only 'llama3' or none)")
            else:
                require(rope, ROPE_SCALING_FIELDS, source, prefix="rope_scaling.")
                rope = {"rope_type": "llama3", **{k: rope[k] for k in ROPE_SCALING_FIELDS}}
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
        # Normalise in float32, cast back to the input dtype, then scale (HF LlamaRMSNorm's order).
        # x [..., H] -> [..., H]; the statistic is over the last dimension only.
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
    # Wavelengths longer than the original context are slowed by `factor`, shorter than old / hi
    # kept, and the band between blended linearly in old / wavelen.
    factor, lo, hi, old = (s[k] for k in ROPE_SCALING_FIELDS)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, blended, out)


def rope_cos_sin(inv_freq, pos):
    """RoPE's cos and sin of positions pos [...] (long): [..., hd] each, float32, the angles of the
    two halves repeated (HF rotate-half layout)."""
    freqs = pos[..., None].float() * inv_freq                                   # [..., hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                     # [..., hd]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: [B, nh, T, hd]; cos/sin: [B, 1, T, hd] float32. HF rotate-half layout, in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)

    def forward(self, x, cos, sin, mask):
        """x [B, T, H]; cos, sin [B, 1, T, hd]; mask [B, 1, T, T] bool (True: attend) -> [B, T, H]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        # Positions enter through q and k only; each key head serves nh / nkv query heads (GQA).
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU: [B, T, H] -> [B, T, H]


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        # Pre-norm residual block: each sublayer reads a normed copy and adds to x [B, T, H].
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
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
        self.checkpointing = False  # training: recompute each block in backward (activation memory / L)

    def hidden(self, idx, *, pos=None, valid=None, attn_mask=None):
        """Final (normed) hidden states, causal attention over `idx`.

        Args:
            idx: [B, T] token ids.
            pos: [B, T] positions; default: the count of real tokens before each token.
            valid: [B, T] (1 = real token) masks padding keys (left or right padding).
            attn_mask: [B, T, T] bool (query, key), with explicit `pos`, replaces the causal mask
                (packed pairs, data.PackedPairs).
        Returns:
            [B, T, H] in the model's dtype.
        """
        (B, T), dev = idx.shape, idx.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        if attn_mask is not None:  # packed pairs: the caller's mask and positions
            assert pos is not None, "an explicit attention mask needs explicit positions"
            mask = attn_mask
        elif valid is None:
            mask = causal[None].expand(B, T, T)
            pos = torch.arange(T, device=dev)[None].expand(B, T) if pos is None else pos
        else:
            valid = valid.bool()
            # A padding query attends to itself only, so no row of the mask is empty.
            mask = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos
        cos, sin = rope_cos_sin(self.inv_freq, pos)                             # [B, T, hd] each
        args = (cos[:, None], sin[:, None], mask[:, None])                # [B, 1, T, hd] x2, [B, 1, T, T]
        x = self.model.embed_tokens(idx)                                         # [B, T, H]
        ckpt = self.checkpointing and torch.is_grad_enabled()  # then each block keeps only its input
        for blk in self.model.layers:
            x = checkpoint(blk, x, *args, use_reentrant=False) if ckpt else blk(x, *args)
        return self.model.norm(x)

    def forward(self, idx, *, pos=None, valid=None):
        """Float32 logits [B, T, V]. Training code should use `hidden` + `fused_logprobs`."""
        return self.lm_head(self.hidden(idx, pos=pos, valid=valid)).float()

    def reward(self, idx, valid):
        """Scalar reward [B] from the last real token's hidden state (Bradley-Terry head, Eq. 1).
        Works with left or right padding: positions and the last index come from `valid` [B, T]."""
        h = self.hidden(idx, valid=valid)                                        # [B, T, H]
        T = idx.shape[1]
        last = T - 1 - valid.long().flip(-1).argmax(-1)                         # [B] last real index
        hl = h[torch.arange(idx.shape[0], device=idx.device), last]              # [B, H]
        return self.score(hl).float().squeeze(-1)

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", score_head=None):
        """Load an HF-format directory (model.safetensors or sharded with an index), or the name
        `smollm2-135m-instruct` (files.resolve_model). Wrong shapes, missing and unexpected tensors
        are errors. score_head: add a fresh scalar head (True), drop one (False), or keep what the
        checkpoint has (None)."""
        path = resolve_model(path)
        cfg = read_config(path)
        sd = load_state_dict(path)
        cfg.score_head = "score.weight" in sd if score_head is None else score_head
        with torch.device("meta"):
            model = cls(cfg)
        expect = dict(model.state_dict())
        if cfg.tie_word_embeddings:
            expect.pop("lm_head.weight", None)
            sd.pop("lm_head.weight", None)  # some tied checkpoints carry it too
        fresh_score = bool(score_head) and "score.weight" not in sd
        if fresh_score:
            sd["score.weight"] = torch.zeros(1, cfg.hidden_size)  # fresh head, set by init below
        for what, names in (("missing", set(expect) - set(sd)), ("unexpected", set(sd) - set(expect))):
            if names:
                names = sorted(names)
                raise ValueError(f"{path}: {what} tensor(s) {names[:5]}{'...' if len(names) > 5 else ''}")
        for k, v in expect.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: tensor '{k}' has shape {tuple(sd[k].shape)}, "
                                 f"config expects {tuple(v.shape)}")
        # Built on the meta device, so the weights are allocated once, where they will live.
        model = model.to_empty(device=device)
        model.load_state_dict({k: sd[k] for k in expect}, strict=False, assign=False)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        # A new reward head starts from small seeded weights, so the same run gives the same head.
        if fresh_score:
            g = torch.Generator().manual_seed(0)
            init = torch.randn(1, cfg.hidden_size, generator=g) / cfg.hidden_size ** 0.5
            model.score.weight.data = init.to(device)
        return model.to(dtype)

    def save_pretrained(self, path, state_dict=None):
        """Write config.json + model.safetensors (tied weights once, as HF does), atomically.
        `state_dict`: a full state dict to write instead of this module's (FSDP, see dist.py)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        write_safetensors(path / "model.safetensors", sd)
        write_json(path / "config.json", self.config.to_hf())


def read_config(path: Path) -> LlamaConfig:
    """config.json of an HF-format directory; missing or malformed: an error naming the file."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json in model directory")
    return LlamaConfig.from_hf(read_json(f), str(f))


def check_pretrained(path) -> LlamaConfig:
    """Read config.json and every safetensors header without loading the weights: a run checks
    its model before it writes anything."""
    path = resolve_model(path)
    cfg = read_config(path)
    for f in weight_files(path):
        read_safetensors(f, header_only=True)
    return cfg
