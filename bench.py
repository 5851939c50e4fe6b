"""Speed and memory against the naive way (and HF transformers when installed). Not a test.

  python bench.py sample            # KV-cache sampler vs a no-cache loop vs HF generate; decode
                                    # step vs weight bytes / measured bandwidth and vs its FLOPs /
                                    # measured matmul FLOP/s (fp32, bf16)
  python bench.py logprobs          # fused log-probs vs naive log_softmax, fwd+bwd, peak memory
  python bench.py train             # one DPO optimizer step (packed pairs) vs HF transformers
  python bench.py world             # the small world's judge: sampler rows x steps per second and
                                    # aten ops per decode step (STaR sampling and judging shapes)

On a CUDA GPU (random weights of the model's shape; HF transformers shares the same tensors):
  python bench.py logprobs --cuda   # bf16 at H=4096, V=128256, N=16384, against naive and Liger
  python bench.py sample --cuda     # bf16 sampler vs HF generate, SmolLM2-135M and Llama-3.1-8B shapes
  python bench.py train --cuda      # DPO step on a Llama-3.1-8B shape: model FLOPs utilisation,
                                    # with and without activation checkpointing

Each case runs --repeats times; min and median are printed (this CPU is throttled in bursts:
compare ratios measured in one run). Memory is measured in a fresh subprocess per case.
"""
import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_gpu import (
    bandwidth,
    bench_sample_cuda,
    bench_train_cuda,
    decode_flops,
    decode_step_case,
    gemm_flops,
    timed,
    weight_matmuls_case,
)
from bench_world import bench_world
from cli import HelpFormatter
from data import Example, load_pairs, load_tokenizer, prompt_completion_batch
from files import DEFAULT_MODEL, resolve_model
from genrm import judge_messages
from kernels import fused_logprob_sum, fused_logprobs, pair_logps
from losses import dpo_loss, fused_dpo_loss, make_step_dpo
from machine import machine_info
from model import Llama
from sample import generate

# ----------------------------------------------------------------------------------------------
# sampling

