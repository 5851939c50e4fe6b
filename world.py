"""The small world: a verifiable judging task small enough to train a judge from scratch in
minutes, so that the paper's methods can be watched working (as nanoGPT's shakespeare_char does
for GPT).

A question is a sum, `a + b`; one answer is right and the other a near miss (a dropped carry or
one digit off by one). The pair goes through the paper's own judge prompts (genrm.judge_messages:
Fig. 6, 7 and 8, word for word) in ChatML. Three choices make it learnable by a 1M-parameter
model in minutes, and they are the world's only departures from the paper's setting:

  * Numbers are written least significant digit first (347 is written 743), in the question, the
    answers and the rationale. A causal model reads a number left to right, so only this order
    lets a digit know its own column; with it every column of the sum is a fixed lookup (the
    "reversed" format of Lee et al., Teaching Arithmetic to Small Transformers, 2023).
  * The tokenizer is one token per character, plus one token for each fixed piece of the prompts
    (each system prompt, each line of the pairwise template, the verdict prefix), so the paper's
    700-character system prompt costs one position.
  * The demonstrations the base judge is pretrained on are deliberately sloppy: a column that
    receives a carry forgets it with probability `drop` (0.75). The base judge therefore learns to
    be right more often than chance but far from always, and STaR has rationales to select.

A rationale works column by column and compares each column's digit with both answers:

    7+9=16 66 AB          column 1: 7 + 9 = 16, digit 6; A's digit 6 and B's 6: both match
    4+8+1=13 32 A         column 2, with the carry: digit 3; only A matches
    3+5+1=9 99 AB
    Final verdict: [[A]]  A matched every column B missed

Splits: `train` and `id` hold operands of 1 to 3 digits and never share a question (a hash of
(a, b) assigns each question to one side). Two levels are out of distribution: `ood` has 4-digit
operands, a length never trained; `ood_errors` has held-out 1-3 digit questions whose wrong answer
is of a kind never trained on (two neighbouring digits swapped, or a digit off by 2 to 5).

    python world.py --n 400 --seed 1 --split id --out id.jsonl
"""
import argparse
import hashlib
import json
import random
from pathlib import Path

import genrm
from data import Pair
from files import atomic_write, cache_dir, write_jsonl

SPLITS = ("train", "id", "ood", "ood_errors")
DIGITS = {"train": (1, 3), "id": (1, 3), "ood": (4, 4), "ood_errors": (1, 3)}  # operand lengths, inclusive
HELDOUT_SHARE = 0.25  # the share of the 1-3 digit questions that only the `id` split draws
DROP = 0.75           # a sloppy demonstration forgets an incoming carry with this probability

# The fixed pieces of the judge prompts as ChatML renders them, each one token: everything between
# the question, the two answers and the judge's reply, for each of the three prompts (Fig. 6-8; the
# rationalizer's request in both orders), then the verdict prefix and, for other renderings, the
# pieces one by one. A piece that contains a shorter one is matched first (longest match).
_START, _USER, _REPLY = ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n",
                         "<|im_end|>\n<|im_start|>assistant\n")
_A, _B, _END = ("\n\n[The Start of Assistant A's Answer]\n",
                "\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n",
                "\n[The End of Assistant B's Answer]")
_ASKS = [genrm.RATIONALIZER_ASK.format(win="A", lose="B"), genrm.RATIONALIZER_ASK.format(win="B", lose="A")]
PROMPT_PIECES = ([_START + system + _USER + "[Chat Context]\n"
                  for system in (genrm.SYSTEM_COT, genrm.SYSTEM_GENRM, genrm.SYSTEM_RATIONALIZER)]
                 + [_END + ask + _REPLY for ask in ["", *_ASKS]] + [_A, _B, genrm.VERDICT_PREFIX]
                 + [genrm.SYSTEM_COT, genrm.SYSTEM_GENRM, genrm.SYSTEM_RATIONALIZER, "[Chat Context]\n", _END,
                    *_ASKS, "system", "user", "assistant"])
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHARACTERS = list("0123456789+=-_ \nAB[]:")


# The base judge's network: about 0.45M parameters (width 96, 4 layers, a vocabulary of 50).
BASE_CONFIG = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=24, intermediate_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=True, max_position_embeddings=256)


# How the base judge is made (train.world_base): the SFT loop from random initialisation on this
# many sloppy demonstrations, one epoch. The cache directory is named by a hash of it, so a
# changed recipe builds a new base and never reuses a stale one.
BASE_RECIPE = dict(config=BASE_CONFIG, demonstrations=64000, drop=DROP, lr=2e-3, batch_size=64, warmup=0.05,
                   seed=0, world_version=1)


