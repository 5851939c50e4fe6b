"""Sampling: ragged prompts, n samples per prompt, greedy / temperature / top-p, stop tokens, and
the log-prob of every sampled token.

The judge's rationales (paper Sec. 4, CoT-GenRM), STaR's samples (Sec. 2.2) and majority voting
all come from `generate`. `reference_generate` is the plain loop (Meta's llama-models `generate`
without its cache: a full forward per step) with the same sampling rule and seeds; `generate` is
the fast one, tested against it: one prefill per prompt into a KV cache (engine.py), a prompt
prefix every row shares prefilled once and attended once per step, continuous batching, and on
CUDA decode steps replayed from a captured graph.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from engine import DecodeLayout, Engine
from model import Llama

_TOP_K = (256, 4096)     # nucleus candidates tried with topk before a full sort of the vocabulary
_MIN_SHARED_PREFIX = 16  # prompts of a call sharing at least this many leading tokens prefill them once
CUDA_GRAPHS = True       # on CUDA, decode steps replay a captured graph (GraphedDecode)


@dataclass
class Completion:
    tokens: list          # sampled ids, the stop token included when one ended the sequence
    logprobs: list        # log softmax(logits at temperature 1)[token] for each sampled token
    finish: str           # "stop" or "length"
    suffix_logits: list = None  # generate(suffix=...): float32 logits of suffix_logit_ids after it


def top_p_filter(probs, p):
    """Nucleus filter (Meta's sample_top_p semantics): sort descending, keep the smallest prefix
    whose mass reaches p, always including the token that crosses p; renormalise. A token is
    dropped when the mass strictly before it exceeds p, so at an exact tie the next one stays.
    probs [R, V] -> (sorted kept probs [R, V] summing to 1, their token ids [R, V])."""
    ps, order = probs.sort(dim=-1, descending=True)
    return _nucleus(ps, p), order


def _nucleus(ps, p):
    """Probabilities sorted descending ps [R, K] -> the nucleus kept (Meta's strict '>'),
    renormalised: a token is dropped when the mass strictly before it exceeds p."""
    ps = ps.masked_fill(ps.cumsum(-1) - ps > p, 0.0)
    return ps / ps.sum(-1, keepdim=True)


def _uniforms(seed, j, steps):
    """The uniforms [steps] of sample j of a prompt with seed `seed`, one per step, from its own
    generator (keyed by both)."""
    return torch.rand(steps, generator=torch.Generator().manual_seed((int(seed) * 1_000_003 + j) % (2 ** 63)))


def _sample_sorted(ps, order, p, u):
    """Inverse-CDF sample from probabilities sorted descending ps [R, K] (ids order [R, K]) with
    uniforms u [R]: top_p_filter's nucleus when p < 1 (the whole sorted list when p >= 1)."""
    if p < 1.0:
        ps = _nucleus(ps, p)
    cdf = ps.cumsum(-1)
    k = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)  # [R, 1]
    return order.gather(1, k).squeeze(1)


def pick_next(logits, temperature, top_p, u):
    """Next token ids [R] from float32 logits [R, V] and one uniform per row u [R]: argmax at
    temperature 0, else a sample from softmax(logits / temperature) restricted to the nucleus.

    Exact nucleus without sorting the vocabulary: take the top K+1 tokens; where the mass strictly
    before token K+1 already exceeds p, that token and every smaller one are dropped by the rule,
    so the top K hold the whole nucleus in the order a full sort gives. Rows where they do not try
    the next K of _TOP_K, then sort the whole vocabulary (every row when p >= 1). Same tokens as
    the full sort, except for ties between equal probabilities (whose order neither sort defines)
    and a uniform within float rounding of a CDF step (the nucleus mass is summed over K entries)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature if temperature != 1 else logits, -1)  # [R, V]
    token_ids = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    todo = torch.arange(len(probs), device=probs.device)                    # rows still to sample
    for K in _TOP_K if top_p < 1.0 else ():
        if K + 1 >= probs.shape[-1] or not len(todo):
            break
        ps, order = (probs if len(todo) == len(probs) else probs[todo]).topk(K + 1, dim=-1)  # [R', K+1]
        before = ps.cumsum(-1)[:, K] - ps[:, K]                             # the mass before token K+1
        ok = before.gt(top_p) & ps[:, :K].sum(-1).gt(top_p)                 # the nucleus lies in the top K
        token_ids[todo[ok]] = _sample_sorted(ps[ok, :K], order[ok, :K], top_p, u[todo[ok]])
        todo = todo[~ok]
    if len(todo):
        token_ids[todo] = _sample_sorted(*probs[todo].sort(-1, descending=True), top_p, u[todo])
    return token_ids


def _check_args(model, prompts, seed, max_new_tokens, suffix):
    """generate's arguments checked; returns one seed per prompt."""
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens + len(suffix) > limit:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} + {len(suffix)} "
                             f"suffix tokens exceeds the model's {limit} positions")
    return seeds


