"""Data: tokenizers with chat templates written in code (Llama-3.1 headers; ChatML for SmolLM2),
preference JSONL -> Pair, training examples as token ids (Example: SFT, GenRM, pairs), and
padding/loss masks for training batches.

Pair JSONL (one object per line): {"id", "prompt", "chosen", "rejected", ["category"],
["messages"]}. `messages`, when present, is the whole conversation whose last user turn is
`prompt`. Malformed lines are errors naming file, line and field; empty answers and identical
answers are counted skips, reported by the caller.
"""
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from files import DEFAULT_MODEL, atomic_write, read_jsonl, require, resolve_model

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ----------------------------------------------------------------------------------------------
# tokenizers

class Tokenizer:
    """encode/decode plain text (no special tokens added) and apply_chat for the model's template.

    llama3: <|begin_of_text|> once, then <|start_header_id|>role<|end_header_id|>\\n\\n content
    <|eot_id|> per turn. chatml (SmolLM2): <|im_start|>role\\n content<|im_end|>\\n per turn, no BOS,
    and SmolLM2's default system prompt when the messages carry none (as its HF template does).
    """

    def __init__(self, tok: HFTokenizer, source: str):
        self.tok, self.source = tok, source
        # The template is read off the vocabulary: each family's header tokens exist only in its own.
        vocab = tok.get_vocab(with_added_tokens=True)
        if "<|start_header_id|>" in vocab:
            self.template = "llama3"
            self.bos_id = vocab["<|begin_of_text|>"]
            self.eot_id = vocab["<|eot_id|>"]
            self.stop_ids = (self.eot_id, vocab["<|end_of_text|>"])
        elif "<|im_start|>" in vocab:
            self.template = "chatml"
            self.bos_id = None
            self.eot_id = vocab["<|im_end|>"]
            self.stop_ids = (self.eot_id,) + ((vocab["<|endoftext|>"],) if "<|endoftext|>" in vocab else ())
        else:
            raise ValueError(f"{source}: unknown chat template (no Llama-3 header or ChatML tokens)")
        # Padding is always masked, so any id will do; end-of-turn exists in every template.
        self.pad_id = self.eot_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def save(self, directory):
        """Copy tokenizer.json next to a saved model, so the directory is a complete model."""
        with atomic_write(Path(directory) / "tokenizer.json") as tmp:
            shutil.copyfile(self.source, tmp)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, s: str) -> int:
        """The id of a string that must be exactly one token (e.g. a verdict letter)."""
        ids = self.encode(s)
        if len(ids) != 1:
            raise ValueError(f"{s!r} is {len(ids)} tokens in this tokenizer, expected 1")
        return ids[0]

    def apply_chat(self, messages, add_generation_prompt=True) -> list[int]:
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role in system/user/assistant and string content")
        if self.template == "llama3":
            text = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                for m in messages)
            if add_generation_prompt:
                text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        else:
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": SMOLLM_SYSTEM}] + list(messages)
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            if add_generation_prompt:
                text += "<|im_start|>assistant\n"
        # as HF's apply_chat_template: the rendered string is tokenized, special tokens included
        return self.tok.encode(text, add_special_tokens=False).ids


def load_tokenizer(path_or_name) -> Tokenizer:
    """A tokenizer.json file, a model directory holding one, or the default model's name."""
    p = resolve_model(path_or_name) if str(path_or_name) == DEFAULT_MODEL else Path(path_or_name)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory or tokenizer file")
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer.json not found")
    try:
        tok = HFTokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise ValueError(f"{p}: unreadable tokenizer file ({e})") from None
    return Tokenizer(tok, str(p))


# ----------------------------------------------------------------------------------------------
# preference pairs

@dataclass
class Pair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    category: str = ""
    messages: list | None = None  # whole conversation ending in the user turn `prompt`
    meta: dict = field(default_factory=dict)


@dataclass
class LoadStats:
    read: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)

    def skip(self, why):
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def __str__(self):
        s = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept}/{self.read} kept (skipped: {s})"