def base_dir() -> Path:
    """Where the base judge of BASE_RECIPE is built and kept: $GENRM_CACHE/world/base-<hash>."""
    key = hashlib.sha256(json.dumps(BASE_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "world" / f"base-{key}"


def write_tokenizer(path):
    """A tokenizer.json for the world: one token per character, the prompt pieces and ChatML's
    special tokens (so data.Tokenizer renders the judge conversation in ChatML)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(["<unk>"] + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # decode joins tokens with nothing between them
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False) for t in PROMPT_PIECES])
    with atomic_write(path) as tmp:
        tok.save(tmp)


def write_initial_model(directory, seed: int, config: dict | None = None):
    """A randomly initialised network of shape `config` (default BASE_CONFIG) and the world's
    tokenizer, as an HF-format model directory: the starting point of the base judge's
    pretraining (train.world_base) and, with POLICY_CONFIG, of the policy's."""
    import torch

    from data import load_tokenizer
    from model import Llama, LlamaConfig
    directory = Path(directory)
    write_tokenizer(directory / "tokenizer.json")
    tok = load_tokenizer(directory)
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eot_id, **(config or BASE_CONFIG)))
    with torch.no_grad():  # GPT-2's initialisation: N(0, 0.02) for every matrix, RMSNorm weights at 1
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------
# questions and answers

def lsb(x: int) -> str:
    """A number as the world writes it: least significant digit first (347 -> '743')."""
    return str(x)[::-1]


def carries(a: int, b: int) -> list:
    """carries(a, b)[k] is 1 where column k (0 = units) receives a carry in the sum a + b."""
    out, c = [], 0
    for k in range(len(str(a + b))):
        out.append(c)
        c = (a // 10 ** k % 10 + b // 10 ** k % 10 + c) // 10
    return out


def near_miss(a: int, b: int, rng: random.Random, kinds: tuple = ("carry", "digit")) -> tuple:
    """A wrong answer of the right length: the sum with one carry dropped (a - 10^k), or one
    digit moved by one. Returns (wrong answer, kind), or None where `kinds` is ("carry",) and
    the sum has no carry to drop."""
    right = a + b
    drops = [k for k, c in enumerate(carries(a, b)) if c and len(str(right - 10 ** k)) == len(str(right))]
    if drops and ("digit" not in kinds or rng.random() < 0.5):
        return right - 10 ** rng.choice(drops), "carry"
    if "digit" not in kinds:
        return None
    while True:
        k = rng.randrange(len(str(right)))
        wrong = right + rng.choice((-1, 1)) * 10 ** k
        digit_ok = 0 <= right // 10 ** k % 10 + (wrong - right) // 10 ** k <= 9
        if digit_ok and wrong > 0 and len(str(wrong)) == len(str(right)):
            return wrong, "digit"


def far_miss(a: int, b: int, rng: random.Random) -> tuple:
    """A wrong answer of a kind never trained on (the `ood_errors` split): two neighbouring digits
    swapped, or one digit moved by 2 to 5. Returns (wrong answer, kind)."""
    right = str(a + b)
    swaps = [k for k in range(len(right) - 1) if right[k] != right[k + 1] and (k or right[k + 1] != "0")]
    if swaps and rng.random() < 0.5:
        k = rng.choice(swaps)
        return int(right[:k] + right[k + 1] + right[k] + right[k + 2:]), "swap"
    while True:
        k = rng.randrange(len(right))
        digit = int(right[k]) + rng.choice((-1, 1)) * rng.randint(2, 5)
        if 0 <= digit <= 9 and (k or digit or len(right) == 1):
            return int(right[:k] + str(digit) + right[k + 1:]), "far"


def _heldout(a: int, b: int) -> bool:
    """Whether the question a + b belongs to the held-out side (a stable hash, seed-independent)."""
    h = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return int.from_bytes(h[:4], "big") < HELDOUT_SHARE * 2 ** 32


def _operand(rng, digits):
    n = rng.randint(*digits)
    return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10 ** n)


