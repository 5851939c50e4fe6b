"""online.py's configuration: the OnlineConfig of a run, its command line (also reached through
`train.py --method online_dpo`) and what a resume may change. Every option is declared once, as an
OnlineConfig field (cli.option), and the command line is built from those fields.
"""
import argparse
from dataclasses import asdict, dataclass, fields, replace

from cli import HelpFormatter, add_options, flag_of, number, option
from files import DEFAULT_MODEL

JUDGES = ("trained", "base", "bt", "truth")
REWARDS = ("pairs", "eq6", "winrate")
LOOP, RUNTIME = "online DPO", "runtime"


@dataclass
class OnlineConfig:
    """Everything an online run is told; written to args.json. Each field is one option: its
    default, its --help text and its group."""
    out: str | None = option(None, "run directory (default runs/online_dpo_<judge>)")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    # what is trained and what judges it
    judge: str = option("trained", "reward source: the small world's trained STaR-DPO judge, its base CoT "
                                   "judge, a Bradley-Terry RM, or the ground truth (outside the world: "
                                   "trained/base = the CoT judge --judge-model)", group=LOOP, choices=JUDGES)
    judge_model: str | None = option(None, "the judge's model directory (default: per --judge; outside the "
                                           f"small world {DEFAULT_MODEL})", group=LOOP)
    policy: str | None = option(None, "policy model directory or name (default: the small world's pretrained "
                                      f"policy; with --prompts, {DEFAULT_MODEL})", group=LOOP)
    prompts: str | None = option(None, "pair JSONL whose prompts the policy answers (default: the small "
                                       "world's questions)", group=LOOP)
    # the loop
    steps: int = option(60, "online steps (one DPO update each)", group=LOOP, type=number(int, 1))
    prompts_per_step: int = option(32, "prompts per step", group=LOOP, type=number(int, 1))
    samples: int = option(4, "answers sampled per prompt", group=LOOP, type=number(int, 2))
    online_reward: str = option("pairs", "pairs: DPO pairs from the pairwise judgements (--pair-rule); eq6: "
                                         "Eq. 6's log(p/(1-p)) per answer, pooled over both orders; winrate: "
                                         "round-robin win rate per answer (eq6/winrate: the best answer over "
                                         "the worst)", group=LOOP, choices=REWARDS)
    pair_rule: str = option("agree", "pairs: a pair when every order names the same winner, or when the "
                                     "pooled valid judgements prefer one answer", group=LOOP,
                            choices=("agree", "pooled"))
    both_orders: bool = option(True, "judge each pair with each answer as A (else one seeded order)",
                               group=LOOP, action=argparse.BooleanOptionalAction)
    force: str = option("argmax", "a rationale without a verdict: force one from P(A) vs P(B) (counted), or "
                                  "none: a masked failure (counted)", group=LOOP, choices=("argmax", "none"))
    judge_samples: int = option(1, "CoT rationales per pair and order, each a judgement", group=LOOP,
                                type=number(int, 1))
    judge_max_new_tokens: int = option(96, "rationale length cap", group=LOOP, type=number(int, 1))
    # 8 covers a sum in the small world; parse_args gives real prompts 48 unless the flag is given.
    max_new_tokens: int = option(8, "policy answer length cap", group=LOOP, type=number(int, 1))
    temperature: float = option(1.0, "policy sampling", group=LOOP, type=number(float, above=0))
    top_p: float = option(1.0, "policy sampling nucleus", group=LOOP, type=number(float, above=0, high=1))
    # DPO; at lr 5e-4 the trained judge was hacked within 10 steps (RESULTS.md).
    lr: float = option(1e-4, "policy learning rate (AdamW)", group=LOOP, type=number(float, above=0))
    beta: float = option(0.1, "DPO beta", group=LOOP, type=number(float, above=0))
    dpo_nll: float = option(0.0, "RPO: weight of the chosen NLL", group=LOOP, type=number(float, 0))
    warmup_steps: int = option(5, "linear warmup, then constant", group=LOOP, type=number(int, 0))
    clip: float = option(1.0, "gradient-norm clip", group=LOOP, type=number(float, above=0))
    micro_batch: int = option(64, "pairs per forward (the update is the same for any value)", group=LOOP,
                              type=number(int, 1))
    # data
    train_questions: int = option(5000, "small world: the pool of training questions", group=LOOP,
                                  type=number(int, 1))
    eval_questions: int = option(500, "small world: held-out questions for the before/after accuracy",
                                 group=LOOP, type=number(int, 1))
    limit: int | None = option(None, "--prompts: a seeded subset", group=LOOP, type=number(int, 1))
    save_every: int = option(5, "checkpoint every N steps (and at the end)", group=LOOP, type=number(int, 0))
    sample_batch: int = option(64, "prompts per sampling batch", group=LOOP, type=number(int, 1))
    # runtime
    seed: int = option(0, "seed of every draw (prompts, answers, orders, rationales)", group=RUNTIME,
                       type=int)
    device: str = option("cpu", "cpu or cuda", group=RUNTIME)
    # The command line's default is None, "per world" (parse_args); a config built in code gets float32.
    dtype: str = option("float32", "bfloat16: sample in bf16, train under bf16 autocast (default: float32 "
                                   "in the small world, bfloat16 with real models)", group=RUNTIME,
                        choices=("float32", "bfloat16"))
    threads: int | None = option(None, "torch CPU threads (default: torch's)", group=RUNTIME,
                                 type=number(int, 1))
    no_progress: bool = option(False, "(no progress bars are drawn; kept for train.py's flags)",
                               group=RUNTIME)

    @property
    def world(self) -> bool:
        return self.policy is None and self.prompts is None


# fields a resume may change: they do not change what the run computes
RESUME_FREE = ("out", "resume", "device", "threads", "no_progress", "save_every", "sample_batch")


def _resume_conflicts(cfg: OnlineConfig, old: dict) -> list:
    """The arguments of cfg that differ from the run's args.json and would change what it computes."""
    new, default = asdict(cfg), asdict(OnlineConfig())
    return [f"{flag_of(OnlineConfig, k)} {old.get(k, default[k])} -> {v}" for k, v in new.items()
            if k not in RESUME_FREE and old.get(k, default[k]) != v]


def parse_args(argv=None, description=None) -> OnlineConfig:
    """online.py's command line (description: its --help text) -> the OnlineConfig of the run."""
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_options(ap, OnlineConfig, replace(OnlineConfig(), dtype=None))
    cfg = OnlineConfig(**{f.name: getattr(ap.parse_args(argv), f.name) for f in fields(OnlineConfig)})
    if cfg.policy is not None and cfg.prompts is None:
        ap.error("argument --policy: needs --prompts (the small world's questions need its own policy)")
    if cfg.dtype is None:
        cfg = replace(cfg, dtype="float32" if cfg.world else "bfloat16")
    if cfg.prompts is not None and cfg.max_new_tokens == OnlineConfig.max_new_tokens:
        cfg = replace(cfg, max_new_tokens=48)  # real answers are longer than a sum
    return cfg
