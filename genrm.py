"""The method: judge prompts (paper Appendix A, Fig. 6-8), verdict parsing, forced verdicts,
GenRM preference probabilities from the indicator tokens (Sec. 4, Eq. 7), the reward of Eq. 6,
CoT judging with self-consistency (majority vote), and the STaR steps (Sec. 2.2, 4, A.3) as pure
functions: sample rationales, keep correct ones (STaR-SFT, Eq. 4/8) or pair correct with
incorrect ones (STaR-DPO, Eq. 9), rationalize failures (Fig. 7). The loop that strings them
together with training, one disjoint split per iteration, is `train.star` (paper A.3).

Artefacts are JSONL with these schemas (drop in rationales from another sampler the same way):
  samples_{i}.jsonl  {"id", "messages", "label", "completion", "verdict", "forced"}
  sft_{i}.jsonl      {"id", "messages", "completion"}
  dpo_{i}.jsonl      {"id", "messages", "chosen", "rejected"}
`messages` is the rendered judge conversation (system + user), `label` the correct letter.
"""
import random
import re
from collections import Counter

import torch
from tqdm import tqdm

import dist
from data import Example, Pair, Tokenizer, drop_over_long, pad, seeded_subset
from files import read_jsonl, require
from sample import generate

# --- Appendix A prompts, word for word. The paper's text rendering loses line breaks; the layout
# --- of the user turn follows MT-Bench's pairwise template, on which the paper's prompts are based.
SYSTEM_RATIONALIZER = (  # Fig. 7: Fig. 6 without the output instructions
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows the "
    "user's instructions and answers the user's question better. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
    "responses. Begin your evaluation by comparing the two responses and provide a short explanation. "
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do "
    "not favor certain names of the assistants. Be as objective as possible.")
SYSTEM_COT = SYSTEM_RATIONALIZER + (  # Fig. 6: LLM-as-a-judge and STaR-SFT/DPO
    " After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better")
SYSTEM_GENRM = (  # Fig. 8: no explanation, no brackets
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows the "
    "user's instructions and answers the user's question better. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
    "responses. Avoid any position biases and ensure that the order in which the responses were presented "
    "does not influence your decision. Do not allow the length of the responses to influence your "
    "evaluation. Do not favor certain names of the assistants. Be as objective as possible. Output your "
    "verdict by strictly following this format: \"A\" if assistant A is better, \"B\" if assistant B is "
    "better")
USER_TEMPLATE = ("[Chat Context]\n{chat}\n\n"
                 "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
                 "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
RATIONALIZER_ASK = "\n\nExplain why response {win} is better than response {lose}."  # Fig. 7
VERDICT_PREFIX = "\n\nFinal verdict: [["  # appended to force a verdict (our choice; see forced_verdicts)
PROMPT_KINDS = ("cot", "genrm", "rationalizer")  # Fig. 6, Fig. 8, Fig. 7


def chat_context(pair: Pair) -> str:
    """{chat}: the prompt, or for a multi-turn conversation its turns as 'User: ...' lines."""
    if not pair.messages or len(pair.messages) == 1:
        return pair.prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in pair.messages)