def make_pairs(n: int, seed: int, split: str, digits: tuple | None = None,
               kinds: tuple = ("carry", "digit")) -> list:
    """n judging pairs of one split, drawn with `seed`: the project's pair rows (id, prompt,
    chosen, rejected, category) plus the world's own fields (a, b, kind). `digits` (lo, hi)
    narrows the operand lengths of the split and `kinds` ("carry",) keeps only dropped-carry
    near misses (a smaller world, for the learning test)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"world:{split}:{seed}")
    rows = []
    while len(rows) < n:
        a, b = _operand(rng, digits or DIGITS[split]), _operand(rng, digits or DIGITS[split])
        if split != "ood" and _heldout(a, b) != (split != "train"):
            continue  # the question belongs to the other side of the train / held-out division
        miss = far_miss(a, b, rng) if split == "ood_errors" else near_miss(a, b, rng, kinds)
        if miss is None:
            continue  # no near miss of the asked kinds for this question
        wrong, kind = miss
        rows.append({"id": f"{split}-{seed}-{len(rows)}", "prompt": f"{lsb(a)}+{lsb(b)}",
                     "chosen": lsb(a + b), "rejected": lsb(wrong), "category": f"{split}:{kind}",
                     "a": a, "b": b, "kind": kind})
    return rows


# ----------------------------------------------------------------------------------------------
# rationales

def rationale(question: str, answer_a: str, answer_b: str, rng: random.Random, drop: float = DROP) -> tuple:
    """A demonstration judgement of `question` ('743+985') between two answers, as the world's
    judge writes it; each incoming carry is forgotten with probability `drop`. Returns (text
    ending in the verdict, verdict letter)."""
    x, y = question.split("+")
    lines, carry, only_a, only_b = [], 0, False, False
    for k in range(max(len(answer_a), len(answer_b))):
        dx, dy = int(x[k]) if k < len(x) else 0, int(y[k]) if k < len(y) else 0
        if carry and rng.random() < drop:
            carry = 0  # the sloppy step: this column forgets the carry it received
        s = dx + dy + carry
        da, db = (ans[k] if k < len(ans) else "_" for ans in (answer_a, answer_b))
        match_a, match_b = da == str(s % 10), db == str(s % 10)
        only_a, only_b = only_a or (match_a and not match_b), only_b or (match_b and not match_a)
        mark = ("A" if match_a else "") + ("B" if match_b else "") or "-"
        lines.append(f"{dx}+{dy}" + ("+1" if carry else "") + f"={s} {da}{db} {mark}")
        carry = s // 10
    # A wins where it matched a column B missed and never the other way round; when the columns
    # contradict each other (or tell nothing apart) the demonstration guesses.
    verdict = "A" if only_a and not only_b else "B" if only_b and not only_a else rng.choice("AB")
    return genrm.with_verdict("\n".join(lines), verdict), verdict


def demonstrations(n: int, seed: int, drop: float = DROP, digits: tuple | None = None,
                   kinds: tuple = ("carry", "digit")) -> list:
    """n SFT rows {"id", "messages", "completion"}: a training-split pair in a seeded A/B order, its
    Fig. 6 judge conversation and a sloppy demonstration rationale ending in its verdict."""
    rng = random.Random(f"world:demo:{seed}")
    rows = []
    for r in make_pairs(n, seed, "train", digits, kinds):
        pair = Pair(id=r["id"], prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
        a_is_chosen = rng.random() < 0.5
        a, b = (pair.chosen, pair.rejected) if a_is_chosen else (pair.rejected, pair.chosen)
        text, _ = rationale(pair.prompt, a, b, rng, drop)
        rows.append({"id": r["id"], "messages": genrm.judge_messages(pair, a_is_chosen, "cot"),
                     "completion": text})
    return rows


def true_rationale(row) -> str:
    """The judgement a careful judge writes for a sample row (its Fig. 6 conversation): no carry
    forgotten, so its verdict is the label (the ceiling control of the comparison)."""
    user = row["messages"][-1]["content"]
    question = user.split("[Chat Context]\n", 1)[1].split("\n", 1)[0]
    a = user.split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n", 1)[0]
    b = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split("\n", 1)[0]
    return rationale(question, a, b, random.Random(0), drop=0.0)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="number of pairs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    ap.add_argument("--split", choices=SPLITS, default="train",
                    help="train / id: 1-3 digit operands, disjoint questions; ood: 4 digits (default train)")
    ap.add_argument("--out", required=True, help="pair JSONL to write")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"argument --n: must be >= 1, got {a.n}")
    rows = make_pairs(a.n, a.seed, a.split)
    write_jsonl(a.out, rows)
    print(f"{a.out}: {len(rows)} {a.split} pairs (seed {a.seed}); first: {json.dumps(rows[0])}")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# the policy task
#
# online.py trains a policy with a judge as its reward. In the small world the policy answers the
# world's own questions: the user turn is the question, the reply is the sum's digits LSB first,
# then end-of-turn. In the policy's user turn each operand is written with three digits, its
# leading zeros included (at the end, LSB first: '8+76' is asked as '800+760', the same sum), so
# that every column sits at a fixed distance from the answer digit it makes: a model trained from
# scratch learns that lookup in a few hundred steps instead of thousands. The judge sees the
# question as the world writes it. The system turn is empty (the world's tokenizer has no letters
# for SmolLM2's default system prompt, which an absent system turn would bring in). The policy
# is pretrained (online.world_policy) by the project's SFT loop from a random initialisation on
# sloppy answers: each incoming carry is forgotten with probability POLICY_DROP, so it samples
# right and wrong answers to the same question and answers about half the held-out questions
# right: partly right, with room to improve.

POLICY_DROP = 0.6
# about 0.2M parameters (width 64, 3 layers); a question and its answer take < 30 positions
POLICY_CONFIG = dict(BASE_CONFIG, hidden_size=64, num_hidden_layers=3, head_dim=16,
                     max_position_embeddings=64)
POLICY_RECIPE = dict(config=POLICY_CONFIG, demonstrations=64000, drop=POLICY_DROP, lr=3e-3, batch_size=64,
                     warmup=0.05, seed=0, world_version=1)


def policy_dir() -> Path:
    """Where the pretrained policy of POLICY_RECIPE is kept: $GENRM_CACHE/world/policy-<hash>."""
    key = hashlib.sha256(json.dumps(POLICY_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "world" / f"policy-{key}"


def policy_messages(question: str) -> list:
    """The policy's conversation for a question: an empty system turn, then the question with
    each operand written with three digits ('8+76' -> '800+760')."""
    width = DIGITS["train"][1]
    padded = "+".join(x.ljust(width, "0") for x in question.split("+"))
    return [{"role": "system", "content": ""}, {"role": "user", "content": padded}]


def sloppy_sum(a: int, b: int, rng: random.Random, drop: float) -> str:
    """a + b written LSB first, column by column, each incoming carry forgotten with probability
    `drop` (the carry out of a column is then that of its sloppy sum, as `rationale` works)."""
    x, y, digits, carry = lsb(a), lsb(b), [], 0
    for k in range(max(len(x), len(y))):
        if carry and rng.random() < drop:
            carry = 0  # the sloppy step: this column forgets the carry it received
        s = (int(x[k]) if k < len(x) else 0) + (int(y[k]) if k < len(y) else 0) + carry
        digits.append(str(s % 10))
        carry = s // 10
    return "".join(digits) + ("1" if carry else "")


def policy_questions(n: int, seed: int, split: str = "train") -> list:
    """n distinct questions of a split (`train` or `id`: the same hash division as make_pairs, so
    the policy is never evaluated on a question it trained on), drawn with `seed`. Rows: {"id",
    "question", "answer" (the true sum, LSB first), "a", "b"}."""
    if split not in ("train", "id"):
        raise ValueError(f"policy_questions: split must be 'train' or 'id', got {split!r}")
    rng, seen, rows = random.Random(f"world:policy:{split}:{seed}"), set(), []
    while len(rows) < n:
        a, b = _operand(rng, DIGITS[split]), _operand(rng, DIGITS[split])
        if _heldout(a, b) != (split == "id") or (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"id": f"q-{split}-{seed}-{len(rows)}", "question": f"{lsb(a)}+{lsb(b)}",
                     "answer": lsb(a + b), "a": a, "b": b})
    return rows


def policy_demonstrations(n: int, seed: int, drop: float = POLICY_DROP) -> list:
    """n SFT rows {"id", "messages", "completion"} for the policy's pretraining: training-split
    questions (repeats allowed) with sloppy answers (sloppy_sum)."""
    rng = random.Random(f"world:policy-demo:{seed}")
    rows = []
    while len(rows) < n:
        a, b = _operand(rng, DIGITS["train"]), _operand(rng, DIGITS["train"])
        if _heldout(a, b):
            continue
        rows.append({"id": f"pd-{seed}-{len(rows)}", "messages": policy_messages(f"{lsb(a)}+{lsb(b)}"),
                     "completion": sloppy_sum(a, b, rng, drop)})
    return rows


def true_answer(question: str) -> str:
    """The right answer to a question ('743+985' -> '8271'), LSB first."""
    x, y = question.split("+")
    return lsb(int(x[::-1]) + int(y[::-1]))


def write_initial_policy(directory, seed: int):
    """A randomly initialised policy network (POLICY_CONFIG) and the world's tokenizer, as an
    HF-format model directory: write_initial_model with the policy's shape."""
    write_initial_model(directory, seed, POLICY_CONFIG)
