"""Differential tests against TRL's own code (requirements-oracle.txt; skipped where TRL is not
installed), on a tiny random Llama-3.1 in float32 and the same token ids on both sides:

- DPO: TRL's `DPOTrainer._compute_loss` (its collator, its fused log-probs, its loss and logged
  rewards) against our packed `pair_logps` + `losses.dpo_loss` and against oracle.py's dump;
  sigmoid, IPO (per-token averages, as TRL) and label smoothing, where TRL 1.16's `sigmoid`
  ignores `label_smoothing` (our cDPO is its own formula) and its `robust` loss is a third one;
- SFT: `SFTTrainer.train` for one optimizer step of two micro-batches: TRL divides each micro-batch's
  summed NLL by the step's token count (`num_items_in_batch`), which is our token mean; the
  per-micro-batch mean it would give without that count differs.
"""
import json

import pytest
import torch

import oracle
from conftest import tiny_model
from data import Example
from kernels import pair_logps
from losses import dpo_loss, step_sft

trl = pytest.importorskip("trl", reason="not installed (requirements-oracle.txt)")
transformers = pytest.importorskip("transformers", reason="not installed (requirements-oracle.txt)")
datasets = pytest.importorskip("datasets", reason="not installed (requirements-oracle.txt)")
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

EOS = 2
BETA = 0.1


