"""Speed and memory against the naive way (and HF transformers when installed). Not a test.

  python bench.py sample            # KV-cache sampler vs a no-cache loop vs HF generate
  python bench.py logprobs          # fused log-probs vs naive log_softmax, fwd+bwd, peak memory
  python bench.py logprobs --cuda   # also bf16 on a CUDA GPU (H=4096, V=128256, N=16384)

Each case runs --repeats times; min and median are printed (this CPU is throttled in bursts:
compare ratios measured in one run). Memory is measured in a fresh subprocess per case.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


# ----------------------------------------------------------------------------------------------
# sampling

def bench_sample(a):
    from data import load_pairs, load_tokenizer
    from genrm import judge_messages
    from gguf import DEFAULT_MODEL, resolve_model
    from model import Llama
    from sample import generate
    torch.set_num_threads(a.threads)
    m = Llama.from_pretrained(DEFAULT_MODEL).eval()
    tok = load_tokenizer(DEFAULT_MODEL)
    chat = tok.apply_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    # a ~600-token judge prompt from the bundled data
    pairs = sorted(load_pairs("assets/data/train_small.jsonl"), key=lambda p: len(p.prompt + p.chosen + p.rejected))
    judge = tok.apply_chat(judge_messages(pairs[-1], True))
    new = a.new_tokens
    print(f"chat prompt {len(chat)} tokens; judge prompt {len(judge)} tokens; {new} new tokens; "
          f"{a.threads} threads, float32")

    def nocache(prompt, n):
        with torch.no_grad():
            for _ in range(n):
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

    def hf_gen(prompt, n, sample):
        with torch.no_grad():
            for _ in range(n):  # HF's generate prefills the same prompt once per sample here
                hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                            top_p=0.95 if sample else None, temperature=1.0 if sample else None,
                            top_k=None, pad_token_id=2)

    rows = []
    cases = [("(a) chat, greedy, n=1", chat, 1, 0.0), ("(b) judge, n=8, top-p 0.95", judge, 8, 1.0)]
    for name, prompt, n, temp in cases:
        toks = n * new
        ours = timed(lambda: generate(m, [prompt], n=n, max_new_tokens=new, temperature=temp, top_p=0.95,
                                      progress=False), a.repeats)
        row = {"case": name, "ours_tok_s": toks / ours[0], "ours_tok_s_median": toks / ours[1]}
        if a.nocache and n == 1:
            nc = timed(lambda: nocache(prompt, n), 1)
            row["nocache_tok_s"] = toks / nc[0]
        if hf is not None:
            h = timed(lambda: hf_gen(prompt, n, temp > 0), a.repeats)
            row.update(hf_tok_s=toks / h[0], hf_tok_s_median=toks / h[1], ratio_vs_hf=h[0] / ours[0])
        rows.append(row)
        print(json.dumps(row))
    print("\n| case | ours tok/s (best / median) | HF generate tok/s (best / median) | ours / HF | no-cache loop tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        hfc = f"{r['hf_tok_s']:.1f} / {r['hf_tok_s_median']:.1f}" if "hf_tok_s" in r else "-"
        rat = f"{r['ratio_vs_hf']:.2f}x" if "ratio_vs_hf" in r else "-"
        nc = f"{r['nocache_tok_s']:.1f}" if "nocache_tok_s" in r else "-"
        print(f"| {r['case']} | {r['ours_tok_s']:.1f} / {r['ours_tok_s_median']:.1f} | {hfc} | {rat} | {nc} |")


# ----------------------------------------------------------------------------------------------
# fused log-probs

def logprobs_case(kind, N, H, V, dtype, device, repeats, chunk):
    """Runs in a fresh subprocess: time of fwd+bwd, and memory. CPU: peak RSS, and the working
    memory above what inputs and gradients themselves hold. CUDA: max_memory_allocated."""
    from kernels import fused_logprob_sum, fused_logprobs
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(N, H, device=device, dtype=dt).requires_grad_()
    w = (torch.randn(V, H, device=device, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    w.grad = torch.zeros_like(w)
    h.grad = torch.zeros_like(h)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB (ru_maxrss is KiB)

    def run():
        if kind == "fused":       # per-token output, recompute in backward (every objective)
            fused_logprobs(h, w, t, chunk=chunk).sum().backward()
        elif kind == "fused_sum":  # scalar weighted sum, gradients in forward (SFT, Eq. 7, Eq. 8)
            fused_logprob_sum(h, w, t, chunk=chunk).backward()
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
    return {"work_logits_gib": work_logits, "kind": kind, "N": N, "H": H, "V": V, "dtype": dtype, "device": device, "peak_gib": peak,
            "work_gib": work, "t_min": tmin, "t_median": tmed}


def bench_logprobs(a):
    shapes = [(4096, 576, 49152), (4096, 2048, 128256)]
    kinds = ("fused", "fused_sum", "naive")
    cases = [(k, N, H, V, "float32", "cpu") for N, H, V in shapes for k in kinds]
    if a.cuda:
        cases += [(k, 16384, 4096, 128256, "bfloat16", "cuda") for k in kinds]
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
          "logit memory = working minus the one transient dW both ways allocate\n")
    print("| shape (N, H, V) | dtype | way | time min / median s | naive / this time | peak GiB | naive / this peak "
          "| working GiB | logit memory GiB | naive / this logit memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by = {(r["N"], r["H"], r["V"], r["dtype"], r["kind"]): r for r in rows}
    for (N, H, V, dt, k), r in by.items():
        n = by.get((N, H, V, dt, "naive"))
        if n is None:
            continue
        print(f"| ({N}, {H}, {V}) | {dt} | {k} | {r['t_min']:.2f} / {r['t_median']:.2f} | {n['t_min'] / r['t_min']:.2f}x "
              f"| {r['peak_gib']:.2f} | {n['peak_gib'] / r['peak_gib']:.1f}x | {r['work_gib']:.2f} "
              f"| {r['work_logits_gib']:.2f} | {n['work_logits_gib'] / max(r['work_logits_gib'], 1e-2):.1f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sample", "logprobs"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--nocache", action="store_true", help="also time the no-cache loop (slow)")
    ap.add_argument("--chunk", type=int, default=0, help="fused kernel rows per chunk (0: the default, 2**27 // V)")
    ap.add_argument("--cuda", action="store_true", help="add the bf16 CUDA case")
    a = ap.parse_args()
    bench_sample(a) if a.what == "sample" else bench_logprobs(a)


if __name__ == "__main__":
    main()
