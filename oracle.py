"""Reference numbers for someone else's checkpoint and data (the project as a correctness oracle),
and the comparison of two such dumps.

  python oracle.py --model DIR --data FILE --out OUT.jsonl [--ref DIR] [--genrm] [--top-p P]
  python oracle.py --compare OURS.jsonl THEIRS.jsonl [--tol X]
  python oracle.py --model DIR --data FILE --diagnose

Per completion token: log softmax(logits[t-1])[token t] under the model at temperature 1 in
float32, one sequence at a time (no padding), and the same recomputed in float64 by a plain
forward written here (`float64_logits`), whose largest difference bounds float32's rounding.
Pairs add TRL's DPO quantities against a reference model (h, loss, rewards beta * (logp - ref)),
a score head adds Bradley-Terry rewards, --genrm the GenRM p(A > B) of Eq. 7 in both orders.
The output fields are described in ORACLE.md.
"""
import argparse
import functools
import math
import sys

import torch
import torch.nn.functional as F

from cli import HelpFormatter, number
from data import Pair, completion_ids, load_tokenizer, prompt_completion_batch
from files import read_jsonl, write_jsonl
from genrm import p_chosen
from kernels import IGNORE_INDEX, fused_logprobs
from losses import bt_loss, dpo_loss
from model import Llama, rope_inv_freq
from oracle_compare import TOP_K, compare, read_dump, row_sequences
from sample import top_p_filter

# ----------------------------------------------------------------------------------------------
# input rows

def _ids_field(path, n, r, key, vocab):
    v = r[key]
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and 0 <= t < vocab for t in v):
        raise ValueError(f"{path}:{n}: field '{key}' must be a non-empty list of token ids in [0, {vocab})")
    return v


def _text_field(path, n, r, key):
    if not isinstance(r.get(key), str):
        raise ValueError(f"{path}:{n}: field '{key}' must be a string, got {type(r.get(key)).__name__}")
    return r[key]


def read_items(path, vocab, get_tok, want_pairs_text=False):
    """Rows of FILE as items {"id", "prompt" (ids), "seqs" {name: completion ids}, "pair" (a
    data.Pair for text pairs, else None)}. Token-id rows need no tokenizer; text rows are rendered
    with the model's chat template (get_tok() loads it once). Any bad row: ValueError naming the
    file, line and field."""
    items, seen = [], set()
    for n, r in read_jsonl(path):
        rid = str(r.get("id", n))
        if rid in seen:
            raise ValueError(f"{path}:{n}: field 'id': duplicate id {rid!r} (dumps are matched by id)")
        seen.add(rid)
        pair = None
        if "prompt_ids" in r:
            prompt = _ids_field(path, n, r, "prompt_ids", vocab)
            names = ("completion_ids",) if "completion_ids" in r else ("chosen_ids", "rejected_ids")
            for k in (k for k in names if k not in r):
                raise ValueError(f"{path}:{n}: missing field '{k}' (or 'completion_ids' for a completion)")
            seqs = {k[:-4]: _ids_field(path, n, r, k, vocab) for k in names}
        elif "prompt" in r or "messages" in r:
            tok = get_tok()
            msgs = r.get("messages") or [{"role": "user", "content": _text_field(path, n, r, "prompt")}]
            try:
                prompt = tok.apply_chat(msgs)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: field 'messages': {e}") from None
            names = ("completion",) if "completion" in r else ("chosen", "rejected")
            seqs = {k: completion_ids(tok, _text_field(path, n, r, k)) for k in names}
            if len(seqs) == 2:
                pair = Pair(id=rid, prompt=msgs[-1]["content"], chosen=r["chosen"], rejected=r["rejected"],
                            messages=r.get("messages"))
        else:
            raise ValueError(f"{path}:{n}: missing field 'prompt_ids' (token ids) or 'prompt' / 'messages'")
        if want_pairs_text and len(seqs) == 2 and pair is None:
            raise ValueError(f"{path}:{n}: field 'chosen': --genrm needs text pairs (its prompt is text)")
        items.append({"id": rid, "prompt": prompt, "seqs": seqs, "pair": pair})
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


# ----------------------------------------------------------------------------------------------
# the numbers

def _sequences(items):
    return [(it["prompt"], c) for it in items for c in it["seqs"].values()]


