"""bench.py's measuring primitives (a timer, memory bandwidth, matmul FLOP/s, one decode step and
its FLOPs) and its CUDA cases: random weights of real model shapes (nothing is downloaded on a GPU
machine), HF transformers sharing the very tensors where it is compared. Run through bench.py
(`--cuda`); not a test."""
import json
import statistics
import time

import torch

import sample
from data import Example
from engine import Engine, packed_linear
from kernels import pair_logps
from losses import make_step_dpo
from model import Llama, LlamaConfig, rope_inv_freq
from sample import GraphedDecode, decode_one, generate, pick_next, prefill


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def bandwidth(repeats=5):
    """Bytes per second this machine streams from memory: a sum over a 512 MiB float32 buffer
    (far larger than the caches), best of `repeats`."""
    buf = torch.ones(2 ** 27)
    return buf.numel() * 4 / timed(buf.sum, repeats)[0]


def gemm_flops(dtype, repeats=5):
    """FLOP/s this machine's matmul reaches in dtype: a 1024^3 matmul, best of `repeats`."""
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # warm-up
    return 2 * 1024 ** 3 / timed(lambda: a @ a, repeats)[0]


def decode_flops(m, rows, context):
    """FLOPs of one decode step of `rows` rows over `context` cache slots: every linear weight
    (lm_head included) once per row, plus q.k and p.v over the slots."""
    c = m.config
    lin = (sum(p.numel() for k, p in m.named_parameters() if k.endswith("proj.weight"))
           + m.lm_head.weight.numel())
    return 2 * rows * lin + 4 * rows * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context


def weight_matmuls_case(m, rows, repeats, steps=16):
    """Seconds (min, median) of a decode step's weight matmuls alone: every block's fused q/k/v, o,
    gate/up and down and the lm_head for `rows` rows, on the weights the sampler packs
    (engine.pack_weight): the floor the matmul kernels put under a step, beside the byte and FLOP
    limits."""
    c, dev, dt = m.config, m.lm_head.weight.device, m.lm_head.weight.dtype
    e = Engine(m, rows, 1)
    x, xi = (torch.randn(rows, 1, d, dtype=dt, device=dev) for d in (c.hidden_size, c.intermediate_size))

    def run():
        for _ in range(steps):
            for layer in e.layers:
                packed_linear(x, layer.wqkv), packed_linear(x, layer.wo), packed_linear(x, layer.w13)
                packed_linear(xi, layer.w2)
            e.head_logits(x[:, 0])
    with torch.no_grad():
        run()  # warm-up
        tmin, tmed = timed(run, repeats)
    return tmin / steps, tmed / steps


def decode_step_case(m, prompt, n, repeats, steps=16, graphs=False, share=True):
    """Seconds (min, median over `repeats` runs of `steps` steps) of one sampling decode step with
    n rows after `prompt`: the model forward, lm_head, top-p 0.95 pick and the token's log-prob."""
    dev = m.lm_head.weight.device
    e = Engine(m, n, len(prompt) + steps * (repeats + 1) + 1)
    logits = prefill(e, [prompt], torch.zeros(1, dtype=torch.long, device=dev), 0).repeat(n, 1)
    e.copy_cache_rows(torch.zeros(n - 1, dtype=torch.long, device=dev), torch.arange(1, n, device=dev),
                      len(prompt))
    e.share_prefix(len(prompt) if share else 0)  # as the sampler does: the prompt read once per step
    st = {"tok": pick_next(logits, 1.0, 0.95, torch.rand(n, device=dev)),
          "pos": torch.full((n,), len(prompt), device=dev)}
    graphed = GraphedDecode(e) if graphs else None

    def run():
        for _ in range(steps):
            logits = graphed(e, st["tok"], st["pos"]) if graphs else decode_one(e, st["tok"], st["pos"])
            st["tok"] = pick_next(logits, 1.0, 0.95, torch.rand(n, device=dev))
            torch.log_softmax(logits, -1).gather(1, st["tok"][:, None]).tolist()
            st["pos"] = st["pos"] + 1
    with torch.no_grad():
        run()  # warm-up
        tmin, tmed = timed(run, repeats)
    return tmin / steps, tmed / steps


# ----------------------------------------------------------------------------------------------
# CUDA: random weights of a real model's shape (nothing is downloaded there)

SHAPES = {
    "smollm2-135m": LlamaConfig(rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama3.1-8b": LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                               vocab_size=128256, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192},
                               max_position_embeddings=131072),
    "tiny": LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, vocab_size=512),  # a CPU check of this code
}


def random_models(cfg, device, dtype, hf=True):
    """(HF LlamaForCausalLM, ours) with the same random weights: ours holds HF's tensors (no copy)."""
    import transformers
    with torch.device(device):
        torch.set_default_dtype(dtype)  # initialise in the target dtype (an 8B float32 copy is 32 GB)
        try:
            h = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        ours = Llama(cfg)
    sd = h.state_dict()
    ours.load_state_dict({k: sd[k] for k in ours.state_dict()}, assign=True)
    ours.inv_freq = rope_inv_freq(cfg).to(device)
    return (h if hf else None), ours.eval()