def load_pairs(path, *, limit=None, seed=0, stats: LoadStats | None = None) -> list[Pair]:
    """Read pair JSONL. Missing or non-string prompt/chosen/rejected: ValueError naming file, line
    and field. Empty (whitespace-only) answers and chosen == rejected: counted skips in `stats`.
    `limit` keeps a seeded random subset of that size (order preserved)."""
    stats = stats if stats is not None else LoadStats()
    out = []
    for n, obj in read_jsonl(path):
        stats.read += 1
        require(obj, ("prompt", "chosen", "rejected"), f"{path}:{n}")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(obj[k], str):
                raise ValueError(f"{path}:{n}: field '{k}' must be a string, got {type(obj[k]).__name__}")
        # A pair with an empty or repeated answer carries no preference: skipped, and counted.
        if not obj["chosen"].strip() or not obj["rejected"].strip():
            stats.skip("empty answer")
            continue
        if obj["chosen"] == obj["rejected"]:
            stats.skip("chosen == rejected")
            continue
        msgs = _messages(path, n, obj)
        out.append(Pair(id=str(obj.get("id", f"{Path(path).name}:{n}")), prompt=obj["prompt"],
                        chosen=obj["chosen"], rejected=obj["rejected"], category=str(obj.get("category", "")),
                        messages=msgs, meta=obj.get("meta") or {}))
    # The subset is drawn after the skips, so --limit N gives N usable pairs when the file has them.
    out = seeded_subset(out, limit, seed)
    stats.kept = len(out)
    return out


def load_completions(path, *, limit=None, seed=0, stats: LoadStats | None = None) -> list[dict]:
    """Read SFT completion JSONL, {"messages" | "prompt", "completion"} per line. A missing or
    non-string field: ValueError naming file, line and field; an empty completion: a counted skip.
    `limit`: a seeded random subset, as load_pairs."""
    stats = stats if stats is not None else LoadStats()
    out = []
    for n, obj in read_jsonl(path):
        stats.read += 1
        for k in ("completion",) if "messages" in obj else ("prompt", "completion"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{path}:{n}: field '{k}' must be a string, got {type(obj.get(k)).__name__}")
        _messages(path, n, obj)
        if not obj["completion"].strip():
            stats.skip("empty completion")
            continue
        out.append(obj)
    out = seeded_subset(out, limit, seed)
    stats.kept = len(out)
    return out


def _messages(path, n, obj):
    """The optional `messages` field: a non-empty list of turns ending with a user turn."""
    msgs = obj.get("messages")
    if msgs is not None and (not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict)
                             or msgs[-1].get("role") != "user"):
        raise ValueError(f"{path}:{n}: field 'messages' must be a list of turns ending with a user turn")
    return msgs


def seeded_subset(rows, limit, seed):
    """A seeded random subset of `limit` rows, in file order (all rows when there are fewer)."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


# ----------------------------------------------------------------------------------------------
# batches

def pad(seqs, pad_id, side="right"):
    """List of id lists -> (idx [B, T] long, valid [B, T] bool)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        idx[i, sl] = torch.tensor(s, dtype=torch.long)
        valid[i, sl] = True
    return idx, valid


def prompt_completion_batch(examples, pad_id):
    """[(prompt_ids, completion_ids)] -> idx, valid, loss_mask [B, T]; loss_mask marks the
    completion tokens (the prompt is never trained on)."""
    idx, valid = pad([p + c for p, c in examples], pad_id)
    loss_mask = torch.zeros_like(valid)
    for i, (p, c) in enumerate(examples):
        loss_mask[i, len(p):len(p) + len(c)] = True
    return idx, valid, loss_mask


@dataclass
class PackedPairs:
    """A batch of pairs packed one per row as [prompt | chosen | rejected] (right padded), so each
    prompt is run once for both completions. `mask` [B, T, T] (query, key): causal over prompt +
    chosen; rejected tokens see the prompt and earlier rejected tokens, never the chosen ones;
    padding sees only itself. `pos` [B, T]: the rejected tokens continue from the end of the
    prompt, as if they followed it directly. Loss rows (flat indices `src` into the [B * T] hidden
    states, `tgt` the predicted tokens, `seq` = 2i for pair i's chosen, 2i + 1 for its rejected)
    come pair by pair, chosen rows then rejected rows; the rejected answer's first token is
    predicted from the last prompt token. `last` [B, 2]: flat indices of the last chosen and the
    last rejected token (Bradley-Terry rewards)."""
    idx: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    src: torch.Tensor
    tgt: torch.Tensor
    seq: torch.Tensor
    last: torch.Tensor


