"""The small world's sampler benchmark (`python bench.py world`): a 0.45M-parameter judge, where a
decode step is per-op overhead, not bytes; rows x steps per second and aten ops per decode step."""
import json

import torch

from bench_gpu import timed
from data import Pair, load_tokenizer
from genrm import judge_messages
from model import Llama
from sample import generate


def count_aten_ops(fn) -> int:
    """aten operator calls made by fn() (torch.profiler, CPU events of the aten namespace)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def bench_world(a):
    """The small world's sampler on its judge's own prompts, at the two shapes its jobs use: STaR
    sampling (64 prompts x 8 rationales, train.WORLD_DEFAULTS) and judging with maj@16 (64 prompts x
    16, compare_world's eval batch). Every row decodes exactly --new-tokens tokens (no stop ids), so
    rows x steps per second is the sampler's throughput and ops per decode step the difference in
    aten calls between --new-tokens and half as many, per step."""
    import train
    import world
    torch.set_num_threads(a.threads)
    base = train.world_base(train.parse_args(["--no-progress"]))
    m, tok = Llama.from_pretrained(base).eval(), load_tokenizer(base)
    pairs = [Pair(id=r["id"], prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
             for r in world.make_pairs(64, 0, "id")]
    prompts = [tok.apply_chat(judge_messages(p, True)) for p in pairs]
    new = a.new_tokens
    print(f"small-world judge {base}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters, "
          f"judge prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new} new tokens")
    rows = []
    for name, n in (("STaR sampling, 64 prompts x 8", 8), ("judging maj@16, 64 prompts x 16", 16)):
        def run(steps, n=n):
            return generate(m, prompts, n=n, max_new_tokens=steps, temperature=1.0, top_p=0.95, seed=0,
                            prompt_batch=64, progress=False)
        t = timed(lambda: run(new), a.repeats)
        ops_full, ops_half = count_aten_ops(lambda: run(new)), count_aten_ops(lambda: run(new // 2))
        per_step = (ops_full - ops_half) / (new - new // 2)
        work = len(prompts) * n * new
        rows.append({"case": name, "rows": len(prompts) * n, "rows_steps_s": work / t[0],
                     "rows_steps_s_median": work / t[1], "ms_per_step": t[0] / new * 1e3,
                     "aten_ops_per_step": per_step})
        print(json.dumps(rows[-1]))
    print("\n| case | rows | rows x steps / s (best / median) | ms per decode step | aten ops per step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rows']} | {r['rows_steps_s']:.0f} / {r['rows_steps_s_median']:.0f} | "
              f"{r['ms_per_step']:.1f} | {r['aten_ops_per_step']:.0f} |")
