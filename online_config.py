"""online.py's configuration: the OnlineConfig of a run, its command line (also reached through
`train.py --method online_dpo`) and what a resume may change.
"""
import argparse
from dataclasses import asdict, dataclass, fields

from cli import HelpFormatter, number
from files import DEFAULT_MODEL

JUDGES = ("trained", "base", "bt", "truth")
REWARDS = ("pairs", "eq6", "winrate")


@dataclass
class OnlineConfig:
    """Everything an online run is told; written to args.json."""
    judge: str = "trained"            # reward source, JUDGES
    judge_model: str | None = None    # the judge's model directory (default: per --judge)
    policy: str | None = None         # None: the small world's pretrained policy
    prompts: str | None = None        # pair JSONL whose prompts are asked (None: the world's questions)
    out: str | None = None
    resume: bool = False
    # the loop
    steps: int = 60
    prompts_per_step: int = 32
    samples: int = 4                  # answers sampled per prompt
    online_reward: str = "pairs"      # REWARDS
    pair_rule: str = "agree"          # pairs: "agree" (every order) or "pooled" (more valid votes)
    both_orders: bool = True
    force: str = "argmax"             # a missing verdict: forced from P(A) vs P(B), or "none": a failure
    judge_samples: int = 1            # CoT rationales per (pair, order), each one judgement
    judge_max_new_tokens: int = 96
    max_new_tokens: int = 8           # the policy's answer cap
    temperature: float = 1.0
    top_p: float = 1.0
    # DPO
    lr: float = 1e-4                  # at 5e-4 the trained judge was hacked within 10 steps (RESULTS.md)
    beta: float = 0.1
    dpo_nll: float = 0.0
    warmup_steps: int = 5
    clip: float = 1.0
    micro_batch: int = 64             # pairs per forward; the step's loss is the mean over all its pairs
    # data
    train_questions: int = 5000       # the small world's question pool (cycled, reshuffled per pass)
    eval_questions: int = 500         # held-out questions for the before / after accuracy
    limit: int | None = None          # real prompts: a seeded subset
    # runtime
    seed: int = 0
    save_every: int = 5
    device: str = "cpu"
    dtype: str = "float32"            # bfloat16: sample in bf16, train under bf16 autocast
    threads: int | None = None
    sample_batch: int = 64            # prompts per sampling batch
    no_progress: bool = False

    @property
    def world(self) -> bool:
        return self.policy is None and self.prompts is None


# fields a resume may change: they do not change what the run computes
RESUME_FREE = ("out", "resume", "device", "threads", "no_progress", "save_every", "sample_batch")



def _resume_conflicts(cfg: OnlineConfig, old: dict) -> list:
    """The arguments of cfg that differ from the run's args.json and would change what it computes."""
    new, default = asdict(cfg), asdict(OnlineConfig())
    return [f"--{k.replace('_', '-')} {old.get(k, default[k])} -> {v}" for k, v in new.items()
            if k not in RESUME_FREE and old.get(k, default[k]) != v]