# ----------------------------------------------------------------------------------------------
# the reference loop: a full forward per step, no cache

@torch.no_grad()
def reference_generate(model: Llama, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(),
                       seed=0, suffix=(), suffix_logit_ids=()):
    """generate's results the plain way: each (prompt, sample) alone, every step a full no-cache
    forward of prompt + the tokens sampled so far, the same uniforms and rule (pick_next). Slow
    (quadratic in the length); what the fast paths of generate are tested against."""
    seeds = _check_args(model, prompts, seed, max_new_tokens, suffix)
    dev, stop = model.lm_head.weight.device, set(stop_ids)
    out = []
    for p, s in zip(prompts, seeds):
        samples = []
        for j in range(n):
            u = _uniforms(s, j, max_new_tokens).to(dev)                      # [max_new] one per step
            toks, lps = [], []
            for step in range(max_new_tokens):
                # The whole sequence so far through the model; the last position's logits pick the next token.
                logits = model(torch.tensor([p + toks], device=dev))[:, -1]  # [1, V] float32
                t = int(pick_next(logits, temperature, top_p, u[step:step + 1]))
                toks.append(t)
                lps.append(float(torch.log_softmax(logits[0], -1)[t]))      # at temperature 1
                if t in stop:
                    break
            finish = "stop" if toks[-1] in stop else "length"
            suffix_logits = None
            if suffix:  # the suffix after the sample, its stop token left out
                fed = toks[:-1] if finish == "stop" else toks
                after = model(torch.tensor([p + fed + list(suffix)], device=dev))[0, -1]  # [V]
                suffix_logits = after[list(suffix_logit_ids)].tolist()
            samples.append(Completion(toks, lps, finish, suffix_logits))
        out.append(samples)
    return out


def _shared_prefix(prompts, n):
    """Length of the leading tokens all prompts share (a lone prompt's samples share all of it),
    leaving each prompt one token of its own; 0 for a single row."""
    if len(prompts) * n < 2:
        return 0
    L = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        L = next((t for t in range(L) if p[t] != prompts[0][t]), L)
    return L if L >= _MIN_SHARED_PREFIX else 0


def prefill(engine: Engine, prompts, rows, start):
    """Prefill tokens [start:] of each prompt into cache rows `rows` [R] (slots [0, start) of the
    rows already hold a shared prefix). Right padding writes junk into slots past a prompt, below
    the sampled tokens' slots: masked.
    Returns: float32 logits [R, V] after each prompt's last token."""
    dev = rows.device
    lens = torch.tensor([len(p) - start for p in prompts], device=dev)
    T = int(lens.max())
    idx = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        idx[r, :len(p) - start] = torch.tensor(p[start:], device=dev)
    pos = start + torch.arange(T, device=dev)[None].expand(len(prompts), T)
    h = engine.hidden(idx, pos=pos, rows=rows)                              # [R, T, H]
    return engine.head_logits(h[torch.arange(len(prompts), device=dev), lens - 1])  # [R, V]


def decode_one(engine: Engine, token_ids, pos, static=False, layout=None):
    """One decode step of every cache row: token ids [B] at positions [B] -> float32 logits [B, V]
    (layout: a DecodeLayout, else each token's cache slot is its position; static: Engine.hidden)."""
    h = engine.hidden(token_ids[:, None], pos=pos[:, None], static=static, layout=layout)  # [B, 1, H]
    return engine.head_logits(h[:, 0])