@torch.no_grad()
def score(model, items, *, batch_size=1, temperature=None, top_p=None):
    """Per-sequence float32 numbers of every (prompt, completion) of `items`, in order: log-probs of
    the completion tokens, top-5 per position, the Bradley-Terry reward (a score head), and with
    temperature / top_p the processed log-probs: log of the renormalised nucleus of
    softmax(logits / T) that a sampler draws from (None for a token outside it)."""
    seqs, out = _sequences(items), []
    dev = model.lm_head.weight.device
    for s in range(0, len(seqs), batch_size):
        # One forward per batch; the logits are held, since the top-5 needs every position's row.
        chunk = seqs[s:s + batch_size]
        idx, valid, _ = prompt_completion_batch(chunk, pad_id=0)  # right padding; pad id is masked out
        idx, valid = idx.to(dev), valid.to(dev)
        hidden = model.hidden(idx, valid=valid)                               # [b, T, H]
        logits = model.lm_head(hidden).float()                                # [b, T, V] float32
        rewards = model.reward(idx, valid).tolist() if model.score is not None else None
        if temperature is not None or top_p is not None:
            tempered = tempered_logprobs(model, hidden, chunk, temperature or 1.0)
        # Each sequence's rows: position P + t - 1 predicts completion token t.
        for i, (prompt, comp) in enumerate(chunk):
            P, C = len(prompt), len(comp)
            lg = logits[i, P - 1:P + C - 1]                                   # [C, V] predicts comp
            tgt = torch.tensor(comp, device=dev)
            lp = torch.log_softmax(lg, -1)
            tok_lp = lp.gather(1, tgt[:, None]).squeeze(1)
            top = lp.topk(TOP_K, -1)
            rec = {"token_ids": comp, "logprobs": tok_lp.tolist(), "logprob_sum": tok_lp.sum().item(),
                   "logprob_mean": tok_lp.mean().item(), "top5_ids": top.indices.tolist(),
                   "top5_logprobs": top.values.tolist()}
            if temperature is not None or top_p is not None:
                rec.update(processed(lg, tgt, temperature or 1.0, top_p or 1.0))
                rec["tempered_logprobs"], rec["entropy"] = tempered[i]
            if rewards is not None:
                rec["reward"] = rewards[i]
            out.append(rec)
    return out