def _sync(dev):
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU run needs nothing)."""
    if dev == "cuda":
        torch.cuda.synchronize()


def _cuda_timed(fn, repeats):
    _sync("cuda")
    return timed(lambda: (fn(), _sync("cuda")), repeats)


def device_bandwidth(device):
    """Bytes per second the device streams: a copy of 1 GiB, bytes read plus written, best of 5."""
    if device == "cpu":
        return bandwidth()
    x = torch.empty(2 ** 28, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _cuda_timed(lambda: y.copy_(x), 5)[0]


def bench_sample_cuda(a):
    """Our sampler in bf16 on the GPU against HF generate on the same weights; float32 logits and
    greedy tokens against HF (TF32 off); decode step against weight bytes / measured bandwidth."""
    dev = a.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    new, n = a.new_tokens, 8
    rows, steps = [], []
    for shape in a.shapes.split(","):
        cfg = SHAPES[shape]
        cfg.eos_token_id = None  # no stop token: every sample runs max_new_tokens, as HF's min_new_tokens
        g = torch.Generator().manual_seed(0)
        chat = torch.randint(10, cfg.vocab_size, (32,), generator=g).tolist()
        judge = torch.randint(10, cfg.vocab_size, (600,), generator=g).tolist()
        if shape != "llama3.1-8b":  # exactness in float32 (the 8B float32 copy would be 32 GB)
            hf, m = random_models(cfg, dev, torch.float32)
            idx = torch.tensor([judge[:200], chat + judge[:168]], device=dev)
            with torch.no_grad():
                d = (m(idx) - hf(input_ids=idx).logits.float()).abs().max().item()
                ours = generate(m, [chat], max_new_tokens=64, temperature=0.0, progress=False)[0][0].tokens
                theirs = hf.generate(torch.tensor([chat], device=dev), max_new_tokens=64, do_sample=False,
                                     pad_token_id=0)[0, len(chat):].tolist()
            same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), len(ours))
            print(json.dumps({"shape": shape, "fp32_max_abs_logit_diff_vs_hf": d,
                              "greedy_same_leading_tokens": same, "of": len(ours)}))
            del hf, m
        hf, m = random_models(cfg, dev, torch.bfloat16)
        cases = [(f"{c}{', CUDA graphs' if gr else ', eager'}", p, k, temp, gr) for c, p, k, temp in
                 (("chat, greedy, n=1", chat, 1, 0.0), ("judge, n=8, top-p 0.95", judge, n, 1.0))
                 for gr in (False, True)]
        for name, prompt, k, temp, gr in cases:
            # pyflakes flags m and hf (F821) for the later `del hf, m`, but these closures only run before it.
            def ours_run():
                sample.CUDA_GRAPHS = gr
                generate(m, [prompt], n=k, max_new_tokens=new, temperature=temp, top_p=0.95, progress=False)  # noqa: F821
                _sync(dev)

            def hf_run():
                with torch.no_grad():
                    hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=new, min_new_tokens=new,  # noqa: F821
                                do_sample=temp > 0, num_return_sequences=k, top_p=0.95 if temp else None,
                                temperature=1.0 if temp else None, top_k=None, pad_token_id=0)
                _sync(dev)
            ours_run(), hf_run()  # warm-up
            o, h = timed(ours_run, a.repeats), timed(hf_run, a.repeats)
            rows.append({"shape": shape, "case": name, "ours_tok_s": k * new / o[0],
                         "ours_tok_s_median": k * new / o[1], "hf_tok_s": k * new / h[0],
                         "hf_tok_s_median": k * new / h[1], "ratio_vs_hf": h[0] / o[0]})
            print(json.dumps(rows[-1]))
        bw = device_bandwidth(dev)
        wbytes = sum(p.numel() * p.element_size() for p in m.parameters())
        for gr in (False, True) if dev == "cuda" else (False,):
            t = decode_step_case(m, judge, n, a.repeats, graphs=gr)
            steps.append({"shape": shape + (", CUDA graph" if gr else ", eager"), "step_ms": t[0] * 1e3,
                          "step_ms_median": t[1] * 1e3, "weight_gb": wbytes / 1e9, "bandwidth_gb_s": bw / 1e9,
                          "limit_ms": wbytes / bw * 1e3, "ratio_to_limit": t[0] * bw / wbytes})
            print(json.dumps(steps[-1]))
        del hf, m
    print(f"\nbf16 on {torch.cuda.get_device_name() if dev == 'cuda' else dev}, random weights, "
          f"{new} new tokens\n")
    print("| shape | case | ours tok/s (best / median) | HF generate tok/s (best / median) | ours / HF |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['case']} | {r['ours_tok_s']:.0f} / {r['ours_tok_s_median']:.0f} | "
              f"{r['hf_tok_s']:.0f} / {r['hf_tok_s_median']:.0f} | {r['ratio_vs_hf']:.2f}x |")
    print("\n| shape | decode step, 8 rows, ms (best / median) | weights GB | bandwidth GB/s | limit ms | "
          "step / limit |")
    print("|---|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['shape']} | {r['step_ms']:.2f} / {r['step_ms_median']:.2f} | {r['weight_gb']:.2f} | "
              f"{r['bandwidth_gb_s']:.0f} | {r['limit_ms']:.2f} | {r['ratio_to_limit']:.2f}x |")


def train_flops(cfg, batch):
    """Model FLOPs of one forward + backward over packed pairs (6 per weight per token; the lm_head
    on completion tokens only, as the fused loss computes it; attention 12 * heads * head_dim per
    (query, key) pair the mask allows). Recomputation (checkpointing) is not counted: MFU."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkvo = H * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    tokens = sum(len(e.prompt) + len(e.completion) + len(e.rejected) for e in batch)
    heads = sum(len(e.completion) + len(e.rejected) for e in batch)
    pairs = sum(P * (P + 1) // 2 + sum(P * C + C * (C + 1) // 2 for C in (len(e.completion), len(e.rejected)))
                for e in batch for P in [len(e.prompt)])
    return 6 * L * (qkvo + 3 * H * I) * tokens + 6 * cfg.vocab_size * H * heads \
        + 12 * L * cfg.num_attention_heads * cfg.head_dim * pairs