class GraphedDecode:
    """decode_one (static shapes) captured as a CUDA graph and replayed, gpt-fast's
    reduce-overhead idea by hand: a small model's step is hundreds of kernel launches, each costing
    more host time than its GPU work. The first call runs the step for real (on a side stream, as
    capture needs a warm-up) and captures it; later calls replay it. Valid while the cache tensors
    stay the same ones: select_cache_rows makes new ones, and `fits` says to capture again."""

    def __init__(self, engine: Engine):
        self.cache = engine.layers[0].cache.k
        self.graph = None
        self.layout = None

    def fits(self, engine: Engine):
        return self.cache is engine.layers[0].cache.k

    def __call__(self, engine, token_ids, pos, layout=None):
        if self.graph is None:
            self.token_ids, self.pos = token_ids.clone(), pos.clone()
            if layout is not None:  # the static step reads each row's prompt from its own row
                self.layout = DecodeLayout(layout.prompt_len.clone(), layout.gen_start)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the real step: writes this step's keys and values
                out = decode_one(engine, self.token_ids, self.pos, static=True, layout=self.layout)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run
                self.logits = decode_one(engine, self.token_ids, self.pos, static=True, layout=self.layout)
            return out
        assert (layout is None) == (self.layout is None), "a graph replays the layout (or none) it captured"
        assert layout is None or layout.gen_start == self.layout.gen_start, "gen_start is captured"
        self.token_ids.copy_(token_ids)
        self.pos.copy_(pos)
        if layout is not None:
            self.layout.prompt_len.copy_(layout.prompt_len)
        self.graph.replay()
        return self.logits.clone()


def _layout(prompts, held, gen_start, shared, dev, grouped=True):
    """The DecodeLayout of rows holding prompts `held` (indices): sampled tokens from slot
    gen_start on, and with `grouped` the rows of each prompt grouped when some prompt has more than
    one and the prompts hold more than one slot past the `shared` prefix all rows read once."""
    lens = torch.tensor([len(prompts[i]) for i in held], device=dev)
    rows_of = {}                  # prompt -> its rows
    for b, i in enumerate(held):
        rows_of.setdefault(i, []).append(b)
    m = max(len(g) for g in rows_of.values())
    if not grouped or m < 2 or gen_start - shared <= 1:
        return DecodeLayout(lens, gen_start)
    groups = list(rows_of.values())
    at = sorted((b, k, j) for k, g in enumerate(groups) for j, b in enumerate(g))  # (row, group, index in it)
    members = [g + g[:1] * (m - len(g)) for g in groups]  # padded with the group's first row
    return DecodeLayout(lens, gen_start, members=torch.tensor(members, device=dev),
                        group=torch.tensor([k for _, k, _ in at], device=dev),
                        member=torch.tensor([j for _, _, j in at], device=dev))


@torch.no_grad()
def generate(model: Llama, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(),
             seed=0, prompt_batch=8, progress=True, suffix=(), suffix_logit_ids=()):
    """Sample `n` completions for each prompt.

    Args:
        prompts: token-id lists (ragged).
        temperature: 0 is greedy; the paper samples at temperature=1.0, top_p=0.95.
        seed: an int (prompt i uses seed + i) or a list with one seed per prompt; sample j of a
            prompt draws from its own generator keyed by (prompt seed, j), so results do not depend
            on `prompt_batch` or on which prompts share a batch (up to float tolerance).
        prompt_batch: prompts per batch; the batch has prompt_batch * n cache rows.
        suffix: token ids fed after each sample ends (its stop token left out), in the same decode
            steps; Completion.suffix_logits holds the logits of `suffix_logit_ids` after them (what a forward
            of prompt + sample + suffix gives: the judge's forced verdict without recomputing the
            prompt).
    Returns:
        one list of `n` Completion per prompt. Log-probs are those of the model's own distribution,
        log softmax of the logits at temperature 1 (what training recomputes), not of the tempered /
        nucleus-truncated sampling distribution.

    Work: the (prompt, sample) pairs, in order, run in the cache rows (continuous batching): a row
    whose sample ends takes the next pending pair (with none pending, it idles until half the rows
    do, then they are dropped). A prompt is prefilled once, its cache copied to the rows of its
    other samples; a leading token prefix all prompts share (a judge system prompt; all of a lone
    prompt) is prefilled once for the call and attended once per decode step for all rows
    (cascade attention, Engine.share_prefix), and the rest of a prompt once per step for the rows
    sampling it (DecodeLayout groups; not in a CUDA-graph step), each row's sampled tokens per row.
    """
    if not prompts:
        return []
    seeds = _check_args(model, prompts, seed, max_new_tokens, suffix)
    bar = tqdm(total=len(prompts) * n, desc="sampling", unit="seq", disable=not progress, leave=False)
    res = _run(model, prompts, seeds, n, max_new_tokens, temperature, top_p, set(stop_ids), prompt_batch, bar,
               list(suffix), list(suffix_logit_ids))
    bar.close()
    return res