def bench_sample(a):
    torch.set_num_threads(a.threads)
    m = Llama.from_pretrained(DEFAULT_MODEL).eval()
    tok = load_tokenizer(DEFAULT_MODEL)
    chat = tok.apply_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    # the bundled judge prompt closest to 600 tokens
    judge = min((tok.apply_chat(judge_messages(p, True))
                 for p in load_pairs("assets/data/train_small.jsonl")),
                key=lambda ids: abs(len(ids) - 600))
    new, n = a.new_tokens, 8
    print(f"chat prompt {len(chat)} tokens; judge prompt {len(judge)} tokens; {new} new tokens; "
          f"{a.threads} threads")

    def nocache(prompt):
        with torch.no_grad():
            ids = list(prompt)
            for _ in range(new):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))

    hf = None
    try:
        import transformers
        hf = transformers.LlamaForCausalLM.from_pretrained(str(resolve_model(DEFAULT_MODEL)),
                                                           torch_dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        print(f"(HF transformers not benchmarked: {type(e).__name__}: {str(e)[:120]})")

    def hf_gen(prompt, rows, sample):
        with torch.no_grad():  # all rows in one call, as HF batches samples
            hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                        num_return_sequences=rows, top_p=0.95 if sample else None,
                        temperature=1.0 if sample else None, top_k=None, pad_token_id=2)

    m16 = Llama.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16).eval()
    rows = []
    cases = [("(a) chat, greedy, n=1", chat, 1, 0.0, m), ("(b) judge, n=8, top-p 0.95", judge, n, 1.0, m),
             ("(c) judge, n=8, top-p 0.95, ours bf16", judge, n, 1.0, m16)]
    for name, prompt, rows_n, temp, model in cases:
        toks = rows_n * new
        ours = timed(lambda: generate(model, [prompt], n=rows_n, max_new_tokens=new, temperature=temp,
                                      top_p=0.95, progress=False), a.repeats)
        row = {"case": name, "ours_tok_s": toks / ours[0], "ours_tok_s_median": toks / ours[1]}
        if a.nocache and rows_n == 1:
            row["nocache_tok_s"] = toks / timed(lambda: nocache(prompt), 1)[0]
        if hf is not None and model is m:
            h = timed(lambda: hf_gen(prompt, rows_n, temp > 0), a.repeats)
            row.update(hf_tok_s=toks / h[0], hf_tok_s_median=toks / h[1], ratio_vs_hf=h[0] / ours[0])
        rows.append(row)
        print(json.dumps(row))
    steps = []
    bw = bandwidth()
    for dt, model in (("float32", m), ("bfloat16", m16)):
        t, w = decode_step_case(model, judge, n, a.repeats), weight_matmuls_case(model, n, a.repeats)
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head once
        # The mean context of decode_step_case's 16 * (repeats + 1) steps.
        ctx = len(judge) + 8 * (a.repeats + 1)
        flops, peak = decode_flops(model, n, ctx), gemm_flops(model.lm_head.weight.dtype)
        limit = max(wbytes / bw, flops / peak)  # the step can beat neither reading the weights nor its FLOPs
        steps.append({"dtype": dt, "step_ms": t[0] * 1e3, "step_ms_median": t[1] * 1e3,
                      "weight_mb": wbytes / 1e6, "bandwidth_gb_s": bw / 1e9, "limit_ms": wbytes / bw * 1e3,
                      "ratio_to_limit": t[0] * bw / wbytes, "gflop": flops / 1e9, "gemm_gflop_s": peak / 1e9,
                      "flop_limit_ms": flops / peak * 1e3, "ratio_to_both_limits": t[0] / limit,
                      "matmuls_ms": w[0] * 1e3, "matmuls_ms_median": w[1] * 1e3,
                      "matmuls_ratio_to_limit": w[0] * bw / wbytes})
        print(json.dumps(steps[-1]))
    print("\n| case | ours tok/s (best / median) | HF generate tok/s (best / median) | ours / HF | "
          "no-cache loop tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        hfc = f"{r['hf_tok_s']:.1f} / {r['hf_tok_s_median']:.1f}" if "hf_tok_s" in r else "-"
        rat = f"{r['ratio_vs_hf']:.2f}x" if "ratio_vs_hf" in r else "-"
        nc = f"{r['nocache_tok_s']:.1f}" if "nocache_tok_s" in r else "-"
        print(f"| {r['case']} | {r['ours_tok_s']:.1f} / {r['ours_tok_s_median']:.1f} | "
              f"{hfc} | {rat} | {nc} |")
    print(f"\ndecode step, {n} rows after the {len(judge)}-token judge prompt (forward, lm_head, "
          f"top-p pick); limit = weight bytes / bandwidth (sum over 512 MiB, best of 5); FLOP limit = "
          f"the step's FLOPs / a 1024^3 matmul's FLOP/s (best of 5); weight matmuls = the step's "
          f"matmuls alone on the sampler's packed weights (the floor its kernels put under the step)\n")
    print("| dtype | step ms (best / median) | weights MB | bandwidth GB/s | limit ms | step / limit | "
          "GFLOP | matmul GFLOP/s | FLOP limit ms | step / larger limit | weight matmuls ms | "
          "matmuls / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['dtype']} | {r['step_ms']:.1f} / {r['step_ms_median']:.1f} | {r['weight_mb']:.0f} | "
              f"{r['bandwidth_gb_s']:.1f} | {r['limit_ms']:.1f} | {r['ratio_to_limit']:.2f}x | "
              f"{r['gflop']:.2f} | {r['gemm_gflop_s']:.0f} | {r['flop_limit_ms']:.1f} | "
              f"{r['ratio_to_both_limits']:.2f}x | {r['matmuls_ms']:.1f} / {r['matmuls_ms_median']:.1f} | "
              f"{r['matmuls_ratio_to_limit']:.2f}x |")


# ----------------------------------------------------------------------------------------------
# fused log-probs

def logprobs_case(kind, N, H, V, dtype, device, repeats, chunk):
    """Runs in a fresh subprocess: time of fwd+bwd, and memory. CPU: peak RSS, and the working
    memory above what inputs and gradients themselves hold. CUDA: max_memory_allocated.
    DPO kinds: N rows = N / 128 pairs of 64 chosen + 64 rejected completion tokens, laid out
    [pair 0 chosen | pair 0 rejected | pair 1 chosen | ...], beta 0.1, sigmoid loss."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(N, H, device=device, dtype=dt).requires_grad_()
    w = (torch.randn(V, H, device=device, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    w.grad = torch.zeros_like(w)
    h.grad = torch.zeros_like(h)
    seq = torch.arange(N // 64, device=device).repeat_interleave(64)  # [N] 2i chosen, 2i + 1 rejected
    rc, rr = (torch.randn(N // 128, device=device) - 64 * math.log(V) for _ in range(2))  # reference sums
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB (ru_maxrss is KiB)
    liger = {}
    if kind.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        P = N // 128  # Liger's layout: all chosen [P, 64] then all rejected [P, 64]
        lh = h.detach().view(P, 2, 64, H).transpose(0, 1).reshape(2 * P, 64, H).requires_grad_()
        liger = {"ce": LigerFusedLinearCrossEntropyLoss(reduction="sum"), "h": lh,
                 "t": t.view(P, 2, 64).transpose(0, 1).reshape(2 * P, 64),
                 "dpo": LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)}

    def run():
        if kind == "fused":       # per-token output, recompute in backward (every objective)
            fused_logprobs(h, w, t, chunk=chunk).sum().backward()
        elif kind == "fused_sum":  # scalar weighted sum, gradients in forward (SFT, Eq. 7, Eq. 8)
            fused_logprob_sum(h, w, t, chunk=chunk).backward()
        elif kind == "dpo":        # DPO loss by chunks of whole pairs, gradients in forward
            fused_dpo_loss(h, w, t, seq, rc, rr, beta=0.1, chunk=chunk)[0].backward()
        elif kind == "liger_sum":  # Liger's fused linear cross-entropy, summed (= -fused_sum)
            liger["ce"](w, h, t).backward()
        elif kind == "liger_dpo":  # Liger's chunked DPO, policy half (reference log-probs given as 0)
            liger["dpo"](w, liger["h"], liger["t"])[0].backward()
        elif kind == "naive_dpo":  # full logits, log_softmax + gather, per-completion sums, dpo_loss
            lp = torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1)  # [N]
            pol = lp.view(-1, 64).sum(1)                                                    # [2P]
            dpo_loss(pol[0::2], pol[1::2], rc, rr, beta=0.1).mean().backward()
        else:
            torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
    run()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        work = peak - (h.numel() + w.numel()) * h.element_size() * 2 / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        work = peak - base
    tmin, tmed = timed(run, repeats)
    work_logits = work - w.numel() * 4 / 2 ** 30  # minus the one transient float32 dW both ways hold
    return {"work_logits_gib": work_logits, "kind": kind, "N": N, "H": H, "V": V, "dtype": dtype,
            "device": device, "peak_gib": peak, "work_gib": work, "t_min": tmin, "t_median": tmed}


def bench_logprobs(a):
    shapes = [(4096, 576, 49152), (4096, 2048, 128256)]
    kinds = [k for k in ("fused", "fused_sum", "naive", "dpo", "naive_dpo") if k in a.kinds.split(",")]
    cases = [(k, N, H, V, "float32", "cpu") for N, H, V in shapes for k in kinds]
    if a.cuda:  # the GPU cases instead, with Liger's kernels where the package is installed
        try:
            import liger_kernel  # noqa: F401
            kinds += ["liger_sum", "liger_dpo"]
        except ImportError:
            print("(Liger not benchmarked: liger_kernel is not installed)")
        cases = [(k, 16384, 4096, 128256, "bfloat16", "cuda") for k in kinds]
    rows = []
    for c in cases:
        code = (f"import json, bench, torch; torch.set_num_threads({a.threads}); "
                f"print(json.dumps(bench.logprobs_case(*{c!r}, {a.repeats}, {a.chunk})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{c}: failed: {r.stderr[-500:]}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row))
    print(f"\nforward + backward, chunk={a.chunk or 'auto'} rows, {a.threads} threads, {a.repeats} runs; "
          "peak = max RSS (CUDA: max allocated); working = peak minus inputs and preallocated grads; "
          "logit memory = working minus the one transient dW both ways allocate; dpo rows: pairs of 64 + 64 "
          "completion tokens, measured against naive_dpo (full logits, log_softmax + gather, sums, "
          "dpo_loss)\n")
    print("| shape (N, H, V) | dtype | way | time min / median s | naive / this time | peak GiB "
          "| naive / this peak | working GiB | logit memory GiB | naive / this logit memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by = {(r["N"], r["H"], r["V"], r["dtype"], r["kind"]): r for r in rows}
    for (N, H, V, dt, k), r in by.items():
        n = by.get((N, H, V, dt, "naive_dpo" if "dpo" in k else "naive"))  # DPO rows against naive DPO
        if n is None:
            continue
        print(f"| ({N}, {H}, {V}) | {dt} | {k} | {r['t_min']:.2f} / {r['t_median']:.2f} "
              f"| {n['t_min'] / r['t_min']:.2f}x | {r['peak_gib']:.2f} "
              f"| {n['peak_gib'] / r['peak_gib']:.1f}x | {r['work_gib']:.2f} | {r['work_logits_gib']:.2f} "
              f"| {n['work_logits_gib'] / max(r['work_logits_gib'], 1e-2):.1f}x |")


# ----------------------------------------------------------------------------------------------
# training: one DPO optimizer step

def judge_dpo_batch(tok, n_pairs=2, rationale_tokens=64):
    """Judge-shaped DPO pairs: bundled pairs in the Fig. 6 prompt (the ones with the median prompt
    length), a 64-token chosen and rejected rationale each (taken from the answers' text)."""
    pairs = load_pairs("assets/data/train_small.jsonl")
    ex = []
    for p in pairs:
        r = rationale_tokens - 1
        c, x = tok.encode(p.chosen * 4)[:r] + [tok.eot_id], tok.encode(p.rejected * 8)[:r] + [tok.eot_id]
        ex.append(Example(tok.apply_chat(judge_messages(p, True)), c, x))
    ex.sort(key=lambda e: len(e.prompt))
    mid = len(ex) // 2
    return ex[mid - n_pairs // 2: mid - n_pairs // 2 + n_pairs]


def bench_train(a):
    import transformers
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(DEFAULT_MODEL)
    batch = judge_dpo_batch(tok)
    ours = Llama.from_pretrained(DEFAULT_MODEL)
    with torch.no_grad():
        for e, c, r in zip(batch, *pair_logps(ours, batch, tok.pad_id)):
            e.ref = {"sum": (float(c), float(r))}
    hf = transformers.LlamaForCausalLM.from_pretrained(str(resolve_model(DEFAULT_MODEL)), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    hf.config.use_cache = False
    rc = torch.tensor([e.ref["sum"][0] for e in batch])
    rr = torch.tensor([e.ref["sum"][1] for e in batch])
    seqs = [(e.prompt, e.completion) for e in batch] + [(e.prompt, e.rejected) for e in batch]
    idx, valid, mask = prompt_completion_batch(seqs, tok.pad_id)
    step_dpo = make_step_dpo(0.1, 0.0, "sigmoid")
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-7) for m in (ours, hf)}

    def step(model, fn, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        (loss / len(batch)).backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)

    def ours_step():  # packed [prompt | chosen | rejected], fused log-probs
        return step_dpo(ours, batch, tok.pad_id)[0]

    def hf_step():  # the usual way: chosen and rejected as separate sequences, full logits
        logits = hf(input_ids=idx, attention_mask=valid.long()).logits[:, :-1].float()   # [2B, T-1, V]
        lp = (torch.log_softmax(logits, -1).gather(-1, idx[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
        return dpo_loss(lp[:len(batch)], lp[len(batch):], rc, rr, beta=0.1).sum()

    cases = {"ours float32": (ours, ours_step, False), "ours bf16 autocast": (ours, ours_step, True),
             "HF float32": (hf, hf_step, False), "HF bf16 autocast": (hf, hf_step, True)}
    P = [len(e.prompt) for e in batch]
    C = [len(e.completion) + len(e.rejected) for e in batch]
    print(f"DPO step, batch {len(batch)} pairs: judge prompts {P} tokens, rationales 64 + 64; "
          f"tokens through the model: packed {sum(P) + sum(C)}, separate {2 * sum(P) + sum(C)} "
          f"({(2 * sum(P) + sum(C)) / (sum(P) + sum(C)):.2f}x); {a.threads} threads")
    for c in cases.values():  # warm-up
        step(*c)
    ts = {k: [] for k in cases}
    for _ in range(a.repeats):  # interleaved, so throttling bursts hit every case alike
        for k, c in cases.items():
            t = time.perf_counter()
            step(*c)
            ts[k].append(time.perf_counter() - t)
    hf32 = ts["HF float32"]
    print("\n| one DPO optimizer step | s (min / median) | HF float32 / this (min / median) | "
          "HF same precision / this |")
    print("|---|---|---|---|")
    for k, t in ts.items():
        same = ts["HF bf16 autocast" if "bf16" in k else "HF float32"]
        print(f"| {k} | {min(t):.2f} / {statistics.median(t):.2f} | {min(hf32) / min(t):.2f}x / "
              f"{statistics.median(hf32) / statistics.median(t):.2f}x | {min(same) / min(t):.2f}x / "
              f"{statistics.median(same) / statistics.median(t):.2f}x |")
    print(json.dumps({k: t for k, t in ts.items()}))


# ----------------------------------------------------------------------------------------------
# the machine a run measured (printed first by every run: figures compare only within one kind)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("what", choices=("sample", "logprobs", "train", "world"))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (min and median printed)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--new-tokens", type=int, default=128, help="sample: tokens generated per row")
    ap.add_argument("--nocache", action="store_true", help="also time the no-cache loop (slow)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="fused kernel rows per chunk (0: ~512 MiB of float32 logits, 2 GiB on CUDA)")
    ap.add_argument("--cuda", action="store_true", help="the CUDA GPU cases (bf16) instead of the CPU ones")
    ap.add_argument("--kinds", default="fused,fused_sum,naive,dpo,naive_dpo",
                    help="logprobs: the ways to run")
    g = ap.add_argument_group("with --cuda (or --device cpu --shapes tiny / --shape tiny: "
                              "a check of this code)")
    g.add_argument("--device", default="cuda", help="where the --cuda cases run")
    g.add_argument("--shapes", default="smollm2-135m,llama3.1-8b", help="sample: model shapes")
    g.add_argument("--shape", default="llama3.1-8b", help="train: model shape")
    g.add_argument("--layers", type=int, default=32, help="train: layers of the bf16-weights SGD step")
    g.add_argument("--layers-adamw", type=int, default=8,
                   help="train: layers of the float32-master AdamW step")
    g.add_argument("--pairs", type=int, default=4, help="train: pairs per step")
    g.add_argument("--prompt-tokens", type=int, default=1024, help="train: prompt tokens per pair")
    g.add_argument("--completion-tokens", type=int, default=256, help="train: tokens of each completion")
    a = ap.parse_args()
    print(machine_info(a.threads))
    if a.cuda and a.what != "logprobs":
        {"sample": bench_sample_cuda, "train": bench_train_cuda}[a.what](a)
        return
    cases = {"sample": bench_sample, "logprobs": bench_logprobs, "train": bench_train, "world": bench_world}
    cases[a.what](a)


if __name__ == "__main__":
    main()
