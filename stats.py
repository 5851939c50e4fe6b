"""Confidence intervals for judge accuracies and paired comparisons of two judges on the same pairs.

Per-pair scores are 0 / 1 (one judgement per pair) or 0 / 0.5 / 1 (a pair judged in both answer
orders, the two outcomes averaged). An accuracy made of 0/1 scores is a binomial proportion and
gets the Wilson score interval (it stays inside [0, 1] and is not degenerate at 0 or 1 accuracy,
where a bootstrap collapses to a point); any other accuracy, and every weighted mean of groups
(RewardBench's section score), gets the percentile bootstrap over pairs. Two judges on the same
pairs are compared with the paired bootstrap: the same resampled pairs for both, so what the two
judges share (easy and hard pairs) cancels in the difference. Every resampling takes a seed.
The intervals are over the pairs (an eval set as a sample of its source), the judges' sampled
verdicts held fixed: a judge scoring 0.5 on every pair (always "A", both orders) gets [0.5, 0.5].
"""
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...
RESAMPLES = 10_000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials:
    (k + z^2/2) / (n + z^2)  +-  z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)."""
    if n <= 0:
        raise ValueError(f"wilson: n must be positive, got {n}")
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


def _strata_means(strata: Sequence[Sequence[float]], resamples: int, seed: int) -> list[np.ndarray]:
    """Per stratum, the means of `resamples` resamples drawn with replacement within it:
    stratum g draws rng.integers(0, n_g, (resamples, n_g)), strata in order, from one generator."""
    rng = np.random.default_rng(seed)
    out = []
    for s in strata:
        x = np.asarray(s, dtype=np.float64)                       # (n_g,)
        idx = rng.integers(0, len(x), size=(resamples, len(x)))   # (R, n_g)
        out.append(x[idx].mean(axis=1))                           # (R,)
    return out


def _weights(strata, weights):
    if any(len(s) == 0 for s in strata):
        raise ValueError("bootstrap: every stratum needs at least one pair")
    w = [1.0 / len(strata)] * len(strata) if weights is None else list(weights)
    if len(w) != len(strata) or abs(sum(w) - 1.0) > 1e-9:
        raise ValueError(f"bootstrap: {len(w)} weights summing to {sum(w)} for {len(strata)} strata")
    return w


def _quantiles(x: np.ndarray, level: float) -> tuple[float, float]:
    # Linear interpolation between order statistics.
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(strata: Sequence[Sequence[float]], weights: Sequence[float] | None = None, *,
                 level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum_g w_g * mean(stratum g), resampling pairs within each
    stratum (one stratum: the plain mean). weights: default equal; they must sum to 1."""
    w = _weights(strata, weights)
    stat = sum(wg * m for wg, m in zip(w, _strata_means(strata, resamples, seed)))  # (R,)
    return _quantiles(stat, level)


def accuracy_ci(scores: Sequence[float], *, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """The interval of one accuracy from its per-pair scores: Wilson when every score is 0 or 1,
    else the percentile bootstrap over pairs (see the module docstring). None for no pairs."""
    if not scores:
        return None
    if all(s in (0, 1) for s in scores):
        return wilson(int(sum(scores)), len(scores), NormalDist().inv_cdf((1 + level) / 2))
    return bootstrap_ci([scores], level=level, seed=seed)


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                     weights: Sequence[float] | None = None, *, level: float = 0.95,
                     resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Judge a against judge b on the same pairs (a[g][i] and b[g][i] score the same pair of
    stratum g): the accuracy difference a - b, its percentile bootstrap interval (both judges
    scored on the same resampled pairs) and a two-sided p-value for "no difference",
    p = min(1, 2 * min(#{d* <= 0}, #{d* >= 0}) / R), the bootstrap test that rejects at level
    1 - level about when the interval excludes 0 (resampled differences equal to 0 count on both
    sides, so it is conservative for discrete scores)."""
    if [len(s) for s in a] != [len(s) for s in b]:
        raise ValueError(f"paired_bootstrap: stratum sizes differ: {[len(s) for s in a]} "
                         f"vs {[len(s) for s in b]}")
    diff = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)]
    w = _weights(diff, weights)
    d = sum(wg * m for wg, m in zip(w, _strata_means(diff, resamples, seed)))  # (R,)
    observed = sum(wg * float(x.mean()) for wg, x in zip(w, diff))
    p = min(1.0, 2 * min(int((d <= 0).sum()), int((d >= 0).sum())) / resamples)
    return {"diff": observed, "ci": list(_quantiles(d, level)), "p": p}