def _tokenizer():
    """A word-level HF tokenizer for the tiny model: '<i>' is token i, so text and ids map 1:1 and
    TRL's own tokenization gives exactly our ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(300)}, unk_token="<0>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"<{EOS}>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=eos)


def _text(ids):
    return " ".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def pairs_setup(tmp_path_factory):
    """Policy and reference checkpoints and 3 pairs of different lengths; completions end in EOS,
    as both TRL and data.completion_ids write them."""
    d = tmp_path_factory.mktemp("trl")
    tiny_model(seed=21).save_pretrained(d / "policy")
    tiny_model(seed=22).save_pretrained(d / "ref")
    g = torch.Generator().manual_seed(23)

    def ids(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()
    pairs = [(ids(5), ids(6) + [EOS], ids(2) + [EOS]), (ids(8), ids(3) + [EOS], ids(9) + [EOS]),
             (ids(3), ids(4) + [EOS], ids(4) + [EOS])]
    return d, pairs


def _trl_dpo(d, pairs, **config):
    """TRL's numbers per pair (a batch of one pair each) and the loss of all pairs in one padded
    batch: DPOTrainer built on the HF checkpoints, its `_compute_loss` called on its own collated
    batches, rewards and log-probs read from the metrics it logs."""
    load = transformers.LlamaForCausalLM.from_pretrained
    tok = _tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": _text(p) + " ", "chosen": _text(c), "rejected": _text(r)}
                                     for p, c, r in pairs])
    args = trl.DPOConfig(output_dir=str(d / "out"), report_to="none", use_cpu=True, bf16=False, beta=BETA,
                         **config)
    tr = trl.DPOTrainer(model=load(str(d / "policy"), dtype=torch.float32),
                        ref_model=load(str(d / "ref"), dtype=torch.float32), args=args, train_dataset=ds,
                        processing_class=tok)
    examples = [tr.train_dataset[i] for i in range(len(pairs))]
    assert [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples] == pairs
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    per_pair = []
    with torch.no_grad():
        for e in examples:
            loss = tr._compute_loss(tr.model, collate([e]), return_outputs=False).item()
            m = tr._metrics["eval"]  # the model is in eval mode, so TRL logs under "eval"
            per_pair.append({"loss": loss, "logp_w": m["logps/chosen"][-1], "logp_l": m["logps/rejected"][-1],
                             "reward_w": m["rewards/chosen"][-1], "reward_l": m["rewards/rejected"][-1]})
        batch_loss = tr._compute_loss(tr.model, collate(examples), return_outputs=False).item()
    return per_pair, batch_loss


def _ours(d, pairs, average=False):
    """Our policy and reference log-probs (the packed training path) [B] each: (pw, pl, rw, rl)."""
    from model import Llama
    ex = [Example(p, c, r) for p, c, r in pairs]
    out = []
    with torch.no_grad():
        for name in ("policy", "ref"):
            out += pair_logps(Llama.from_pretrained(d / name).eval(), ex, EOS, average=average)
    return out


def test_dpo_sigmoid_logps_rewards_losses_match_trl(pairs_setup, tmp_path):
    d, pairs = pairs_setup
    trl_pairs, trl_batch = _trl_dpo(d, pairs, loss_type=["sigmoid"])
    pw, pl, rw, rl = _ours(d, pairs)
    ours = dpo_loss(pw, pl, rw, rl, beta=BETA)
    for i, t in enumerate(trl_pairs):
        assert t["logp_w"] == pytest.approx(pw[i].item(), abs=1e-4)
        assert t["logp_l"] == pytest.approx(pl[i].item(), abs=1e-4)
        assert t["reward_w"] == pytest.approx(BETA * (pw[i] - rw[i]).item(), abs=1e-5)
        assert t["reward_l"] == pytest.approx(BETA * (pl[i] - rl[i]).item(), abs=1e-5)
        assert t["loss"] == pytest.approx(ours[i].item(), abs=1e-5)
    assert trl_batch == pytest.approx(ours.mean().item(), abs=1e-5)  # TRL's right-padded batch: the same mean
    # oracle.py's dump carries the same quantities
    rows = [{"id": str(i), "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for i, (p, c, r) in enumerate(pairs)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main(["--model", str(d / "policy"), "--ref", str(d / "ref"), "--data",
                        str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-float64"]) == 0
    dump = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    for t, row in zip(trl_pairs, dump):
        assert row["loss"] == pytest.approx(t["loss"], abs=1e-5)
        assert row["chosen_reward"] == pytest.approx(t["reward_w"], abs=1e-5)
        assert row["rejected_reward"] == pytest.approx(t["reward_l"], abs=1e-5)
        assert row["chosen"]["logprob_sum"] == pytest.approx(t["logp_w"], abs=1e-4)


def test_ipo_matches_trl_on_token_averaged_logprobs_not_sums(pairs_setup):
    d, pairs = pairs_setup
    trl_pairs, _ = _trl_dpo(d, pairs, loss_type=["ipo"])
    on_avg = dpo_loss(*_ours(d, pairs, average=True), beta=BETA, loss_type="ipo")
    on_sums = dpo_loss(*_ours(d, pairs), beta=BETA, loss_type="ipo")  # OpenRLHF's IPO: the formula on sums
    for i, t in enumerate(trl_pairs):
        assert t["loss"] == pytest.approx(on_avg[i].item(), rel=1e-5)
        assert abs(t["loss"] - on_sums[i].item()) > 0.1  # the convention shows: sums give another loss


def test_label_smoothing_conventions_differ_from_trl(pairs_setup):
    """TRL 1.16's `sigmoid` loss does not read label_smoothing (it gives plain DPO), while ours is
    cDPO, -(1-e) log sig(beta h) - e log sig(-beta h); TRL's `robust` loss (Chowdhury et al.) is
    ((1-e) L(h) - e L(-h)) / (1 - 2e) in terms of the plain loss L."""
    d, pairs = pairs_setup
    eps = 0.2
    pw, pl, rw, rl = _ours(d, pairs)
    plain = dpo_loss(pw, pl, rw, rl, beta=BETA)
    flipped = dpo_loss(pl, pw, rl, rw, beta=BETA)  # the same pair with the preference reversed: L(-h)
    cdpo = dpo_loss(pw, pl, rw, rl, beta=BETA, label_smoothing=eps)
    trl_sigmoid, _ = _trl_dpo(d, pairs, loss_type=["sigmoid"], label_smoothing=eps)
    trl_robust, _ = _trl_dpo(d, pairs, loss_type=["robust"], label_smoothing=eps)
    for i in range(len(pairs)):
        assert trl_sigmoid[i]["loss"] == pytest.approx(plain[i].item(), abs=1e-5)
        assert abs(trl_sigmoid[i]["loss"] - cdpo[i].item()) > 1e-3
        robust = ((1 - eps) * plain[i] - eps * flipped[i]) / (1 - 2 * eps)
        assert trl_robust[i]["loss"] == pytest.approx(robust.item(), abs=1e-5)
        assert abs(trl_robust[i]["loss"] - cdpo[i].item()) > 1e-3


def test_sft_loss_is_the_token_mean_over_the_optimizer_step(tmp_path):
    tiny_model(seed=24).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(25)
    def ids(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()
    rows = [(ids(5), ids(3) + [EOS]), (ids(4), ids(11) + [EOS])]
    ds = datasets.Dataset.from_list([{"prompt": _text(p) + " ", "completion": _text(c)} for p, c in rows])
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                         per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                         learning_rate=0.0, save_strategy="no")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    tr = trl.SFTTrainer(model=hf, args=args, train_dataset=ds, processing_class=_tokenizer())
    seen = []
    trl_compute_loss = tr.compute_loss

    def record(model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's own compute_loss, its result and the token count it was given kept."""
        loss = trl_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        n = (inputs["labels"] != -100).sum().item()
        seen.append((loss.item(), int(num_items_in_batch), n))
        return loss
    tr.compute_loss = record
    tr.train()
    step_tokens = len(rows[0][1]) + len(rows[1][1])  # the step's completion tokens, 4 + 12
    assert sorted(n for _, _, n in seen) == [len(rows[0][1]), len(rows[1][1])]
    assert all(total == step_tokens for _, total, _ in seen)
    from model import Llama
    ex = [Example(p, c) for p, c in rows]
    with torch.no_grad():  # the training path: one micro-batch's loss sum, divided by the step's count
        loss_sum, _ = step_sft(Llama.from_pretrained(tmp_path / "m").eval(), ex, EOS)
    ours = loss_sum.item() / sum(e.loss_terms for e in ex)
    assert sum(loss for loss, _, _ in seen) == pytest.approx(ours, rel=1e-5)
    per_micro_batch = sum(loss * total / n for loss, total, n in seen) / 2
    assert abs(per_micro_batch - ours) > 0.05  # a mean of per-micro-batch means is another number