def judge_messages(pair: Pair, a_is_chosen: bool, prompt_kind: str = "cot") -> list:
    """The judge conversation for `pair` with the chosen answer as A (or as B), in the prompt of
    `prompt_kind`: "cot" (Fig. 6), "genrm" (Fig. 8) or "rationalizer" (Fig. 7)."""
    a, b = (pair.chosen, pair.rejected) if a_is_chosen else (pair.rejected, pair.chosen)
    user = USER_TEMPLATE.format(chat=chat_context(pair), answer_a=a, answer_b=b)
    if prompt_kind == "cot":
        system = SYSTEM_COT
    elif prompt_kind == "genrm":
        system = SYSTEM_GENRM
    elif prompt_kind == "rationalizer":
        system = SYSTEM_RATIONALIZER
        win, lose = ("A", "B") if a_is_chosen else ("B", "A")
        user += RATIONALIZER_ASK.format(win=win, lose=lose)
    else:
        raise ValueError(f"prompt_kind must be one of {PROMPT_KINDS}, got {prompt_kind!r}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def label(a_is_chosen: bool) -> str:
    return "A" if a_is_chosen else "B"


def parse_verdict(text: str):
    """The last [[A]] or [[B]] in text; None when there is none (a parse failure, never a default)."""
    found = re.findall(r"\[\[([AB])\]\]", text)
    return found[-1] if found else None


def seeded_orders(pairs, seed) -> list:
    """A/B order per pair, randomised with a seed (True = chosen is A)."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in pairs]


# ----------------------------------------------------------------------------------------------
# preferences from next-token probabilities

@torch.no_grad()
def next_token_ab(model, tok: Tokenizer, seqs, batch_size=4) -> torch.Tensor:
    """Logits [N, 2] of the tokens 'A' and 'B' right after each token sequence."""
    ab = torch.tensor([tok.token_id("A"), tok.token_id("B")])
    out = []
    dev = model.lm_head.weight.device
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        idx, valid = pad(chunk, tok.pad_id)
        h = model.hidden(idx.to(dev), valid=valid.to(dev))                    # [b, T, H]
        # Only two rows of the lm_head are needed: the logits of 'A' and 'B' at each last position.
        last = torch.tensor([len(c) - 1 for c in chunk], device=dev)
        w = model.lm_head.weight[ab.to(dev)]                                   # [2, H]
        out.append((h[torch.arange(len(chunk), device=dev), last] @ w.T).float().cpu())
    return torch.cat(out)


def preference_from_logits(ab_logits: torch.Tensor) -> torch.Tensor:
    """p(A > B) = P(A) / (P(A) + P(B)) from the indicator tokens' logits [N, 2] (renormalised over
    the two, paper Sec. 4 'GenRM compares next-token probabilities of I_1, I_2')."""
    return torch.softmax(ab_logits.float(), -1)[:, 0]


def p_chosen(model, tok, pairs, a_is_chosen, *, batch_size=4, progress=False) -> torch.Tensor:
    """p(chosen > rejected) [N] from the indicator tokens of the no-CoT GenRM prompt (Fig. 8,
    Sec. 4), pair i judged with the chosen answer as A where a_is_chosen[i]; the pairs are spread
    over the ranks of a torchrun job."""
    seqs = [tok.apply_chat(judge_messages(p, o, "genrm")) for p, o in zip(pairs, a_is_chosen)]

    def mine(ss):  # this rank's share (dist.shard_map): one (A, B) logit pair per sequence
        out = []
        for s in tqdm(range(0, len(ss), batch_size), desc="genrm", disable=not progress, leave=False):
            out += next_token_ab(model, tok, ss[s:s + batch_size], batch_size).tolist()
        return out
    p_a = preference_from_logits(torch.tensor(dist.shard_map(mine, seqs)).reshape(-1, 2))  # [N] P(A wins)
    # Where the chosen answer was shown as B, its probability of winning is that of B.
    return torch.where(torch.tensor(list(a_is_chosen), dtype=torch.bool), p_a, 1 - p_a)


def genrm_preference(model, tok, pairs, *, both_orders=False, batch_size=4):
    """p(chosen > rejected) per pair (p_chosen) with the chosen answer as A; with both_orders,
    the mean of that and of the chosen-as-B probability. Returns dict with 'p' [N] and, per
    order, 'p_a_chosen' and 'p_b_chosen'."""
    p_a = p_chosen(model, tok, pairs, [True] * len(pairs), batch_size=batch_size)   # chosen is A
    res = {"p_a_chosen": p_a, "p": p_a}
    if both_orders:
        p_b = p_chosen(model, tok, pairs, [False] * len(pairs), batch_size=batch_size)  # chosen is B
        res.update(p_b_chosen=p_b, p=(p_a + p_b) / 2)
    return res


def genrm_examples(tok, pairs, max_len, stats, seed):
    """Eq. 7 training examples: the no-CoT prompt (Fig. 8) in a seeded random A/B order, the
    correct letter as the one-token completion, the other letter kept for accuracy."""
    ex = [Example(tok.apply_chat(judge_messages(p, o, "genrm")), [tok.token_id(label(o))],
                  other=tok.token_id(label(not o)))
          for p, o in zip(pairs, seeded_orders(pairs, seed))]
    return drop_over_long(ex, max_len, stats, "example")


def reward_eq6(p_pref: torch.Tensor, eps=1e-6) -> torch.Tensor:
    """Eq. 6: r(x, y) - r(x, y_ref) = log(p(y > y_ref | x) / (1 - p(y > y_ref | x)))."""
    # A certain judge (p = 0 or 1) would give an infinite reward; the clamp keeps it finite.
    p = p_pref.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def forced_verdicts(ab, sample_seeds=None, temperature=1.0):
    """Verdicts for rationales without one, from the indicator logits ab [N, 2] ('A', 'B') right
    after rationale + VERDICT_PREFIX (generate's `suffix`): the argmax of P(A) vs P(B); with
    `sample_seeds` (one per rationale), a draw from softmax(ab / temperature) instead (temperature
    1: P(A) / (P(A) + P(B)), as the paper's sampler would have drawn the verdict token; STaR
    sampling); judging uses the argmax. Returns a list of 'A'/'B'."""
    ab = torch.as_tensor(ab, dtype=torch.float32).reshape(-1, 2)
    if sample_seeds is None:
        return ["A" if p >= 0.5 else "B" for p in preference_from_logits(ab).tolist()]
    pa = preference_from_logits(ab / temperature if temperature != 1.0 else ab).tolist()
    # One uniform per rationale from its own seed, so a verdict does not depend on the others forced.
    u = [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in sample_seeds]
    return ["A" if x < p else "B" for x, p in zip(u, pa)]


def with_verdict(rationale: str, verdict: str) -> str:
    """Training text for a rationale whose verdict was forced: the rationale, then the verdict."""
    return rationale.rstrip() + VERDICT_PREFIX + verdict + "]]"


# ----------------------------------------------------------------------------------------------
# CoT judging with self-consistency

def majority_vote(verdicts):
    """Majority over 'A'/'B' votes (None = parse failure, ignored). Returns (winner or None,
    Counter, status) with status 'ok', 'tie' or 'no-verdict'. Ties are reported, not broken."""
    c = Counter(v for v in verdicts if v is not None)
    if not c:
        return None, c, "no-verdict"
    if c["A"] == c["B"]:
        return None, c, "tie"
    return ("A" if c["A"] > c["B"] else "B"), c, "ok"


def cot_judge(model, tok, pairs, a_is_chosen, *, n=1, max_new_tokens=256, temperature=1.0, top_p=0.95,
              seed=0, force="argmax", prompt_batch=4, progress=True, prompt_kind="cot",
              verdict_temperature=1.0):
    """Sample n judge rationales per (pair, order) from one prefill each and read the verdicts.
    Returns, per pair, a list of n dicts {completion, verdict, forced} where `forced` marks a
    verdict obtained by forced_verdicts when no [[A]]/[[B]] was written (force: "argmax",
    "sample" at `verdict_temperature`, or None for no forcing). Seeds are per pair (an int: seed +
    pair index in this call; or a list), so batch size does not change results."""
    seeds = [seed + i for i in range(len(pairs))] if isinstance(seed, int) else list(seed)
    prompts = [tok.apply_chat(judge_messages(p, o, prompt_kind)) for p, o in zip(pairs, a_is_chosen)]
    # With forcing, the sampler feeds the verdict prefix after every rationale in the same decode
    # steps and keeps the logits of the letters A and B there, so a missing verdict costs no
    # second forward of the prompt.
    suffix = (dict(suffix=tok.encode(VERDICT_PREFIX), suffix_logit_ids=[tok.token_id("A"), tok.token_id("B")])
              if force else {})
    outs = generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    stop_ids=tok.stop_ids, seed=seeds, prompt_batch=prompt_batch, progress=progress, **suffix)
    res = [[{"completion": tok.decode(c.tokens), "ab": c.suffix_logits} for c in o] for o in outs]
    # Read each rationale's written verdict; those without one are forced from the A/B logits.
    todo = []
    for i, r in enumerate(res):
        for j, s in enumerate(r):
            s["verdict"] = parse_verdict(s["completion"])
            s["forced"] = False
            if s["verdict"] is None and force:
                todo.append((i, j, s))
    if todo:
        # Each forced verdict's seed comes from its pair's seed and its sample index.
        fseeds = [seeds[i] * 7919 + j for i, j, _ in todo] if force == "sample" else None
        forced = forced_verdicts([s["ab"] for _, _, s in todo], fseeds, verdict_temperature)
        for (_, _, s), v in zip(todo, forced):
            s["verdict"], s["forced"] = v, True
    # The A/B logits served the forcing only; the caller gets the rationale and its verdict.
    for r in res:
        for s in r:
            del s["ab"]
    return res


def cot_judge_sharded(model, tok, pairs, a_is_chosen, *, seed=0, **kw):
    """cot_judge with the pairs spread over the ranks of a torchrun job (dist.shard_map), each pair
    keeping its seed (seed + its index here), so any world size gives the same judgements."""
    items = list(zip(pairs, a_is_chosen, range(seed, seed + len(pairs))))

    def judge_shard(shard):  # this rank's (pair, a_is_chosen, seed) triples
        shard_pairs, shard_a_is_chosen, shard_seeds = zip(*shard) if shard else ((), (), ())
        return cot_judge(model, tok, list(shard_pairs), list(shard_a_is_chosen), seed=list(shard_seeds), **kw)

    return dist.shard_map(judge_shard, items)


# ----------------------------------------------------------------------------------------------
# STaR steps

def split_pairs(pairs, k, seed):
    """K disjoint parts covering the data, by a seeded permutation (paper A.3)."""
    # Every k-th index of one shuffle: the parts differ in size by at most one, and keep file order.
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [[pairs[j] for j in sorted(order[i::k])] for i in range(k)]


def sample_rationales(model, tok, pairs, *, n, max_new_tokens, seed, temperature=1.0, top_p=0.95,
                      force="sample", both_orders=False, verdict_temperature=1.0, prompt_batch=4,
                      progress=True):
    """STaR sampling on one split: a seeded random A/B order per pair (with both_orders, each pair
    in its seeded order and then the other one, so right and wrong rationales also come from the
    position the model is biased against), n rationales per (pair, order) from the CoT judge
    prompt (Fig. 6); a missing verdict is forced by sampling the indicator token at
    `verdict_temperature`. Returns sample rows (schema in the module docstring)."""
    # Which answer is shown as A is a seeded coin per pair, so the label is A about half the time.
    orders = seeded_orders(pairs, seed)
    if both_orders:
        pairs, orders = [p for p in pairs for _ in (0, 1)], [x for o in orders for x in (o, not o)]
    res = cot_judge_sharded(model, tok, pairs, orders, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, force=force, progress=progress,
                            verdict_temperature=verdict_temperature, prompt_batch=prompt_batch)
    # One row per rationale, with the prompt it answered, so the filter and a resumed run need
    # nothing but this file.
    rows = []
    for p, o, r in zip(pairs, orders, res):
        msgs = judge_messages(p, o, "cot")
        for s in r:
            rows.append({"id": p.id, "messages": msgs, "label": label(o), "completion": s["completion"],
                         "verdict": s["verdict"], "forced": s["forced"]})
    return rows


def training_text(row) -> str:
    """A sample's completion as a training target: forced verdicts are written out."""
    return with_verdict(row["completion"], row["verdict"]) if row["forced"] else row["completion"]


def star_sft_examples(samples):
    """STaR-SFT filter: keep rationales whose verdict equals the label (Sec. 2.2.1, Eq. 4)."""
    return [{"id": r["id"], "messages": r["messages"], "completion": training_text(r)}
            for r in samples if r["verdict"] == r["label"]]


def failed_pairs(samples, split):
    """The pairs of a split that no sample judged correctly, each in the order it was judged:
    what STaR-SFT's rationalization (Sec. 2.2.2) explains. Returns (pairs, a_is_chosen)."""
    right = {r["id"] for r in samples if r["verdict"] == r["label"]}
    order = {r["id"]: r["label"] == "A" for r in samples}
    wrong = [p for p in split if p.id in order and p.id not in right]
    return wrong, [order[p.id] for p in wrong]


def star_dpo_pairs(samples, *, pairs_per_prompt=1, seed=0):
    """STaR-DPO pairing (Eq. 9): for each judge prompt, up to `pairs_per_prompt` (correct,
    incorrect) rationale pairs, each rationale used at most once, chosen by a seeded shuffle.
    Samples with no verdict are neither correct nor incorrect and are not used."""
    # Group the rationales of each judge prompt into right and wrong ones.
    groups = {}
    for r in samples:
        if r["verdict"] is None:
            continue
        key = (r["id"], r["label"], r["messages"][-1]["content"])
        groups.setdefault(key, ([], []))[r["verdict"] != r["label"]].append(r)
    # Pair them off at random within the prompt: a right rationale is chosen, a wrong one rejected.
    rng = random.Random(seed)
    out = []
    for (pid, _, _), (good, bad) in groups.items():
        rng.shuffle(good)
        rng.shuffle(bad)
        for w, l in list(zip(good, bad))[:pairs_per_prompt]:
            out.append({"id": pid, "messages": w["messages"], "chosen": training_text(w),
                        "rejected": training_text(l)})
    return out


def random_filter(samples, k, seed):
    """The control that must not learn: k samples kept at random, whatever their verdict (as many
    as the label filter kept), so that a gain can be credited to the label, not to the amount of
    self-generated text trained on. Returns SFT rows, in sample order."""
    return [{"id": r["id"], "messages": r["messages"], "completion": training_text(r)}
            for r in seeded_subset(samples, k, seed)]


def random_dpo_pairs(samples, k, seed):
    """The STaR-DPO control: k pairs of two different rationales of the same prompt, which one is
    "chosen" decided by a coin instead of the label (as many pairs as star_dpo_pairs made)."""
    groups = {}
    for r in samples:
        groups.setdefault((r["id"], r["messages"][-1]["content"]), []).append(r)
    rng, out = random.Random(seed), []
    keys = [key for key, rows in groups.items() if len(rows) >= 2]
    rng.shuffle(keys)
    for key in keys[:k]:
        w, l = rng.sample(groups[key], 2)
        out.append({"id": w["id"], "messages": w["messages"], "chosen": training_text(w),
                    "rejected": training_text(l)})
    return out


def rationalize(model, tok, pairs, orders, *, max_new_tokens, seed, progress=True):
    """Post-rationalization (Sec. 2.2.2, Fig. 7): the model explains why the correct answer is better;
    the training example is the CoT judge prompt (Fig. 6) with that rationale and the correct
    verdict written out (Eq. 8)."""
    res = cot_judge_sharded(model, tok, pairs, orders, n=1, max_new_tokens=max_new_tokens, temperature=1.0,
                            top_p=0.95, seed=seed, force=None, progress=progress, prompt_kind="rationalizer")
    return [{"id": p.id, "messages": judge_messages(p, o, "cot"),
             "completion": with_verdict(r[0]["completion"], label(o))}
            for p, o, r in zip(pairs, orders, res)]


def star_report(samples, kept=None, paired=None) -> dict:
    """Per-iteration counts: sampled, parsed, forced, correct (parsed or forced), kept, paired."""
    return {"sampled": len(samples),
            "parsed": sum(r["verdict"] is not None and not r["forced"] for r in samples),
            "forced": sum(bool(r["forced"]) for r in samples),
            "correct": sum(r["verdict"] == r["label"] for r in samples),
            "kept": kept, "paired": paired}


def load_rows(path, required):
    """Read an artefact JSONL, checking each row has the schema's fields (error names file:line)."""
    rows = []
    for n, r in read_jsonl(path):
        require(r, required, f"{path}:{n}")
        rows.append(r)
    return rows


SCHEMAS = {"samples": ("id", "messages", "label", "completion", "verdict", "forced"),
           "sft": ("id", "messages", "completion"),
           "dpo": ("id", "messages", "chosen", "rejected")}
