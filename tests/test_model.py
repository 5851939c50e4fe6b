"""model.py against an independent naive Llama, HF/Meta golden outputs, the KV cache, checkpoints."""
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine as E
import gguf as G
import model as M
from conftest import golden, tiny_config, tiny_model


# ---------------------------------------------------------------- a naive Llama, written here
def naive_inv_freq(cfg):
    d = cfg.head_dim
    out = []
    for i in range(0, d, 2):
        f = 1.0 / (cfg.rope_theta ** (i / d))
        s = cfg.rope_scaling
        if s:
            wl = 2 * math.pi / f
            lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
            hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
            if wl > lo_wl:
                f = f / s["factor"]
            elif wl >= hi_wl:
                sm = ((s["original_max_position_embeddings"] / wl - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
                f = (1 - sm) * f / s["factor"] + sm * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def naive_forward(m, ids, offset=0):
    """Explicit per-head attention with explicit rotation of each (i, i + d/2) pair, float64."""
    cfg = m.config
    sd = {k: v.double() for k, v in m.state_dict().items()}
    T = len(ids)
    inv = naive_inv_freq(cfg)
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(v, p):  # v [hd]
        out = v.clone()
        for i in range(hd // 2):
            a = (p + offset) * inv[i]
            x1, x2 = v[i], v[i + hd // 2]
            out[i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[i + hd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    x = sd["model.embed_tokens.weight"][ids]
    for L in range(cfg.num_hidden_layers):
        g = lambda n: sd[f"model.layers.{L}.{n}.weight"]  # noqa: E731
        h = norm(x, g("input_layernorm"))
        q = (h @ g("self_attn.q_proj").T).view(T, nh, hd)
        k = (h @ g("self_attn.k_proj").T).view(T, nkv, hd)
        v = (h @ g("self_attn.v_proj").T).view(T, nkv, hd)
        att = torch.zeros(T, nh, hd, dtype=torch.float64)
        for head in range(nh):
            kv = head // (nh // nkv)
            qs = torch.stack([rope(q[t, head], t) for t in range(T)])
            ks = torch.stack([rope(k[t, kv], t) for t in range(T)])
            for t in range(T):
                sc = (qs[t] @ ks[:t + 1].T) / math.sqrt(hd)
                att[t, head] = torch.softmax(sc, -1) @ v[:t + 1, kv]
        x = x + att.reshape(T, nh * hd) @ g("self_attn.o_proj").T
        h = norm(x, g("post_attention_layernorm"))
        gate = h @ g("mlp.gate_proj").T
        x = x + (gate * torch.sigmoid(gate) * (h @ g("mlp.up_proj").T)) @ g("mlp.down_proj").T
    x = norm(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


def test_matches_naive_implementation():
    m = tiny_model()
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    ref = naive_forward(m, ids.tolist())
    with torch.no_grad():
        got = m(ids[None])[0]
    assert torch.allclose(got.double(), ref, atol=1e-4), (got.double() - ref).abs().max()
    with torch.no_grad():  # at a large position offset (llama3 scaling matters there)
        got = m(ids[None], pos=torch.arange(1000, 1012)[None])[0]
    ref = naive_forward(m, ids.tolist(), offset=1000)
    assert torch.allclose(got.double(), ref, atol=1e-4)


def test_rope_inv_freq_matches_meta_llama31_8b():
    g = torch.load(golden("llama31_8b_rope_inv_freq.pt"))
    cfg = tiny_config(head_dim=g["head_dim"], rope_theta=g["rope_theta"],
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    got = M.rope_inv_freq(cfg)
    assert got.dtype == torch.float32
    assert torch.allclose(got, g["inv_freq"].float(), rtol=1e-6, atol=0)
    assert torch.allclose(got.double(), naive_inv_freq(cfg), rtol=1e-6)


def test_tiny_llama31_golden_logits():
    d = golden("tiny-llama31")
    g = torch.load(d / "golden.pt")
    m = M.Llama.from_pretrained(d).eval()
    assert torch.allclose(m.inv_freq, g["rope_inv_freq"].float(), rtol=1e-6)
    ids = g["input_ids"]
    with torch.no_grad():
        assert (m(ids) - g["logits"]).abs().max() < 1e-4
        T = ids.shape[1]
        pos = (torch.arange(T) + g["position_offset"])[None].expand_as(ids)
        assert (m(ids, pos=pos) - g["logits_at_offset"]).abs().max() < 1e-4


def test_tiny_llama31_golden_greedy():
    from sample import generate
    d = golden("tiny-llama31")
    g = torch.load(d / "golden.pt")
    m = M.Llama.from_pretrained(d).eval()
    want = g["greedy_from_first8"]  # HF greedy continuation of row 0's first 8 tokens
    out = generate(m, [g["input_ids"][0, :8].tolist()], max_new_tokens=len(want), temperature=0,
                   progress=False)
    assert out[0][0].tokens == want


def test_smollm2_matches_hf_golden(smollm):
    g = json.loads(golden("smollm2_135m_instruct_golden.json").read_text())
    from sample import generate
    for r in g["records"]:
        with torch.no_grad():
            lg = smollm(torch.tensor([r["input_ids"]]))[0]
        top = lg[-1].topk(20)
        assert top.indices.tolist() == r["last_top20_ids"]
        assert torch.allclose(top.values, torch.tensor(r["last_top20_logits"]), atol=1e-3)
        assert torch.allclose(lg.logsumexp(-1), torch.tensor(r["logsumexp_per_position"]), atol=1e-3)
    out = generate(smollm, [r["input_ids"] for r in g["records"]], max_new_tokens=24, temperature=0,
                   stop_ids=[2], progress=False)
    for o, r in zip(out, g["records"]):
        assert o[0].tokens == r["greedy_24_ids"]


def test_kv_cache_prefill_and_decode_equal_full_forward():
    m = tiny_model(seed=3)
    ids = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids)
        e = E.Engine(m, 2, 32)
        pos = torch.arange(8)[None].expand(2, 8)
        parts = [e.head_logits(e.hidden(ids[:, :8], pos=pos))]
        for t in range(8, 14):
            parts.append(e.head_logits(e.hidden(ids[:, t:t + 1], pos=torch.full((2, 1), t))))
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("grouped", [False, True])
def test_cascade_attention_equals_plain_softmax_attention(dtype, tol, grouped):
    """_cascade against softmax attention of every row over its own full cache, in float64: rows
    share slots [0, L) (read once, from row 0), differ after, and stop at their own positions (the
    -inf mask). Grouped (a DecodeLayout): rows 0, 3 and rows 1, 2, 4 hold two prompts of 9 and 10
    tokens in slots [0, G) (each prompt read once, from its first row), junk between a prompt's end
    and G (masked), and their sampled tokens from slot G on."""
    g = torch.Generator().manual_seed(0)
    B, nkv, grp, hd, L, S, G = 5, 2, 3, 8, 7, 14, 10
    k, v = (torch.randn(B, nkv, S, hd, generator=g, dtype=torch.float64) for _ in range(2))
    k[:, :, :L], v[:, :, :L] = k[:1, :, :L], v[:1, :, :L]          # the shared prefix
    q = torch.randn(B, nkv, grp, hd, generator=g, dtype=torch.float64)
    hide = torch.arange(S) > torch.tensor([7, 8, 11, 9, 10])[:, None]  # each row's query slot
    layout = None
    if grouped:  # query slots from G on
        hide = torch.arange(S) > torch.tensor([10, 12, 13, 11, 10])[:, None]
        for rows in ([0, 3], [1, 2, 4]):                             # a group's rows hold its prompt
            k[rows, :, L:G], v[rows, :, L:G] = k[rows[:1], :, L:G], v[rows[:1], :, L:G]
        plen = torch.tensor([9, 10, 10, 9, 10])
        hide |= (torch.arange(S) >= plen[:, None]) & (torch.arange(S) < G)
        layout = E.DecodeLayout(plen, G, members=torch.tensor([[0, 3, 0], [1, 2, 4]]),
                                group=torch.tensor([0, 1, 1, 0, 1]), member=torch.tensor([0, 0, 1, 1, 2]))
    mask = torch.zeros(B, 1, 1, S).masked_fill(hide[:, None, None], float("-inf"))
    w = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, -1)
    want = w @ v                                                     # [B, nkv, grp, hd]
    got = E.cascade_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype), L, layout)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max() < tol


def test_activation_checkpointing_same_loss_and_gradients():
    """--activation-checkpointing recomputes each block in backward (each block runs twice) and
    gives the same loss and gradients as keeping the activations (float32, padded batch)."""
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    out = {}
    for ck in (False, True):
        m = tiny_model(seed=5).train()
        m.checkpointing = ck
        calls = []
        for blk in m.model.layers:  # count the MLP's runs (forward hooks do not fire in recompute)
            blk.mlp.forward = (lambda f: lambda x: (calls.append(1), f(x))[1])(blk.mlp.forward)
        loss = (m(idx, valid=valid).log_softmax(-1)[..., 7] * valid).sum()
        loss.backward()
        out[ck] = (loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls))
    assert out[False][2] == 2 and out[True][2] == 4  # two blocks, run once vs forward + recompute
    assert abs(out[False][0] - out[True][0]) < 1e-5
    for n, g in out[False][1].items():
        assert torch.allclose(g, out[True][1][n], atol=1e-6, rtol=1e-5), n


def test_padding_does_not_change_logits():
    """Left and right padding with a validity mask give the unpadded logits."""
    m = tiny_model(seed=4)
    a = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(a[None])[0]
        left = torch.cat([torch.zeros(4, dtype=torch.long), a])[None]
        vl = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(9, dtype=torch.bool)])[None]
        right = torch.cat([a, torch.zeros(4, dtype=torch.long)])[None]
        vr = vl.flip(-1)
        assert (m(left, valid=vl)[0, 4:] - ref).abs().max() < 1e-5
        assert (m(right, valid=vr)[0, :9] - ref).abs().max() < 1e-5


def test_save_load_bitwise_and_hf_layout(tmp_path):
    m = tiny_model(seed=6)
    m.save_pretrained(tmp_path / "a")
    m2 = M.Llama.from_pretrained(tmp_path / "a")
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # tied weights are written once, under HF's names
    t = tiny_model(seed=7, tie_word_embeddings=True)
    t.save_pretrained(tmp_path / "t")
    keys = set(load_file(str(tmp_path / "t" / "model.safetensors")))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    t2 = M.Llama.from_pretrained(tmp_path / "t")
    assert t2.lm_head.weight is t2.model.embed_tokens.weight
    assert torch.equal(t2.lm_head.weight, t.lm_head.weight)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]