def bench_train_cuda(a):
    """One DPO optimizer step (packed pairs, fused DPO loss) on a Llama-3.1-8B shape with random
    weights: bf16 weights and gradients with SGD (an 8B AdamW's float32 state does not fit one
    80 GB GPU: FSDP2 over several shards it), and our default recipe (float32 master weights,
    bf16 autocast, AdamW) on fewer layers; each with and without activation checkpointing."""
    dev = a.device
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    # pyflakes flags x (F821) for the `del x` below, but the lambda only runs before it.
    peak = 2 * 8192 ** 3 / _cuda_timed(lambda: x @ x, 10)[0] if dev == "cuda" else float("nan")  # noqa: F821
    del x
    g = torch.Generator().manual_seed(0)
    rows = []
    for recipe, layers in (("bf16 weights, SGD", a.layers),
                           ("fp32 master, bf16 autocast, AdamW", a.layers_adamw)):
        cfg = LlamaConfig(**{**SHAPES[a.shape].__dict__, "num_hidden_layers": layers})
        V = cfg.vocab_size
        batch = [Example(torch.randint(10, V, (a.prompt_tokens,), generator=g).tolist(),
                         torch.randint(10, V, (a.completion_tokens,), generator=g).tolist(),
                         torch.randint(10, V, (a.completion_tokens,), generator=g).tolist())
                 for _ in range(a.pairs)]
        adamw = "AdamW" in recipe
        _, m = random_models(cfg, dev, torch.float32 if adamw else torch.bfloat16, hf=False)
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=adamw):
            for e, c, r in zip(batch, *pair_logps(m, batch, 0)):
                e.ref = {"sum": (float(c), float(r))}
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-7, fused=dev == "cuda") if adamw else \
            torch.optim.SGD(m.parameters(), lr=1e-7, foreach=True)
        step_dpo = make_step_dpo(0.1, 0.0, "sigmoid")
        flops = train_flops(cfg, batch)
        for ck in (False, True):
            m.checkpointing = ck

            # pyflakes flags m and opt (F821) for the later `del m, opt`, but step only runs before it.
            def step():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=adamw):
                    loss = step_dpo(m, batch, 0)[0]  # noqa: F821
                (loss / len(batch)).backward()
                opt.step()  # noqa: F821
                opt.zero_grad(set_to_none=True)  # noqa: F821
                _sync(dev)
            try:
                step()  # warm-up
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = timed(step, a.repeats)
                mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else float("nan")
                rows.append({"recipe": recipe, "layers": layers, "checkpointing": ck, "s": t[0],
                             "s_median": t[1], "tflops": flops / t[0] / 1e12,
                             "mfu_measured": flops / t[0] / peak, "mfu_989": flops / t[0] / 989e12,
                             "peak_gib": mem})
            except torch.OutOfMemoryError:
                rows.append({"recipe": recipe, "layers": layers, "checkpointing": ck, "oom": True})
                opt.zero_grad(set_to_none=True)
            print(json.dumps(rows[-1]))
        del m, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"\nDPO step on a {a.shape} shape, random weights, {a.pairs} pairs of "
          f"{a.prompt_tokens}-token prompts and {a.completion_tokens} + {a.completion_tokens} completion "
          f"tokens, packed; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s (8192^3)\n")
    print("| recipe | layers | activation checkpointing | step s (best / median) | model TFLOP/s "
          "| MFU (measured peak) | MFU (989 TFLOP/s) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['recipe']} | {r['layers']} | {r['checkpointing']} | out of memory | | | | |")
            continue
        print(f"| {r['recipe']} | {r['layers']} | {r['checkpointing']} | "
              f"{r['s']:.3f} / {r['s_median']:.3f} | {r['tflops']:.0f} | {r['mfu_measured']:.1%} | "
              f"{r['mfu_989']:.1%} | {r['peak_gib']:.1f} |")