@dataclass
class _Rows:
    """State of the cache rows in the decode loop (B rows)."""
    unit: list            # (prompt, sample) each row runs, None when free
    held: list            # prompt whose cache slots [0, len) each row holds
    toks: list            # sampled ids of each row's sample
    lps: list             # their log-probs
    feed: list            # tokens still to feed after a finished sample (generate's suffix), else None
    logits: torch.Tensor  # [B, V] float32 next-token logits
    pos: torch.Tensor     # [B] next position (RoPE; its cache slot: DecodeLayout)
    U: torch.Tensor       # [B, max_new] each row's uniforms, one per step

    def keep(self, ki):
        """Keep rows ki (a list) in order."""
        self.unit, self.held, self.toks, self.lps, self.feed = \
            ([x[b] for b in ki] for x in (self.unit, self.held, self.toks, self.lps, self.feed))
        t = torch.tensor(ki, device=self.pos.device)
        self.logits, self.pos, self.U = self.logits[t], self.pos[t], self.U[t]


def _run(model, prompts, seeds, n, max_new, temperature, top_p, stop, prompt_batch, bar, suffix, logit_ids):
    dev = model.lm_head.weight.device
    work = [(i, j) for i in range(len(prompts)) for j in range(n)]          # in order
    B, G = min(prompt_batch * n, len(work)), max(len(p) for p in prompts)  # sampled tokens from slot G on
    engine = Engine(model, B, G + max_new + len(suffix))
    L = _shared_prefix(prompts, n)
    if L:  # The shared prefix once into row 0, then copied to every row (no prefill overwrites it).
        prefill(engine, [prompts[0][:L]], torch.zeros(1, dtype=torch.long, device=dev), 0)
        row0 = torch.zeros(B - 1, dtype=torch.long, device=dev)
        engine.copy_cache_rows(row0, torch.arange(1, B, device=dev), L)
        engine.share_prefix(L)  # decode steps read it once for all rows (cascade attention)
    rows = _Rows(*([None] * B for _ in range(5)), torch.zeros(B, model.config.vocab_size, device=dev),
                 torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, max_new, device=dev))
    res = [[None] * n for _ in prompts]
    graphed = GraphedDecode(engine) if dev.type == "cuda" and CUDA_GRAPHS else None
    plog = {}                    # prompt -> logits after its last token, while samples of it wait
    admitted = 0                 # work[:admitted] has been given a row
    lay = held = None            # the DecodeLayout of the prompts the rows held when it was built
    while True:
        # Free rows take pending work; then every live row picks its next token.
        admitted = _admit(engine, prompts, seeds, work, admitted, rows, plog, L)
        step = torch.tensor([min(len(t), max_new - 1) if t is not None else 0 for t in rows.toks], device=dev)
        token_ids = pick_next(rows.logits, temperature, top_p, rows.U.gather(1, step[:, None])[:, 0])  # [B]
        # The log-prob a trainer recomputes: temperature 1, no nucleus cut.
        token_logprobs = torch.log_softmax(rows.logits, -1).gather(1, token_ids[:, None]).squeeze(1)  # [B]
        # Each live row keeps its token, or feeds the next suffix token, or ends its sample.
        fed = {}                 # row -> the token it feeds instead of the one picked
        for b, (t, lp) in enumerate(zip(token_ids.tolist(), token_logprobs.tolist())):
            if rows.unit[b] is None:
                continue
            if rows.feed[b] is None:  # sampling
                rows.toks[b].append(t)
                rows.lps[b].append(lp)
                if t not in stop and len(rows.toks[b]) < max_new:
                    continue
                if suffix:
                    rows.feed[b] = ([] if t in stop else [t]) + suffix  # a stop token is not fed
            if rows.feed[b]:          # feeding the suffix: the logits after it come next step
                fed[b] = rows.feed[b].pop(0)
                continue
            i, j = rows.unit[b]
            res[i][j] = Completion(rows.toks[b], rows.lps[b],
                                   "stop" if rows.toks[b][-1] in stop else "length",
                                   rows.logits[b, logit_ids].tolist() if suffix else None)
            rows.unit[b], rows.feed[b] = None, None
            rows.pos[b] = len(prompts[i])  # a free row decodes junk into its first sampled slot
            bar.update(1)
        if fed:
            token_ids[list(fed)] = torch.tensor(list(fed.values()), device=dev)
        # With nothing pending, free rows are dropped once half the rows are free.
        live = [b for b, u in enumerate(rows.unit) if u is not None]
        if admitted == len(work) and len(live) < len(rows.unit):
            if not live:
                break
            if 2 * len(live) <= len(rows.unit):  # each drop copies the whole cache
                engine.select_cache_rows(torch.tensor(live, device=dev))
                token_ids = token_ids[torch.tensor(live, device=dev)]
                rows.keep(live)
        # One decode step of every row (a free row decodes junk that nothing reads).
        if graphed is not None and not graphed.fits(engine):
            graphed = GraphedDecode(engine)
        if lay is None or held != rows.held:  # the layout changes only with the prompts the rows hold
            held = list(rows.held)
            lay = _layout(prompts, held, G, L, dev, grouped=graphed is None)  # a graphed step has no groups
        step_fn = graphed or decode_one
        rows.logits = step_fn(engine, token_ids, rows.pos, layout=lay)
        rows.pos = rows.pos + torch.tensor([u is not None for u in rows.unit], device=dev)  # free rows stay
    return res