def tempered_logprobs(model, hidden, chunk, temperature):
    """Per completion token of each (prompt, completion) in `chunk`, log softmax(logits / T)[token]
    and the entropy of softmax(logits / T) (no nucleus cut): the log-probs an RL trainer's actor
    recomputes at the rollout temperature and the entropy it logs (verl, OpenRLHF). They come from
    kernels.fused_logprobs on the batch's final hidden states [b, T, H] (right padding), every
    position that predicts no completion token given the target IGNORE_INDEX. Returns a list of
    (log-probs, entropies), two lists of floats per sequence."""
    b, T, H = hidden.shape
    targets = torch.full((b, T), IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    for i, (prompt, comp) in enumerate(chunk):  # position P + t - 1 predicts completion token t
        targets[i, len(prompt) - 1:len(prompt) + len(comp) - 1] = torch.tensor(comp)
    lp, ent = fused_logprobs(hidden.reshape(b * T, H), model.lm_head.weight, targets.flatten(),
                             temperature=temperature, return_entropy=True)           # [b * T] each
    lp, ent = lp.view(b, T), ent.view(b, T)
    return [(lp[i][targets[i] != IGNORE_INDEX].tolist(), ent[i][targets[i] != IGNORE_INDEX].tolist())
            for i in range(b)]


def processed(logits, tgt, temperature, top_p):
    """The log-probs of tokens `tgt` [C] under the distribution a sampler at (temperature, top_p)
    draws from: softmax(logits / T), cut to the nucleus (sample.top_p_filter) and renormalised."""
    kept, order = top_p_filter(torch.softmax(logits / temperature, -1), top_p)   # [C, V] sorted
    # The probabilities come back sorted, so each token's probability is found at its rank.
    p = kept.gather(1, (order == tgt[:, None]).float().argmax(1, keepdim=True)).squeeze(1)
    # A token outside the nucleus has probability 0 there: no log-prob, and no sum over the sequence.
    lp = [math.log(x) if x > 0 else None for x in p.double().tolist()]
    total = None if None in lp else sum(lp)
    return {"processed_logprobs": lp, "processed_logprob_sum": total,
            "processing": {"temperature": temperature, "top_p": top_p}}


def _rms64(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope64(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def float64_logits(weights, cfg, ids):
    """Logits [T, V] of one sequence with every step in float64 (weights: the state dict in
    float64): a plain forward written apart from model.py (explicit causal softmax attention with
    repeated kv heads), so its difference from the float32 pass measures rounding. The RoPE
    frequencies are the convention's float32 values (rope_inv_freq), applied in float64."""
    T, nh, nkv, hd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ang = torch.arange(T, dtype=torch.float64)[:, None] * rope_inv_freq(cfg).double()[None]  # [T, hd/2]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    future = ~torch.ones(T, T, dtype=torch.bool).tril()
    # The Llama block written out step by step: norm, attention, residual; norm, SwiGLU, residual.
    x = weights["model.embed_tokens.weight"][torch.tensor(ids)]               # [T, H]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        w = {k[len(pre):]: v for k, v in weights.items() if k.startswith(pre)}
        h = _rms64(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ w["self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)      # [nh, T, hd]
        k = (h @ w["self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)     # [nkv, T, hd]
        v = (h @ w["self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)   # head j uses kv j // g
        q, k = _rope64(q, cos, sin), _rope64(k, cos, sin)
        att = ((q @ k.transpose(1, 2)) / math.sqrt(hd)).masked_fill(future, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(T, nh * hd) @ w["self_attn.o_proj.weight"].T
        h = _rms64(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    x = _rms64(x, weights["model.norm.weight"], cfg.rms_norm_eps)
    return x @ weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).T


@torch.no_grad()
def add_float64(model, items, recs):
    """Recompute every sequence's completion log-probs in float64 (float64_logits) and store the
    float64 sum and the largest |float32 - float64| per token in each record."""
    weights = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    for (prompt, comp), rec in zip(_sequences(items), recs):
        lp = torch.log_softmax(float64_logits(weights, model.config, prompt + comp), -1)
        tok_lp = lp[len(prompt) - 1:-1].gather(1, torch.tensor(comp)[:, None]).squeeze(1)
        rec["logprob_sum_float64"] = tok_lp.sum().item()
        ours = torch.tensor(rec["logprobs"], dtype=torch.float64)
        rec["float64_max_abs_diff"] = (tok_lp - ours).abs().max().item()


def build_rows(items, recs):
    """Records (one per sequence, in _sequences order) -> output rows: a completion row is flat
    {"id", "prompt_ids", ...sequence}; a pair is {"id", "prompt_ids", "chosen", "rejected"}."""
    rows, it_recs = [], iter(recs)
    for it in items:
        row = {"id": it["id"], "prompt_ids": it["prompt"]}
        if "completion" in it["seqs"]:
            row.update(next(it_recs))
        else:
            row["chosen"], row["rejected"] = next(it_recs), next(it_recs)
        rows.append(row)
    return rows


def add_pair_numbers(rows, ref_recs, args):
    """DPO in TRL's convention against the reference's log-probs (rows in place): h = (pi_w - ref_w)
    - (pi_l - ref_l) on sums, rewards beta * (logp - ref), loss per losses.dpo_loss (IPO on
    per-token averages, as TRL); and the Bradley-Terry loss where the model has a score head."""
    ref_it = iter(ref_recs) if ref_recs is not None else None
    for row in rows:
        if "chosen" not in row:
            if ref_it is not None:
                row["ref_logprob_sum"] = next(ref_it)["logprob_sum"]
            continue
        w, l = row["chosen"], row["rejected"]
        if "reward" in w:
            row["bt_loss"] = bt_loss(torch.tensor(w["reward"]), torch.tensor(l["reward"])).item()
        if ref_it is None:
            continue
        # The reference's records come in the same order as the policy's: chosen, then rejected.
        rw, rl = next(ref_it), next(ref_it)
        w["ref_logprob_sum"], l["ref_logprob_sum"] = rw["logprob_sum"], rl["logprob_sum"]
        key = "logprob_mean" if args.loss_type == "ipo" else "logprob_sum"
        t = torch.tensor([[w[key], l[key], rw[key], rl[key]]], dtype=torch.float64)
        loss = dpo_loss(t[:, 0], t[:, 1], t[:, 2], t[:, 3], beta=args.beta,
                        label_smoothing=args.label_smoothing, loss_type=args.loss_type)
        row.update(h=(w["logprob_sum"] - rw["logprob_sum"]) - (l["logprob_sum"] - rl["logprob_sum"]),
                   loss=loss.item(), chosen_reward=args.beta * (w["logprob_sum"] - rw["logprob_sum"]),
                   rejected_reward=args.beta * (l["logprob_sum"] - rl["logprob_sum"]),
                   dpo=dict(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing))


def add_genrm(model, tok, items, rows):
    """p(A > B) of Eq. 7 (the Fig. 8 prompt's indicator tokens) with the chosen answer as A, and
    with it as B, from genrm.p_chosen (rows in place)."""
    for it, row in zip(items, rows):  # build_rows keeps the items' order
        if it["pair"] is not None:
            first = p_chosen(model, tok, [it["pair"]], [True]).item()        # chosen is A: p(A > B)
            second = p_chosen(model, tok, [it["pair"]], [False]).item()      # chosen is B: 1 - p(A > B)
            row["genrm_p_a"] = {"chosen_is_a": first, "chosen_is_b": 1 - second}


# ----------------------------------------------------------------------------------------------
# command line

def dump(args):
    """--model/--data: the oracle rows (and with --out, the file)."""
    model = Llama.from_pretrained(args.model).eval()
    get_tok = functools.cache(functools.partial(load_tokenizer, args.model))  # only text rows need one
    items = read_items(args.data, model.config.vocab_size, get_tok, want_pairs_text=args.genrm)
    if args.diagnose:
        return diagnose(model, items, args)
    # The float32 numbers first, then the float64 recompute that bounds their rounding.
    recs = score(model, items, batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p)
    if not args.no_float64:
        add_float64(model, items, recs)
    rows = build_rows(items, recs)
    ref = Llama.from_pretrained(args.ref).eval() if args.ref else None
    add_pair_numbers(rows, score(ref, items, batch_size=args.batch_size) if ref else None, args)
    if args.genrm:
        add_genrm(model, get_tok(), items, rows)
    if args.out:
        write_jsonl(args.out, rows)
    worst = [r.get("float64_max_abs_diff") for row in rows for _, r in row_sequences(row)]
    worst = [w for w in worst if w is not None]
    print(f"{len(rows)} rows{' -> ' + args.out if args.out else ''}; " + (
        f"largest float32 - float64 |diff| {max(worst):.3g}" if worst else "no float64 recompute"))
    return 0


def diagnose(model, items, args):
    """The project's own mismatches, reported as --compare does: float32 batches of many (padded)
    and bf16 weights, each against float32 one sequence at a time."""
    base = build_rows(items, score(model, items))
    many = max(args.batch_size, 8)
    cases = [(f"float32, batch size {many} (right-padded) vs 1", score(model, items, batch_size=many))]
    model.to(torch.bfloat16)
    cases.append(("bfloat16 weights vs float32, batch size 1", score(model, items)))
    for title, recs in cases:
        lines, _ = compare(base, build_rows(items, recs), args.tol)
        print(f"== {title}\n  " + "\n  ".join(lines))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", help="HF-format Llama-family directory (or smollm2-135m-instruct)")
    ap.add_argument("--data", help="JSONL: token ids (prompt_ids + completion_ids | chosen_ids + "
                    "rejected_ids) or text (prompt | messages, + completion | chosen + rejected)")
    ap.add_argument("--out", help="write the rows here (JSONL)")
    ap.add_argument("--ref", help="reference model for the DPO quantities of pairs")
    ap.add_argument("--beta", type=number(float, above=0), default=0.1, help="DPO beta")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO eps (losses.dpo_loss)")
    ap.add_argument("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid",
                    help="DPO loss (ipo: on per-token mean log-probs, as TRL)")
    ap.add_argument("--genrm", action="store_true", help="p(A > B) of Eq. 7 in both orders (text pairs)")
    ap.add_argument("--temperature", type=number(float, above=0),
                    help="add processed log-probs at this temperature")
    ap.add_argument("--top-p", type=number(float, above=0, high=1),
                    help="add processed log-probs with this nucleus")
    ap.add_argument("--batch-size", type=number(int, 1), default=1,
                    help="sequences per forward (1: no padding)")
    ap.add_argument("--no-float64", action="store_true", help="skip the float64 recompute (2x weight memory)")
    ap.add_argument("--compare", nargs=2, metavar=("OURS", "THEIRS"),
                    help="compare two dumps, matched by id; exit status 1 past --tol")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest per-token / DPO-loss |diff| that passes")
    ap.add_argument("--diagnose", action="store_true", help="bf16 vs float32 and batch 1 vs many, on --data")
    args = ap.parse_args(argv)
    try:
        if args.compare:
            lines, ok = compare(read_dump(args.compare[0]), read_dump(args.compare[1]), args.tol)
            print("\n".join(lines + ["PASS" if ok else "FAIL"]))
            return 0 if ok else 1
        if not args.model or not args.data:
            ap.error("--model and --data are needed (or --compare OURS THEIRS)")
        return dump(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
