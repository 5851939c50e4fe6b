"""Llama-3.1 in one file: config, RMSNorm, RoPE (with 'llama3' scaling), grouped-query attention,
SwiGLU, a static KV cache with explicit positions, an optional scalar head (Bradley-Terry reward
model, paper Eq. 1-2), and Hugging Face safetensors load/save.

Parameter names are the Hugging Face `LlamaForCausalLM` names, so a state dict is a checkpoint.
The default model's GGUF conversion lives in gguf.py, the fused log-prob kernels in kernels.py.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from files import atomic_write, load_state_dict, read_json, read_safetensors, weight_files
from gguf import resolve_model


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


def _pack(w, rows: int):
    """A copy of weight w [out, in] for `_linear` while sampling: on CPU prepacked for oneDNN's linear
    (as inductor's CPU freezing does), which streams a weight 2-3x faster than F.linear's layout in
    few-row matmuls and runs prefill faster too; `rows` is the expected row count. Elsewhere w itself."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return w.detach()
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def _linear(x, w):
    """x @ w.T for a weight from _pack."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")
    return F.linear(x, w)


class KVCache(nn.Module):
    """Static preallocated cache [B, n_kv, S, hd]. Row b's token at position p lives in slot p (a
    sampled token, with a DecodeLayout: in slot gen_start + its index among the row's sampled)."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.shared = 0  # slots [0, shared) hold the same keys and values in every row (Llama.share_prefix)

    def update(self, where, k, v, rows, S):
        # where: [B', n_kv, T] flat ids of the slots to write (Llama._hidden_cached); k, v: [B', n_kv, T, hd];
        # rows [B'] the batch's cache rows (None: all, B' = B)
        # -> this batch's keys and values over slots [0, S): [B', n_kv, S, hd] (views when rows is None)
        hd = k.shape[-1]
        self.k.view(-1, hd).index_copy_(0, where.flatten(), k.reshape(-1, hd))  # one small copy per tensor
        self.v.view(-1, hd).index_copy_(0, where.flatten(), v.reshape(-1, hd))
        if rows is None:
            return self.k[:, :, :S], self.v[:, :, :S]
        return self.k[rows, :, :S], self.v[rows, :, :S]


@dataclass
class DecodeLayout:
    """Where the rows of a decode step keep their tokens and which rows share a prompt (the sampler
    builds it). Slots [0, gen_start) hold each row's prompt at slot = position (slots past its
    prompt_len are junk, masked); its sampled tokens follow at slots gen_start, gen_start + 1, ...,
    so the sampled tokens of all rows sit in one short range whatever their prompt lengths.
    Rows sampling the same prompt form a group: _cascade reads the prompt's keys once per group
    (no groups: each row reads its own prompt)."""
    prompt_len: torch.Tensor  # [B] long
    gen_start: int            # the call's longest prompt
    members: torch.Tensor | None = None  # [P, m] the rows of each group (its first reads the prompt), padded with it
    group: torch.Tensor | None = None    # [B] each row's group
    member: torch.Tensor | None = None   # [B] each row's index in members[group]


def _cascade(q, k, v, mask, L, groups: DecodeLayout | None = None):
    """Decode attention with each key read once for all the rows that share it (cascade attention,
    the idea of vLLM's and FlashInfer's shared-prefix kernels), in up to three levels: slots [0, L)
    hold the same keys in every row (a prefix of every prompt), read from row 0 for all rows'
    queries; with `groups`, slots [L, gen_start) hold each row's prompt, read from one row per
    group for the queries of all its rows; the remaining slots per row. One softmax over all levels,
    in float32. q [B, nkv, g, hd]; k, v [B, nkv, S', hd]; mask [B, 1, 1, S'] -> [B, nkv, g, hd]."""
    (B, nkv, g, hd), dt, q = q.shape, q.dtype, q.float()  # float32 scores and sums (no-ops in float32)
    G = L if groups is None else groups.gen_start
    k0, v0, k2, v2 = k[0, :, :L].float(), v[0, :, :L].float(), k[:, :, G:].float(), v[:, :, G:].float()
    s = [(q.transpose(0, 1).reshape(nkv, B * g, hd) @ k0.transpose(1, 2)).view(nkv, B, g, L).transpose(0, 1)]
    if G > L:  # per group: the members' queries as one block against their prompt's keys
        (P, m), at, rep = groups.members.shape, (groups.group, slice(None), groups.member), groups.members[:, 0]
        kb, vb = k[rep, :, L:G].float(), v[rep, :, L:G].float()                    # [P, nkv, G-L, hd]
        qg = q[groups.members].transpose(1, 2).reshape(P, nkv, m * g, hd)          # [P, nkv, m*g, hd]
        sb = (qg @ kb.transpose(2, 3)).view(P, nkv, m, g, G - L) + mask[rep, :, :, None, L:G]
        s.append(sb[at])                                                           # [B, nkv, g, G-L]: row b's block
    s.append(q @ k2.transpose(2, 3) + mask[..., G:])                               # [B, nkv, g, S'-G]
    p = torch.cat(s, -1).mul_(hd ** -0.5).softmax(-1)                              # [B, nkv, g, S']
    y = (p[..., :L].transpose(0, 1).reshape(nkv, B * g, L) @ v0).view(nkv, B, g, hd).transpose(0, 1)
    if G > L:
        pg = p.new_empty(P, nkv, m, g, G - L)  # a padding member's block stays junk: its output rows are dropped
        pg[at] = p[..., L:G]                                                       # back to the groups' blocks
        y = y + (pg.view(P, nkv, m * g, G - L) @ vb).view(P, nkv, m, g, hd)[at]
    return (y + p[..., G:] @ v2).to(dt)


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
        self.wqkv = self.wo = None  # _pack'ed [q; k; v] and o weights while a cache is set up (sampling)

    def forward(self, x, cos, sin, mask, where=None, rows=None, groups=None):
        if self.cache is not None:  # where, rows, groups: cache slots, rows and groups (Llama._hidden_cached)
            return self._cached(x, cos, sin, mask, where, rows, groups)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def _cached(self, x, cos, sin, mask, where, rows, groups):
        """KV-cache attention (sampling): one matmul for q, k, v, RoPE on q and k at once, and at
        T = 1 the g = nh / nkv query heads of a kv head as g queries (no expanded k, v).
        mask: additive float [B, 1, T, S']; where: flat cache slot ids [B, nkv, T] (KVCache.update)."""
        B, T, _ = x.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qkv = _linear(x, self.wqkv).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # [B, nh+2nkv, T, hd]
        qk = apply_rope(qkv[:, :nh + nkv], cos, sin)
        q, v = qk[:, :nh], qkv[:, nh + nkv:]                                # [B, nh, T, hd], [B, nkv, T, hd]
        k, v = self.cache.update(where, qk[:, nh:], v, rows, mask.shape[-1])  # [B, nkv, S', hd]
        if T == 1:  # query head h uses kv head h // g: [B, nkv, g, hd] attends like g tokens
            q, L = q.reshape(B, nkv, nh // nkv, hd), self.cache.shared
            y = (_cascade(q, k, v, mask, L, groups) if L or groups is not None
                 else F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, nh, T, hd]
        return _linear(y.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd), self.wo)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w13 = self.w2 = None  # _pack'ed [gate; up] and down weights while a cache is set up (sampling)

    def forward(self, x):
        if self.w13 is not None:  # one matmul streams both weights (few-row decode is bandwidth-bound)
            g, u = _linear(x, self.w13).chunk(2, dim=-1)
            return _linear(F.silu(g) * u, self.w2)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, where=None, rows=None, groups=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, where, rows, groups)
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
        self.rope_cos = self.rope_sin = None  # [S, hd] float32 tables while a cache is set up
        self.w_head = None                     # _pack'ed lm_head weight while a cache is set up
        self.checkpointing = False             # training: recompute each block in backward (activation memory / L)

    # -- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int):
        """Allocate a static KV cache of `max_len` slots for `batch` rows (model dtype/device), the
        RoPE tables of its positions, and the sampling weights: fused [q; k; v] and [gate; up], all
        block weights and lm_head prepacked for few-row matmuls (_pack). Those are copies that live
        until clear_cache: weights must not change while a cache is set up (sampling does not train)."""
        p = self.lm_head.weight
        freqs = torch.arange(max_len, device=p.device).float()[:, None] * self.inv_freq  # [S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                   # [S, hd]
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        for blk in self.model.layers:
            a, m = blk.self_attn, blk.mlp
            a.cache = KVCache(batch, a.nkv, max_len, a.hd, p.dtype, p.device)
            a.wqkv = _pack(torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)), batch)
            a.wo = _pack(a.o_proj.weight, batch)
            m.w13, m.w2 = _pack(torch.cat((m.gate_proj.weight, m.up_proj.weight)), batch), _pack(m.down_proj.weight, batch)
        self.w_head = _pack(p, batch)
        self.cache_len = max_len

    def clear_cache(self):
        for blk in self.model.layers:
            blk.self_attn.cache = blk.self_attn.wqkv = blk.self_attn.wo = blk.mlp.w13 = blk.mlp.w2 = None
        self.cache_len = 0
        self.rope_cos = self.rope_sin = self.w_head = None

    def head_logits(self, h):
        """Float32 logits [..., V] of final hidden states h [..., H] while a cache is set up (the
        prepacked lm_head)."""
        return _linear(h, self.w_head).float()

    def copy_cache_rows(self, src, dst, length: int, start: int = 0):
        """Copy slots [start, length) of cache rows `src` [R] into rows `dst` [R] (long indices)."""
        for blk in self.model.layers:
            c = blk.self_attn.cache
            c.k[dst, :, start:length] = c.k[src, :, start:length]
            c.v[dst, :, start:length] = c.v[src, :, start:length]

    def share_prefix(self, length: int):
        """Slots [0, length) now hold the same keys and values in every cache row (the sampler copied
        a shared prompt there): decode steps read them once for all rows (_cascade)."""
        for blk in self.model.layers:
            blk.self_attn.cache.shared = length

    def select_cache_rows(self, rows):
        """Keep (and reorder or repeat) the cache rows `rows` [R'] (long indices into the batch)."""
        for blk in self.model.layers:
            c = blk.self_attn.cache
            c.k, c.v = c.k[rows], c.v[rows]

    # -- forward -------------------------------------------------------------------------------
    def hidden(self, idx, *, pos=None, valid=None, attn_mask=None, rows=None, static=False, layout=None):
        """Final (normed) hidden states [B, T, H].

        Without a cache: causal attention over `idx`; `valid` [B, T] (1 = real token) masks padding
        keys (left or right padding), and positions default to the count of real tokens before
        each token. With a cache (`setup_cache`): `pos` [B, T] are the positions (= cache slots but
        with a layout) of the new tokens, each attends to slots <= its own in its row (a layout
        also hides the junk slots between its prompt and gen_start), and `rows` [B] (long)
        names the cache rows of the batch (default: all, in order); `static`: all slots, masked past
        each position (fixed shapes for a CUDA graph); `layout` (a DecodeLayout, one token per row):
        sampled tokens in slots of their own and rows grouped by prompt. `attn_mask` [B, T, T] bool
        (query, key; no cache) with explicit `pos` replaces the causal mask (packed pairs)."""
        (B, T), dev = idx.shape, idx.device
        if self.cache_len:
            assert pos is not None, "cached forward needs explicit positions"
            return self._hidden_cached(idx, pos, rows, static, layout)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        if attn_mask is not None:  # packed pairs: the caller's mask and positions
            assert pos is not None, "an explicit attention mask needs explicit positions"
            mask = attn_mask
        elif valid is None:
            mask = causal[None].expand(B, T, T)
            pos = torch.arange(T, device=dev)[None].expand(B, T) if pos is None else pos
        else:
            valid = valid.bool()
            # a padding query attends to itself only, so no row of the mask is empty
            mask = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos
        freqs = pos[..., None].float() * self.inv_freq                          # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                         # [B, 1, T, hd]
        args = (emb.cos(), emb.sin(), mask[:, None])                            # cos, sin; mask [B, 1, T, S]
        x = self.model.embed_tokens(idx)                                         # [B, T, H]
        ckpt = self.checkpointing and torch.is_grad_enabled()  # then each block keeps only its input
        for blk in self.model.layers:
            x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False) if ckpt else blk(x, *args)
        return self.model.norm(x)

    def _hidden_cached(self, idx, pos, rows, static, layout):
        """hidden() with the KV cache: RoPE rows from the tables setup_cache built, and one
        additive mask over the slots in use, [0, max slot] (static: all), shared by all layers.
        A token's slot is its position, or with a layout gen_start + its index among the sampled."""
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]     # [B, 1, T, hd]
        slot = pos if layout is None else pos - layout.prompt_len[:, None] + layout.gen_start  # [B, T]
        slots = torch.arange(self.cache_len if static else int(slot.max()) + 1, device=idx.device)
        hide = slots > slot[..., None]                                          # [B, T, S'] the future
        if layout is not None:  # and the junk between a row's prompt and its sampled tokens
            hide |= (slots >= layout.prompt_len[:, None, None]) & (slots < layout.gen_start)
        mask = torch.zeros(hide.shape, dtype=self.lm_head.weight.dtype, device=idx.device)
        mask = mask.masked_fill_(hide, float("-inf"))[:, None]                   # [B, 1, T, S']
        nkv = self.config.num_key_value_heads
        r = torch.arange(len(pos), device=idx.device) if rows is None else rows
        heads = r[:, None] * nkv + torch.arange(nkv, device=idx.device)          # [B, nkv] (row, head)
        where = (heads * self.cache_len)[:, :, None] + slot[:, None, :]           # [B, nkv, T] flat slot ids
        # rows grouped by prompt (_cascade); a static step reads each row's prompt from its own row
        groups = layout if layout is not None and layout.members is not None and not static else None
        x = self.model.embed_tokens(idx)                                         # [B, T, H]
        for blk in self.model.layers:
            x = blk(x, cos, sin, mask, where, rows, groups)
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


def read_config(path: Path) -> LlamaConfig:
    """config.json of an HF-format directory; missing or malformed: an error naming the file."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json in model directory")
    return LlamaConfig.from_hf(read_json(f), str(f))


def check_pretrained(path) -> LlamaConfig:
    """Read config.json and every safetensors header without loading the weights: a run checks
    its model before it writes anything."""
    cfg = read_config(resolve_model(path))
    for f in weight_files(resolve_model(path)):
        read_safetensors(f, header_only=True)
    return cfg