def test_saved_keys_equal_hf_checkpoint_keys(tmp_path):
    d = golden("tiny-llama31")
    M.Llama.from_pretrained(d).save_pretrained(tmp_path)
    mine, hf = load_file(str(tmp_path / "model.safetensors")), load_file(str(d / "model.safetensors"))
    assert set(mine) == set(hf)
    assert all(mine[k].shape == hf[k].shape and torch.equal(mine[k], hf[k]) for k in hf)


def test_sharded_checkpoint_loads(tmp_path):
    m = tiny_model(seed=8)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "s1.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "s2.safetensors"))
    wm = {k: ("s1.safetensors" if i < half else "s2.safetensors") for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_hf()))
    m2 = M.Llama.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def _bad_ckpt(tmp_path, mutate):
    m = tiny_model(seed=9)
    m.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    mutate(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))


def test_bad_checkpoints_raise_named_errors(tmp_path):
    _bad_ckpt(tmp_path / "a", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \(3,\).*\(64,\)"):
        M.Llama.from_pretrained(tmp_path / "a")
    _bad_ckpt(tmp_path / "b", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        M.Llama.from_pretrained(tmp_path / "b")
    _bad_ckpt(tmp_path / "c", lambda sd: sd.__setitem__("extra.weight", torch.ones(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor.*extra\.weight"):
        M.Llama.from_pretrained(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        M.Llama.from_pretrained(tmp_path / "nope")


def test_bad_configs_raise_named_errors():
    good = tiny_config().to_hf()
    bad = dict(good)
    del bad["vocab_size"]
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        M.LlamaConfig.from_hf(bad, "x/config.json")
    bad = dict(good, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type.*'yarn'"):
        M.LlamaConfig.from_hf(bad)
    bad = dict(good, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"missing field 'rope_scaling\.low_freq_factor'"):
        M.LlamaConfig.from_hf(bad)
    # transformers 5 writes rope_parameters (with rope_theta inside)
    hf5 = {k: v for k, v in good.items() if k not in ("rope_scaling", "rope_theta")}
    hf5["rope_parameters"] = dict(good["rope_scaling"], rope_theta=123.0)
    c = M.LlamaConfig.from_hf(hf5)
    assert c.rope_theta == 123.0 and c.rope_scaling == good["rope_scaling"]


def _gguf(tmp_path, tensors, meta=()):
    """Write a minimal GGUF v3 file with F32 tensors."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta:
        head += s(k) + struct.pack("<I", 4) + struct.pack("<I", v)
    off, blobs = 0, b""
    for name, arr in tensors:
        head += (s(name) + struct.pack("<I", arr.dim())
                 + b"".join(struct.pack("<Q", d) for d in reversed(arr.shape)))
        head += struct.pack("<IQ", 0, off)
        blobs += arr.numpy().astype("<f4").tobytes()
        off += arr.numel() * 4
    head += b"\0" * ((-len(head)) % 32)
    p = tmp_path / "t.gguf"
    p.write_bytes(head + blobs)
    return p


def test_gguf_reader_roundtrip_and_truncation(tmp_path):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    p = _gguf(tmp_path, [("w", a)], meta=[("x.count", 7)])
    meta, t = G.read_gguf(p)
    assert meta["x.count"] == 7 and torch.equal(t["w"], a)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated GGUF"):
        G.read_gguf(p)
    p.write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(ValueError, match="not a GGUF"):
        G.read_gguf(p)


def test_q4_1_and_q8_0_dequantization():
    import numpy as np
    rng = np.random.default_rng(0)
    d, m = np.float16(0.5), np.float16(-1.25)
    q = rng.integers(0, 16, 32)
    blk = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8),
                          (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    assert np.allclose(G._dequantize("Q4_1", blk, 32), 0.5 * q - 1.25)
    q8 = rng.integers(-128, 128, 32).astype(np.int8)
    blk = np.concatenate([np.frombuffer(np.float16(0.25).tobytes(), np.uint8), q8.view(np.uint8)])
    assert np.allclose(G._dequantize("Q8_0", blk, 32), 0.25 * q8)


def test_hf_transformers_loads_our_checkpoint_and_agrees(tmp_path):
    """Where transformers is installed: our saved checkpoint loads unchanged in LlamaForCausalLM
    and gives our logits (also with tied embeddings)."""
    transformers = pytest.importorskip("transformers",
                                       reason="transformers not installed (optional oracle check)")
    for tie in (False, True):
        m = tiny_model(seed=10, tie_word_embeddings=tie)
        m.save_pretrained(tmp_path / str(tie))
        hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / str(tie)),
                                                           torch_dtype=torch.float32).eval()
        ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (hf(ids).logits - m(ids)).abs().max() < 1e-4