def add_arguments(ap, D: OnlineConfig = OnlineConfig()):
    """The online loop's options, on an argparse parser (online.py's own, or train.py's)."""
    g = ap.add_argument_group("online DPO")
    g.add_argument("--judge", choices=JUDGES, default=D.judge,
                   help="reward source: the small world's trained STaR-DPO judge, its base CoT judge, "
                        "a Bradley-Terry RM, or the ground truth (outside the world: trained/base = the "
                        "CoT judge --judge-model)")
    g.add_argument("--judge-model", default=D.judge_model,
                   help="the judge's model directory (default: per --judge; "
                        f"outside the small world {DEFAULT_MODEL})")
    g.add_argument("--policy", default=D.policy,
                   help="policy model directory or name (default: the small world's "
                        f"pretrained policy; with --prompts, {DEFAULT_MODEL})")
    g.add_argument("--prompts", default=D.prompts,
                   help="pair JSONL whose prompts the policy answers (default: the "
                        "small world's questions)")
    g.add_argument("--steps", type=number(int, 1), default=D.steps, help="online steps (one DPO update each)")
    g.add_argument("--prompts-per-step", type=number(int, 1), default=D.prompts_per_step,
                   help="prompts per step")
    g.add_argument("--samples", type=number(int, 2), default=D.samples, help="answers sampled per prompt")
    g.add_argument("--online-reward", choices=REWARDS, default=D.online_reward,
                   help="pairs: DPO pairs from the pairwise judgements (--pair-rule); eq6: Eq. 6's "
                        "log(p/(1-p)) per answer, pooled over both orders; winrate: round-robin win rate "
                        "per answer (eq6/winrate: the best answer over the worst)")
    g.add_argument("--pair-rule", choices=("agree", "pooled"), default=D.pair_rule,
                   help="pairs: a pair when every order names the same winner, or when the pooled valid "
                        "judgements prefer one answer")
    g.add_argument("--both-orders", action=argparse.BooleanOptionalAction, default=D.both_orders,
                   help="judge each pair with each answer as A (else one seeded order)")
    g.add_argument("--force", choices=("argmax", "none"), default=D.force,
                   help="a rationale without a verdict: force one from P(A) vs P(B) (counted), or none: "
                        "a masked failure (counted)")
    g.add_argument("--judge-samples", type=number(int, 1), default=D.judge_samples,
                   help="CoT rationales per pair and order, each a judgement")
    g.add_argument("--judge-max-new-tokens", type=number(int, 1), default=D.judge_max_new_tokens,
                   help="rationale length cap")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=D.max_new_tokens,
                   help="policy answer length cap")
    g.add_argument("--temperature", type=number(float, above=0), default=D.temperature,
                   help="policy sampling")
    g.add_argument("--top-p", type=number(float, above=0, high=1), default=D.top_p,
                   help="policy sampling nucleus")
    g.add_argument("--lr", type=number(float, above=0), default=D.lr, help="policy learning rate (AdamW)")
    g.add_argument("--beta", type=number(float, above=0), default=D.beta, help="DPO beta")
    g.add_argument("--dpo-nll", type=number(float, 0), default=D.dpo_nll,
                   help="RPO: weight of the chosen NLL")
    g.add_argument("--warmup-steps", type=number(int, 0), default=D.warmup_steps,
                   help="linear warmup, then constant")
    g.add_argument("--clip", type=number(float, above=0), default=D.clip, help="gradient-norm clip")
    g.add_argument("--micro-batch", type=number(int, 1), default=D.micro_batch,
                   help="pairs per forward (the update is the same for any value)")
    g.add_argument("--train-questions", type=number(int, 1), default=D.train_questions,
                   help="small world: the pool of training questions")
    g.add_argument("--eval-questions", type=number(int, 1), default=D.eval_questions,
                   help="small world: held-out questions for the before/after accuracy")
    g.add_argument("--limit", type=number(int, 1), default=D.limit, help="--prompts: a seeded subset")
    g.add_argument("--save-every", type=number(int, 0), default=D.save_every,
                   help="checkpoint every N steps (and at the end)")
    g.add_argument("--sample-batch", type=number(int, 1), default=D.sample_batch,
                   help="prompts per sampling batch")
    return ap


def parse_args(argv=None, description=None) -> OnlineConfig:
    """online.py's command line (description: its --help text) -> the OnlineConfig of the run."""
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default runs/online_dpo_<judge>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint")
    add_arguments(ap)
    g = ap.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every draw (prompts, answers, orders, rationales)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16: sample in bf16, train under bf16 autocast (default: float32 in the "
                        "small world, bfloat16 with real models)")
    g.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true",
                   help="(no progress bars are drawn; kept for train.py's flags)")
    a = vars(ap.parse_args(argv))
    if a["dtype"] is None:
        a["dtype"] = "float32" if a["policy"] is None and a["prompts"] is None else "bfloat16"
    if a["policy"] is not None and a["prompts"] is None:
        ap.error("argument --policy: needs --prompts (the small world's questions need its own policy)")
    if a["prompts"] is not None and a["max_new_tokens"] == OnlineConfig.max_new_tokens:
        a["max_new_tokens"] = 48  # real answers are longer than a sum
    known = {f.name for f in fields(OnlineConfig)}
    return OnlineConfig(**{k: v for k, v in a.items() if k in known})