def packed_pair_batch(triples, pad_id, device="cpu") -> PackedPairs:
    """[(prompt_ids, chosen_ids, rejected_ids)] -> PackedPairs (see there)."""
    T = max(len(p) + len(c) + len(r) for p, c, r in triples)
    B = len(triples)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)                    # padding sees itself
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    src, tgt, seq, last = [], [], [], []
    for i, (p, c, r) in enumerate(triples):
        P, C, R = len(p), len(c), len(r)
        if not (P and C and R):
            raise ValueError(f"pair {i}: empty prompt, chosen or rejected ids")
        # Tokens and positions: the rejected answer restarts at position P, right after the prompt.
        idx[i, :P + C + R] = torch.tensor(p + c + r, dtype=torch.long)
        pos[i, :P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        # Attention: prompt + chosen causally; the rejected answer sees the prompt, never the chosen.
        mask[i, :P + C, :P + C] = causal[:P + C, :P + C]
        mask[i, P + C:P + C + R, :P] = True                                    # rejected sees the prompt
        mask[i, P + C:P + C + R, P + C:P + C + R] = causal[:R, :R]            # and itself, causally
        # Loss rows: the position that predicts each completion token, as a flat index into [B * T].
        o = i * T
        src += [o + P - 1 + j for j in range(C)]                               # chosen j from P-1+j
        src += [o + (P - 1 if j == 0 else P + C + j - 1) for j in range(R)]    # rejected 0 from P-1
        tgt += c + r
        seq += [2 * i] * C + [2 * i + 1] * R
        last.append([o + P + C - 1, o + P + C + R - 1])
    src, tgt, seq, last = (torch.tensor(x, dtype=torch.long, device=device) for x in (src, tgt, seq, last))
    return PackedPairs(idx.to(device), pos.to(device), mask.to(device), src, tgt, seq, last)


# ----------------------------------------------------------------------------------------------
# training examples: token ids for each objective

@dataclass
class Example:
    """One training example as token ids. SFT, rationalizer (Eq. 8): the loss is on `completion`.
    GenRM (Eq. 7): `completion` is the correct letter, `other` the wrong one. DPO (Eq. 9) and
    Bradley-Terry (Eq. 2): `completion` is the chosen answer, `rejected` the other; `ref` holds the
    reference model's log-probs {"sum": (chosen, rejected), "avg": (...)} once computed."""
    prompt: list
    completion: list
    rejected: list | None = None
    other: int | None = None
    ref: dict | None = None

    @property
    def loss_terms(self) -> int:
        """What this example adds to the count the step's loss is averaged over: its completion
        tokens (SFT-like), or 1 (a pair, or a verdict)."""
        return 1 if self.rejected is not None or self.other is not None else len(self.completion)

    @property
    def positions(self) -> int:
        """Positions the longest sequence of this example occupies (prompt + longer completion)."""
        return len(self.prompt) + max(len(self.completion), len(self.rejected or []))


def completion_ids(tok, text):
    """A completion's ids: the text, then end-of-turn (what the model must learn to emit)."""
    return tok.encode(text) + [tok.eot_id]


def drop_over_long(examples, max_len, stats, what):
    """Drop examples longer than max_len tokens, counted in stats (never silently truncated)."""
    keep = []
    for e in examples:
        if e.positions > max_len:
            stats.skip(f"over-long {what} (> {max_len} tokens)")
        else:
            keep.append(e)
    stats.kept = len(keep)
    return keep


def _prompt_ids(tok, r):
    return tok.apply_chat(r.get("messages") or [{"role": "user", "content": r["prompt"]}])


def sft_examples(tok, rows, max_len, stats):
    """rows: {"messages", "completion"} or {"prompt", "completion"} or pairs (trained on chosen)."""
    ex = []
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        text = r["completion"] if "completion" in r else r["chosen"]
        ex.append(Example(_prompt_ids(tok, r), completion_ids(tok, text)))
    return drop_over_long(ex, max_len, stats, "example")


def pair_examples(tok, rows, max_len, stats):
    """DPO / BT: rows (dicts or Pair) with "messages" or "prompt", "chosen", "rejected"."""
    ex = []
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        ex.append(Example(_prompt_ids(tok, r), completion_ids(tok, r["chosen"]),
                          completion_ids(tok, r["rejected"])))
    return drop_over_long(ex, max_len, stats, "pair")