def _admit(engine, prompts, seeds, work, admitted, rows, plog, L):
    """Put pending work (work[admitted:]) into the free rows. A row takes a sample of a prompt its
    cache already holds, or a copy of another row's, or, for a prompt no row holds, a prefill (one
    call for the prompts admitted together). Returns the new count of admitted work."""
    dev = rows.pos.device
    free = [b for b, u in enumerate(rows.unit) if u is None]
    placed = work[admitted:admitted + len(free)]
    at = []                       # the row of each placed (prompt, sample)
    for i, j in placed:
        b = next((b for b in free if rows.held[b] == i), free[0])
        free.remove(b)
        if rows.held[b] != i:
            rows.held[b] = None   # its cache is about to hold another prompt
        rows.unit[b], rows.toks[b], rows.lps[b], rows.feed[b] = (i, j), [], [], None
        rows.U[b] = _uniforms(seeds[i], j, rows.U.shape[1])  # the same stream as one draw per step
        at.append(b)
    fresh = {}                    # prompt no row holds -> the row it is prefilled into
    for (i, _), b in zip(placed, at):
        if i not in rows.held and i not in fresh:
            fresh[i] = b
    if fresh:
        lg = prefill(engine, [prompts[i] for i in fresh], torch.tensor(list(fresh.values()), device=dev), L)
        for (i, b), x in zip(fresh.items(), lg):
            rows.held[b], plog[i] = i, x
    last = work[-1][1]            # a prompt's last sample index (n - 1)
    for (i, j), b in zip(placed, at):
        if rows.held[b] != i:
            src = torch.tensor([rows.held.index(i)], device=dev)
            engine.copy_cache_rows(src, torch.tensor([b], device=dev), len(prompts[i]), L)  # [0, L) is there
            rows.held[b] = i
        rows.logits[b], rows.pos[b] = plog[i], len(prompts[i])
    for i, j in placed:
        if j == last:             # every sample of prompt i is running
            del plog[i]
    return admitted + len(placed)
