"""online.py: pairs and rewards from hand-made judgements, a loop step against DPO by hand,
determinism under batch sizes, resume after a kill, and torchrun on 2 CPU ranks (issue 27).
Run as a script (`tests/test_online.py worker DIR`) it is the torchrun worker."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import online  # noqa: E402
import rewards  # noqa: E402
import world  # noqa: E402
from conftest import run_workers  # noqa: E402
from data import load_tokenizer  # noqa: E402
from files import write_jsonl  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402


def rec(i, j, a, verdict, forced=False, failed=None):
    return {"i": i, "j": j, "a": a, "verdict": verdict, "forced": forced, "failed": failed, "rationale": ""}


# Three distinct answers, both orders of each pair:
#   (0, 1): both orders prefer 0                       -> agreed
#   (0, 2): 0 as A wins; 2 as A fails (no verdict)     -> masked, 0 wins the pooled vote only
#   (1, 2): 1 as A wins (forced); 2 as A wins          -> the orders disagree (position bias)
HAND = [rec(0, 1, 0, "A"), rec(0, 1, 1, "B"),
        rec(0, 2, 0, "A"), rec(0, 2, 2, None, failed="no verdict"),
        rec(1, 2, 1, "A", forced=True), rec(1, 2, 2, "A")]


def test_pairs_from_hand_made_judgements():
    assert rewards.preference_pairs(3, HAND, "agree") == [(0, 1)]
    assert rewards.preference_pairs(3, HAND, "pooled") == [(0, 1), (0, 2)]
    # A pair whose every judgement failed is no pair under either rule: never mapped to an answer.
    failed = [rec(0, 1, 0, None, failed="no verdict"), rec(0, 1, 1, None, failed="over-long")]
    assert rewards.preference_pairs(2, failed, "agree") == rewards.preference_pairs(2, failed, "pooled") == []
    # One order failed, the other says B: the failure is masked; "agree" wants every order valid.
    half = [rec(0, 1, 0, None, failed="no verdict"), rec(0, 1, 1, "B")]
    assert (rewards.preference_pairs(2, half, "agree") == []
            and rewards.preference_pairs(2, half, "pooled") == [(0, 1)])
    with pytest.raises(ValueError, match="unknown pair rule"):
        rewards.preference_pairs(3, HAND, "majority")


def test_rewards_from_hand_made_judgements():
    r = rewards.answer_rewards(3, HAND)
    # p = (wins + 1/2) / (valid + 1): (0,1) 2.5/3, (0,2) 1.5/2 (the failure masked), (1,2) 1.5/3
    l01, l02, l12 = math.log(5), math.log(3), 0.0
    want = [(l01 + l02) / 2, (-l01 + l12) / 2, (-l02 - l12) / 2]
    assert all(math.isclose(x, y, abs_tol=1e-12) for x, y in zip(r["eq6"], want))
    assert r["winrate"] == [1.0, 0.25, 0.25]
    assert rewards.reward_pair(r["eq6"]) == [(0, 1)] and rewards.reward_pair(r["winrate"]) == [(0, 1)]
    assert rewards.reward_pair([0.3, 0.3]) == [] and rewards.reward_pair([0.0]) == []
    # Every judgement of a pair failed: the pair gives neither answer anything (a lone answer's values).
    dead = rewards.answer_rewards(2, [rec(0, 1, 0, None, failed="no verdict"),
                                     rec(0, 1, 1, None, failed="over-long")])
    assert dead == {"eq6": [0.0, 0.0], "winrate": [0.5, 0.5]}
    # The Bradley-Terry RM: p = sigmoid(r_i - r_j), so Eq. 6 is the score difference itself.
    bt = rewards.answer_rewards(2, rewards.judge_by_scores([[1.5, -0.5]], [["x", "y"]], True, 0, 1, ["q"])[0],
                               scores=[1.5, -0.5])
    assert bt["eq6"] == [2.0, -2.0] and bt["winrate"] == [1.0, 0.0]


def test_judgement_stats_count_failures_forced_agreement_and_position():
    s = rewards.judgement_stats([HAND])
    assert s["judgements"] == 6
    assert math.isclose(s["failure_rate"], 1 / 6) and math.isclose(s["forced_rate"], 1 / 6)
    assert s["order_agreement"] == 0.5   # (0,1) agrees, (1,2) does not, (0,2) has a failed order
    assert s["a_rate"] == 4 / 5          # of the 5 verdicts, 4 are "A"


def test_truth_judgements_tie_two_wrong_answers():
    texts = [["57", "47", "99"]]          # the truth is 57
    truth = [[float(t == "57") for t in texts[0]]]
    recs = rewards.judge_by_scores(truth, texts, True, 0, 1, ["q"])[0]
    assert len(recs) == 6 and all(not r["failed"] for r in recs)
    assert rewards.preference_pairs(3, recs, "agree") == [(0, 1), (0, 2)]  # (1, 2): both wrong, a tie
    assert rewards.answer_rewards(3, recs)["winrate"] == [1.0, 0.25, 0.25]


def test_identical_answers_are_one_answer_and_not_judged():
    texts, of = online.unique_answers([{"text": t} for t in ["5", "7", "5", "5"]])
    assert texts == ["5", "7"] and of == [0, 1, 0, 0]
    # One pair, two orders; none for "b".
    assert len(rewards.judge_items([texts, ["5"]], True, 0, 1, ["a", "b"])) == 2


def test_step_prompts_cycle_and_depend_only_on_the_step():
    a = [online.step_prompts(10, s, 4, 0) for s in range(5)]
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))   # a pass covers the pool once
    assert online.step_prompts(10, 3, 4, 0) == a[3] and online.step_prompts(10, 3, 4, 1) != a[3]


def test_world_policy_task():
    assert world.true_answer("743+985") == world.lsb(347 + 589) == "639"
    rng = __import__("random").Random(0)
    assert world.sloppy_sum(347, 589, rng, 0.0) == "639"        # nothing dropped: the sum
    assert world.sloppy_sum(347, 589, rng, 1.0) == "628"        # every carry dropped: 7+9=6, 4+8=2, 3+5=8
    tr, ho = world.policy_questions(300, 0, "train"), world.policy_questions(300, 0, "id")
    assert not {r["question"] for r in tr} & {r["question"] for r in ho}
    assert len({r["question"] for r in tr}) == 300
    assert all(r["answer"] == world.true_answer(r["question"]) for r in ho)


# ----------------------------------------------------------------------------------------------
# tiny models with the world's tokenizer (one token per character)

def tiny(directory, seed, score_head=False):
    directory = Path(directory)
    world.write_tokenizer(directory / "tokenizer.json")
    tok = load_tokenizer(directory)
    torch.manual_seed(seed)
    m = Llama(LlamaConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eot_id, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                          intermediate_size=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=True, max_position_embeddings=256, score_head=score_head))
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.3) if "norm" not in n else p.uniform_(0.5, 1.5)
    m.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("online")
    prompts = d / "prompts.jsonl"
    write_jsonl(prompts, [{"id": r["id"], "prompt": r["question"], "chosen": r["answer"], "rejected": "0"}
                          for r in world.policy_questions(12, 0, "train")])
    return {"policy": tiny(d / "policy", 1), "ref": tiny(d / "ref", 2),
            "bt": tiny(d / "bt", 3, score_head=True), "cot": tiny(d / "cot", 4), "prompts": str(prompts),
            "dir": d}


def config(models, **kw):
    base = dict(policy=models["policy"], prompts=models["prompts"], judge="bt", judge_model=models["bt"],
                steps=3, prompts_per_step=4, samples=4, max_new_tokens=4, judge_max_new_tokens=12,
                dtype="float32", save_every=1, micro_batch=3, lr=1e-2, warmup_steps=1)
    base.update(kw)
    return online.OnlineConfig(**base)


def step_rows(cfg, models, step=1):
    tok = load_tokenizer(models["policy"])
    policy = Llama.from_pretrained(models["policy"]).eval()
    judge_dir = models["bt"] if cfg.judge == "bt" else models["cot"]
    judge = Llama.from_pretrained(judge_dir, score_head=True if cfg.judge == "bt" else None).eval()
    rows = online.load_prompts(cfg, "train")[:cfg.prompts_per_step]
    return policy, tok, online.online_step(policy, judge, tok, tok, rows, cfg, step)


def test_loop_step_equals_a_dpo_step_built_by_hand(models):
    cfg = config(models)
    policy, tok, (rows, examples, m) = step_rows(cfg, models)
    assert examples and m["pairs"] == len(examples) == sum(len(r["pairs"]) for r in rows)
    ref = Llama.from_pretrained(models["ref"]).eval()
    online.reference_logps(ref, examples, tok.pad_id, cfg.micro_batch, bf16=False)
    policy.train()
    loss, _ = online.dpo_gradients(policy, examples, tok.pad_id, cfg)
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}

    # By hand: each pair's chosen and rejected answer (the tokens the policy sampled) after the
    # prompt as separate sequences, summed log-probs, Eq. 9's loss averaged over the pairs.
    hand = Llama.from_pretrained(models["policy"]).train()

    def logp(model, prompt, answer):
        ids = torch.tensor([prompt + answer])
        lp = F.log_softmax(model(ids)[0, len(prompt) - 1:-1], -1)
        return lp.gather(1, torch.tensor(answer)[:, None]).sum()
    losses = []
    for row in rows:
        prompt = tok.apply_chat([{"role": "user", "content": row["question"]}])  # the prompts' user turn
        for w, l in row["pairs"]:
            with torch.no_grad():
                rw, rl = logp(ref, prompt, sample_ids(row, w)), logp(ref, prompt, sample_ids(row, l))
            h = (logp(hand, prompt, sample_ids(row, w)) - rw) - (logp(hand, prompt, sample_ids(row, l)) - rl)
            losses.append(-F.logsigmoid(cfg.beta * h))
    want = torch.stack(losses).mean()
    want.backward()
    assert abs(loss - want.item()) < 1e-5
    for n, p in hand.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def sample_ids(row, u):
    """The sampled token ids of unique answer u of a step row (its first sample)."""
    return row["ids"][row["sample_of"].index(u)]


def test_step_rows_keep_the_sampled_ids(models):
    _, tok, (rows, examples, _) = step_rows(config(models), models)
    for row in rows:
        for k, u in enumerate(row["sample_of"]):
            assert tok.decode(row["ids"][k]) == row["answers"][u]


def test_same_pairs_rewards_and_update_for_any_batch_size(models):
    a = step_rows(config(models, sample_batch=1, micro_batch=1), models)
    b = step_rows(config(models, sample_batch=8, micro_batch=64), models)
    (pa, tok, (ra, ea, _)), (pb, _, (rb, eb, _)) = a, b
    assert [r["answers"] for r in ra] == [r["answers"] for r in rb]
    assert [r["pairs"] for r in ra] == [r["pairs"] for r in rb]
    for x, y in zip(ra, rb):
        assert all(math.isclose(u, v, abs_tol=1e-5) for u, v in zip(x["rewards"]["eq6"], y["rewards"]["eq6"]))
    ref = Llama.from_pretrained(models["ref"]).eval()
    grads = []
    for policy, ex, mb in ((pa, ea, 1), (pb, eb, 64)):
        online.reference_logps(ref, ex, tok.pad_id, mb, bf16=False)
        policy.train()
        loss, _ = online.dpo_gradients(policy, ex, tok.pad_id, config(models, micro_batch=mb))
        grads.append((loss, torch.cat([p.grad.flatten() for p in policy.parameters()])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6 and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_cot_judge_step_counts_forced_and_failures(models):
    """A random tiny CoT judge rarely writes a verdict: forced ones are counted (argmax), or with
    --force none every missing verdict is a failure that makes no pair."""
    forced = step_rows(config(models, judge="cot", judge_model=models["cot"], force="argmax"), models)[2]
    none = step_rows(config(models, judge="cot", judge_model=models["cot"], force="none"), models)[2]
    assert forced[2]["forced_rate"] > 0.5 and forced[2]["failure_rate"] == 0.0
    assert none[2]["failure_rate"] > 0.5 and none[2]["forced_rate"] == 0.0
    for row in none[0]:
        for w, l in row["pairs"]:  # any pair rests on judgements that named a winner
            assert any(rewards.winner_of(r) == w for r in row["judgements"] if {r["i"], r["j"]} == {w, l})


def test_over_long_judge_inputs_are_failures(models):
    cfg = config(models, judge="cot", judge_model=models["cot"], judge_max_new_tokens=250)
    m = step_rows(cfg, models)[2][2]
    assert m["failure_rate"] == 1.0 and m["pairs"] == 0


def params(path):
    return torch.cat([p.detach().flatten() for p in Llama.from_pretrained(path).parameters()])


def metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_after_a_kill_equals_an_uninterrupted_run(models, monkeypatch):
    whole = models["dir"] / "whole"
    online.run(config(models, out=str(whole)), whole, log=print)
    killed = models["dir"] / "killed"
    real = online.online_step

    def dies_at_step_3(*args):
        if args[-1] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args)
    monkeypatch.setattr(online, "online_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        online.run(config(models, out=str(killed)), killed, log=print)
    assert (killed / "latest").read_text() == "ckpt-000002" and not (killed / "policy").exists()
    monkeypatch.setattr(online, "online_step", real)
    with pytest.raises(SystemExit, match="not empty"):
        online.run(config(models, out=str(killed)), killed, log=print)
    with pytest.raises(SystemExit, match="--lr 0.01 -> 0.02"):
        online.run(config(models, out=str(killed), resume=True, lr=2e-2), killed, log=print)
    online.run(config(models, out=str(killed), resume=True), killed, log=print)
    assert torch.equal(params(whole / "policy"), params(killed / "policy"))
    assert metrics(whole) == metrics(killed) and len(metrics(whole)) == 3
    for k in (1, 2, 3):  # each step's artefact: the same answers, judgements and pairs
        assert ((whole / "steps" / f"{k:06d}.jsonl").read_text()
                == (killed / "steps" / f"{k:06d}.jsonl").read_text())
    assert not list(killed.glob("ckpt-*")) and not list(killed.glob(".*.tmp"))
    # A finished run resumed does nothing again.
    again = online.run(config(models, out=str(killed), resume=True), killed, log=print)
    assert again["steps"]["steps"] == 3 and torch.equal(params(killed / "policy"), params(whole / "policy"))


def test_world_run_reports_the_paired_change(models, monkeypatch, tmp_path):
    """The small world's path with the truth as reward (its policy stood in for by a tiny one):
    before / after accuracies and the paired line."""
    monkeypatch.setattr(online, "world_policy", lambda *_: models["policy"])
    lines = []
    cfg = online.OnlineConfig(judge="truth", steps=2, prompts_per_step=4, samples=4, train_questions=20,
                              eval_questions=30, max_new_tokens=4, save_every=0)
    rep = online.run(replace(cfg, out=str(tmp_path / "w")), tmp_path / "w", log=lines.append)
    assert math.isclose(rep["after_minus_before"]["diff"],
                        rep["after"]["accuracy"] - rep["before"]["accuracy"])
    line = next(x for x in lines if x.startswith("[policy after - before]"))
    assert "paired bootstrap over 30 held-out questions, p " in line
    m = metrics(tmp_path / "w")
    assert len(m) == 2 and all("sampled_accuracy" in r and "judge_truth_accuracy" in r for r in m)


def test_train_py_method_online_dpo_is_online_main(models, monkeypatch, tmp_path):
    """`train.py --method online_dpo ARGS` runs online.py's loop with ARGS: the same steps and
    policy as `online.py ARGS`."""
    import train
    monkeypatch.setattr(online, "world_policy", lambda *_: models["policy"])
    args = ["--judge", "truth", "--steps", "2", "--prompts-per-step", "4", "--samples", "4",
            "--train-questions", "20", "--eval-questions", "10", "--max-new-tokens", "4", "--save-every", "0",
            "--no-progress"]
    via_train = train.main(["--method", "online_dpo", *args, "--out", str(tmp_path / "t")])
    direct = online.main([*args, "--out", str(tmp_path / "o")])
    assert via_train["after"] == direct["after"] and via_train["steps"]["pairs"] == direct["steps"]["pairs"]
    assert ((tmp_path / "t" / "steps" / "000002.jsonl").read_text()
            == (tmp_path / "o" / "steps" / "000002.jsonl").read_text())
    assert train._without_method(["--method=online_dpo", "--steps", "3"]) == ["--steps", "3"]
    assert not train._asks_online(["--method", "star_dpo"]) and train._asks_online(["--method=online_dpo"])


def test_help_and_defaults():
    cfg = online.parse_args([])
    assert cfg.world and cfg.judge == "trained" and cfg.online_reward == "pairs" and cfg.both_orders
    assert cfg.dtype == "float32"
    real = online.parse_args(["--prompts", "x.jsonl"])
    assert real.dtype == "bfloat16" and real.max_new_tokens == 48
    with pytest.raises(SystemExit):
        online.parse_args(["--policy", "p"])  # a policy without --prompts


# ----------------------------------------------------------------------------------------------
# torchrun: 2 CPU ranks give one process's pairs, rewards and policy

def launch(tmp, nproc, case):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "worker", str(tmp), case]
    run_workers(cmd)


def worker(tmp, case):
    import dist
    dist.init()
    models = json.loads((Path(tmp) / "models.json").read_text())
    judge = {"judge": "cot", "judge_model": models["cot"]} if case == "cot" else {}
    out = Path(tmp) / f"{case}_{dist.world()}"
    online.run(config(models, out=str(out), steps=2, **judge), out,
               log=print if dist.rank() == 0 else online.silent)
    dist.finish()


@pytest.mark.parametrize("case", ["bt", "cot"])
def test_two_ranks_same_pairs_rewards_and_policy(models, case):
    tmp = models["dir"]
    (tmp / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    launch(tmp, 1, case)
    launch(tmp, 2, case)
    one, two = tmp / f"{case}_1", tmp / f"{case}_2"
    for k in (1, 2):
        a = [json.loads(x) for x in (one / "steps" / f"{k:06d}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (two / "steps" / f"{k:06d}.jsonl").read_text().splitlines()]
        assert [r["answers"] for r in a] == [r["answers"] for r in b]
        assert [r["judgements"] for r in a] == [r["judgements"] for r in b]
        assert [r["pairs"] for r in a] == [r["pairs"] for r in b]
        for x, y in zip(a, b):
            assert all(math.isclose(u, v, abs_tol=1e-5)
                       for u, v in zip(x["rewards"]["eq6"], y["rewards"]["eq6"]))
    assert torch.allclose(params(one / "policy"), params(two / "policy"), atol=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3])
