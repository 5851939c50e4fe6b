"""The sampler's engine: a model's forward with a static KV cache (nanochat's engine.py beside its
gpt.py). model.py holds the network and one forward; everything a decode step adds lives here, on
an `Engine` built from a model for one `generate` call (sample.py) and dropped after it:

  KVCache        preallocated keys and values of every row, a token at slot = its position
  DecodeLayout   where each row's sampled tokens sit and which rows share a prompt
  cascade_attention  decode attention reading each shared key once for all the rows that share it
  Engine         the cached forward: RoPE tables, one additive mask per call (SDPA's own causal
                 mask for a prefill from slot 0), fused and prepacked weights ([q; k; v],
                 [gate; up], lm_head) for few-row matmuls, float32 norms as one call (rms_norm)

The weights are copied when the engine is built (on CPU kept for the next engine of the same
model while its weights are unchanged, packed_weights): they must not change while it is in use
(sampling does not train). The modules of the model are only read.
"""
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from machine import cpu_vendor, read_cpuinfo
from model import Llama, apply_rope, rope_cos_sin

# At one row F.linear is MKL's matrix-vector product, which streams a weight faster than oneDNN's
# packed kernel on Intel CPUs (an Intel Xeon with AVX-512: 38-47 GB/s against 15-28) and slower on
# AMD ones, where MKL does not take its fastest paths (an AMD EPYC with AVX512-BF16: 12 GB/s
# against 20-26). So a one-row engine keeps F.linear's layout on Intel CPUs only. A module
# constant (not a timing taken at run time), so a machine always samples with the same kernels.
ONE_ROW_GEMV = cpu_vendor(read_cpuinfo()) == "GenuineIntel"


def pack_weight(w, rows: int):
    """A copy of weight w [out, in] for `packed_linear`, for matmuls of about `rows` rows.

    On CPU, prepacked for oneDNN's linear (as inductor's CPU freezing does): it streams a weight
    2-3x faster than F.linear's layout in few-row matmuls and runs prefill faster too. For one row
    on an Intel CPU (ONE_ROW_GEMV) w itself: there F.linear is MKL's matrix-vector product, faster
    still (a SmolLM2-135M greedy step on an Intel Xeon: 49 ms packed, 32 ms plain). Elsewhere,
    and for bf16 on a CPU whose oneDNN has no bf16 kernels, w itself too."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available() or (rows == 1 and ONE_ROW_GEMV):
        return w.detach()
    if w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return w.detach()
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def packed_linear(x, w):
    """x @ w.T for a weight from pack_weight: x [..., in] -> [..., out]."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")
    return F.linear(x, w)


def rms_norm(norm, x):
    """The model's RMSNorm module `norm` applied to x [..., H]. On CPU in float32 as F.rms_norm:
    there it runs the module's operations in the same order in one call (bitwise the module's
    result, tested), without six Python-level calls. Elsewhere the module itself: in bf16 F.rms_norm
    rounds once where the module rounds before its scale, and on CUDA it is a different kernel."""
    if x.device.type == "cpu" and x.dtype == torch.float32:  # the weights share the model dtype
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


def prefill_from_slot_zero(slot):
    """Whether cache slots slot [B, T] are 0..T-1 in every row, T > 1: a prefill whose mask is
    exactly the causal one."""
    T = slot.shape[1]
    return T > 1 and torch.equal(slot, torch.arange(T, device=slot.device).expand_as(slot))


class KVCache:
    """One layer's static cache: keys and values [B, n_kv, S, hd]. Row b's token at position p
    lives in slot p (a sampled token, with a DecodeLayout: in slot gen_start + its index among the
    row's sampled tokens)."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)

    def update(self, where, k, v, rows, S):
        """Write new keys and values into their slots and return this batch's cache over [0, S).

        Args:
            where: [B' * n_kv * T] flat ids of the slots to write (Engine.hidden builds them once
                for all layers).
            k, v: [B', n_kv, T, hd] the new keys and values.
            rows: [B'] the batch's cache rows, or None for all (B' = B).
            S: the slots in use.
        Returns:
            keys, values [B', n_kv, S, hd] (views when rows is None).
        """
        hd = k.shape[-1]
        # One small copy per tensor: the flat slot ids address [B * n_kv * S_max, hd].
        self.k.view(-1, hd).index_copy_(0, where, k.reshape(-1, hd))
        self.v.view(-1, hd).index_copy_(0, where, v.reshape(-1, hd))
        if rows is None:
            return self.k[:, :, :S], self.v[:, :, :S]
        return self.k[rows, :, :S], self.v[rows, :, :S]


@dataclass
class DecodeLayout:
    """Where the rows of a decode step keep their tokens and which rows share a prompt (the sampler
    builds it). Slots [0, gen_start) hold each row's prompt at slot = position (slots past its
    prompt_len are junk, masked); its sampled tokens follow at slots gen_start, gen_start + 1, ...,
    so the sampled tokens of all rows sit in one short range whatever their prompt lengths.
    Rows sampling the same prompt form a group: cascade_attention reads the prompt's keys once per
    group (members None: each row reads its own prompt)."""
    prompt_len: torch.Tensor  # [B] long
    gen_start: int            # the call's longest prompt
    members: torch.Tensor | None = None  # [P, m] each group's rows (the first reads the prompt), padded
    group: torch.Tensor | None = None    # [B] each row's group
    member: torch.Tensor | None = None   # [B] each row's index in members[group]


def cascade_attention(q, k, v, mask, L, layout: DecodeLayout | None = None):
    """Decode attention with each key read once for all the rows that share it (cascade attention,
    the idea of vLLM's and FlashInfer's shared-prefix kernels), in up to three levels: slots [0, L)
    hold the same keys in every row (a prefix of every prompt), read from row 0 for all rows'
    queries; with a `layout` that has groups, slots [L, gen_start) hold each row's prompt, read
    from one row per group for the queries of all its rows; the remaining slots per row. One
    softmax over all levels, in float32.

    Args:
        q: [B, nkv, g, hd] the g query heads of each kv head.
        k, v: [B, nkv, S', hd] the cache over the slots in use.
        mask: [B, 1, 1, S'] additive (0 or -inf).
        L: slots every row shares.
    Returns:
        [B, nkv, g, hd] in q's dtype.
    """
    (B, nkv, g, hd), dt, q = q.shape, q.dtype, q.float()  # float32 scores and sums (no-ops in float32)
    G = L if layout is None else layout.gen_start
    k0, v0, k2, v2 = k[0, :, :L].float(), v[0, :, :L].float(), k[:, :, G:].float(), v[:, :, G:].float()
    # Level 1: every row's queries as one block against the shared prefix, read from row 0.
    s = [(q.transpose(0, 1).reshape(nkv, B * g, hd) @ k0.transpose(1, 2)).view(nkv, B, g, L).transpose(0, 1)]
    if G > L:  # Level 2, per group: the members' queries as one block against their prompt's keys.
        (P, m), first = layout.members.shape, layout.members[:, 0]     # first: the row read per group
        at = (layout.group, slice(None), layout.member)                  # row b's place in the groups
        kb, vb = k[first, :, L:G].float(), v[first, :, L:G].float()                # [P, nkv, G-L, hd]
        qg = q[layout.members].transpose(1, 2).reshape(P, nkv, m * g, hd)          # [P, nkv, m*g, hd]
        sb = (qg @ kb.transpose(2, 3)).view(P, nkv, m, g, G - L) + mask[first, :, :, None, L:G]
        s.append(sb[at])                                                           # [B, nkv, g, G-L] row b's
    # Level 3: each row's own slots (its sampled tokens).
    s.append(q @ k2.transpose(2, 3) + mask[..., G:])                               # [B, nkv, g, S'-G]
    p = torch.cat(s, -1).mul_(hd ** -0.5).softmax(-1)                              # [B, nkv, g, S']
    y = (p[..., :L].transpose(0, 1).reshape(nkv, B * g, L) @ v0).view(nkv, B, g, hd).transpose(0, 1)
    if G > L:
        pg = p.new_empty(P, nkv, m, g, G - L)  # a padding member's block stays junk: its rows are dropped
        pg[at] = p[..., L:G]                                                       # back to the groups
        y = y + (pg.view(P, nkv, m * g, G - L) @ vb).view(P, nkv, m, g, hd)[at]
    return (y + p[..., G:] @ v2).to(dt)


# The fused and prepacked weights of the last engine built for each model on CPU. Building them
# copies every weight (and on CPU reorders it for oneDNN), 0.1-1 s for SmolLM2-135M, which a judge
# calling generate once per batch would pay every call; they are kept while the model lives and
# reused while its parameters are the same tensors at the same versions (an in-place update, as
# an optimizer step or load_state_dict, bumps a tensor's version, so it rebuilds them).
_PACKED = weakref.WeakKeyDictionary()


def packed_weights(model: Llama, rows: int):
    """Each block's ([q; k; v], o, [gate; up], down) weights and the lm_head's, fused and packed
    by pack_weight for matmuls of about `rows` rows; cached per model on CPU (see _PACKED)."""
    key = (rows, ONE_ROW_GEMV, tuple((p.data_ptr(), p._version) for p in model.parameters()))
    # Same tensors at the same versions: nothing was trained since the copies were made.
    hit = _PACKED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    blocks = []
    for blk in model.model.layers:
        a, f = blk.self_attn, blk.mlp
        blocks.append((pack_weight(torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)), rows),
                       pack_weight(a.o_proj.weight, rows),
                       pack_weight(torch.cat((f.gate_proj.weight, f.up_proj.weight)), rows),
                       pack_weight(f.down_proj.weight, rows)))
    packed = blocks, pack_weight(model.lm_head.weight, rows)
    if model.lm_head.weight.device.type == "cpu":  # on a GPU the copies would hold memory training needs
        _PACKED[model] = key, packed
    return packed


@dataclass
class EngineLayer:
    """One transformer block as the engine runs it: the model's block (its norms are used as they
    are), its cache and its weights fused and prepacked."""
    block: torch.nn.Module
    cache: KVCache
    wqkv: torch.Tensor  # [q; k; v] projections, packed
    wo: torch.Tensor
    w13: torch.Tensor   # [gate; up], packed: one matmul streams both
    w2: torch.Tensor


class Engine:
    """A model's cached forward for `batch` rows of up to `max_len` slots (model dtype and device).

    Builds the RoPE tables of the slots' positions and copies the weights fused ([q; k; v],
    [gate; up]) and prepacked for few-row matmuls (pack_weight), block by block and the lm_head.
    `shared`: slots [0, shared) hold the same keys and values in every row (share_prefix)."""

    def __init__(self, model: Llama, batch: int, max_len: int):
        self.model, self.length, self.shared = model, max_len, 0
        cfg, w = model.config, model.lm_head.weight
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # RoPE of every slot once per call; each step only indexes these tables by position.
        pos = torch.arange(max_len, device=w.device)
        self.rope_cos, self.rope_sin = rope_cos_sin(model.inv_freq, pos)            # [S, hd] each, float32
        blocks, self.w_head = packed_weights(model, batch)
        self.layers = [EngineLayer(blk, KVCache(batch, self.nkv, max_len, self.hd, w.dtype, w.device), *ws)
                       for blk, ws in zip(model.model.layers, blocks)]

    # -- the cache's rows ----------------------------------------------------------------------
    def copy_cache_rows(self, src, dst, length: int, start: int = 0):
        """Copy slots [start, length) of cache rows `src` [R] into rows `dst` [R] (long indices)."""
        for layer in self.layers:
            c = layer.cache
            c.k[dst, :, start:length] = c.k[src, :, start:length]
            c.v[dst, :, start:length] = c.v[src, :, start:length]

    def share_prefix(self, length: int):
        """Slots [0, length) now hold the same keys and values in every cache row (the sampler copied
        a shared prompt there): decode steps read them once for all rows (cascade_attention)."""
        self.shared = length

    def select_cache_rows(self, rows):
        """Keep (and reorder or repeat) the cache rows `rows` [R'] (long indices into the batch)."""
        for layer in self.layers:
            c = layer.cache
            c.k, c.v = c.k[rows], c.v[rows]

    # -- the cached forward --------------------------------------------------------------------
    def hidden(self, idx, *, pos, rows=None, static=False, layout=None):
        """Final (normed) hidden states of new tokens, their keys and values written to the cache.

        Each token attends to the slots <= its own in its row; a layout also hides the junk slots
        between a row's prompt and gen_start. One additive mask over the slots in use, [0, max
        slot] (static: all of them, fixed shapes for a CUDA graph), shared by all layers.

        Args:
            idx: [B, T] token ids.
            pos: [B, T] their positions (RoPE); each token's cache slot is its position, or with a
                layout gen_start + its index among the row's sampled tokens.
            rows: [B] long, the cache rows of the batch (None: all, in order).
            static: attend over all slots, masked past each position.
            layout: a DecodeLayout (one token per row): sampled tokens in slots of their own and
                rows grouped by prompt.
        Returns:
            [B, T, H] in the model's dtype.
        """
        dev = idx.device
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]     # [B, 1, T, hd]
        slot = pos if layout is None else pos - layout.prompt_len[:, None] + layout.gen_start  # [B, T]
        # The mask: the future of each token, and with a layout the junk between prompt and samples.
        slots = torch.arange(self.length if static else int(slot.max()) + 1, device=dev)
        hide = slots > slot[..., None]                                          # [B, T, S']
        if layout is not None:
            hide |= (slots >= layout.prompt_len[:, None, None]) & (slots < layout.gen_start)
        mask = torch.zeros(hide.shape, dtype=self.model.lm_head.weight.dtype, device=dev)
        mask = mask.masked_fill_(hide, float("-inf"))[:, None]                   # [B, 1, T, S']
        # The flat cache slot ids of the new keys and values: (row, kv head, slot).
        r = torch.arange(len(pos), device=dev) if rows is None else rows
        heads = r[:, None] * self.nkv + torch.arange(self.nkv, device=dev)       # [B, nkv]
        where = ((heads * self.length)[:, :, None] + slot[:, None, :]).flatten()  # [B * nkv * T]
        # Rows grouped by prompt (cascade); a static step reads each row's prompt from its own row.
        cascade = layout if layout is not None and layout.members is not None and not static else None
        # A prefill from slot 0 (every row's tokens at slots 0..T-1): the mask is the causal one,
        # which SDPA applies itself, skipping the key blocks it hides (bitwise the same, tested).
        causal = layout is None and not static and prefill_from_slot_zero(slot)
        x = self.model.model.embed_tokens(idx)                                   # [B, T, H]
        for layer in self.layers:
            blk = layer.block
            h = rms_norm(blk.input_layernorm, x)
            x = x + self._attention(layer, h, cos, sin, mask, where, rows, cascade, causal)
            x = x + self._mlp(layer, rms_norm(blk.post_attention_layernorm, x))
        return rms_norm(self.model.model.norm, x)

    def _attention(self, layer, x, cos, sin, mask, where, rows, cascade, causal=False):
        """Attention with the cache: one matmul for q, k, v, RoPE on q and k at once, and at T = 1
        the g = nh / nkv query heads of a kv head as g queries (no expanded k, v). x [B, T, H]."""
        B, T, _ = x.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qkv = packed_linear(x, layer.wqkv).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # [B, nh+2nkv, T, hd]
        # q and k are contiguous in the fused projection, so one RoPE call rotates both.
        qk = apply_rope(qkv[:, :nh + nkv], cos, sin)
        q, v = qk[:, :nh], qkv[:, nh + nkv:]                                # [B, nh, T, hd], [B, nkv, T, hd]
        k, v = layer.cache.update(where, qk[:, nh:], v, rows, mask.shape[-1])  # [B, nkv, S', hd]
        if T == 1:  # query head h uses kv head h // g: [B, nkv, g, hd] attends like g tokens
            q = q.reshape(B, nkv, nh // nkv, hd)
            y = (cascade_attention(q, k, v, mask, self.shared, cascade) if self.shared or cascade is not None
                 else F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            # One token per row: the heads of [B, nkv, g, hd] are already in o_proj's input order.
            y = y.reshape(B, T, nh * hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               enable_gqa=True)                        # [B, nh, T, hd]
            y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return packed_linear(y, layer.wo)

    def _mlp(self, layer, x):
        """SwiGLU with gate and up in one matmul (few-row decode is bandwidth-bound)."""
        gate, up = packed_linear(x, layer.w13).chunk(2, dim=-1)
        return packed_linear(F.silu(gate) * up, layer.w2)

    def head_logits(self, h):
        """Float32 logits [..., V] of final hidden states h [..., H] (the prepacked lm_head)."""
        return packed_linear(h, self.w_head).float()
