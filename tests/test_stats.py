"""stats.py against closed forms, published values and brute-force resampling written here."""
import math
import random

import numpy as np
import pytest

import stats as S

Z = 1.959963984540054


def test_wilson_closed_forms_and_published_values():
    assert S.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)   # Newcombe (1998), 5/10
    lo, hi = S.wilson(0, 10)
    # k = 0: the upper bound is z^2 / (n + z^2).
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(Z * Z / (10 + Z * Z))
    lo, hi = S.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + Z * Z))
    for k, n in ((3, 17), (40, 64), (1, 2)):
        lo, hi = S.wilson(k, n)
        # Symmetric in k <-> n - k.
        assert (lo, hi) == pytest.approx(tuple(1 - x for x in S.wilson(n - k, n)[::-1]))
        for p in (lo, hi):  # the bounds are the p where the score test is at its critical value
            assert (k / n - p) ** 2 == pytest.approx(Z * Z * p * (1 - p) / n)
    with pytest.raises(ValueError, match="n must be positive"):
        S.wilson(0, 0)


def _brute_means(strata, resamples, seed):
    """The resampled means drawn as stats documents it: one generator, strata in order, rows of
    indices; the means by hand."""
    rng = np.random.default_rng(seed)
    out = []
    for s in strata:
        idx = rng.integers(0, len(s), size=(resamples, len(s)))
        out.append([sum(s[i] for i in row) / len(s) for row in idx.tolist()])
    return out


def _quantile(xs, q):
    """Linear interpolation between order statistics, by hand."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    i = math.floor(pos)
    return xs[i] + (pos - i) * (xs[min(i + 1, len(xs) - 1)] - xs[i])


def test_bootstrap_matches_brute_force_resampling_and_covers_the_mean():
    scores = [1, 0.5, 0, 1, 1, 0.5, 1, 0, 1, 1, 0.5, 1]
    lo, hi = S.bootstrap_ci([scores], resamples=2000, seed=3)
    means = _brute_means([scores], 2000, 3)[0]
    assert (lo, hi) == pytest.approx((_quantile(means, 0.025), _quantile(means, 0.975)), abs=1e-12)
    assert lo < sum(scores) / len(scores) < hi
    # two strata weighted 1/4, 3/4: the weighted sum of within-stratum resampled means
    a, b = [1, 0, 1, 1], [0, 0.5, 1, 0, 0, 1, 0.5]
    lo, hi = S.bootstrap_ci([a, b], [0.25, 0.75], resamples=1000, seed=1)
    ma, mb = _brute_means([a, b], 1000, 1)
    stat = [0.25 * x + 0.75 * y for x, y in zip(ma, mb)]
    assert (lo, hi) == pytest.approx((_quantile(stat, 0.025), _quantile(stat, 0.975)), abs=1e-12)
    assert S.bootstrap_ci([a, b], [0.25, 0.75], resamples=1000, seed=1) == (lo, hi)   # seeded
    with pytest.raises(ValueError, match="weights"):
        S.bootstrap_ci([a, b], [0.5, 0.6])


def test_accuracy_ci_is_wilson_for_01_scores_and_bootstrap_otherwise():
    assert S.accuracy_ci([1, 0, 1, 1, 0]) == S.wilson(3, 5)
    assert S.accuracy_ci([1, 0.5, 0, 1]) == S.bootstrap_ci([[1, 0.5, 0, 1]])
    assert S.accuracy_ci([]) is None


def test_paired_bootstrap_against_brute_force_and_the_normal_approximation():
    rng = random.Random(0)
    a = [rng.choice([0, 0.5, 1]) for _ in range(40)]
    b = [rng.choice([0, 0.5, 1]) for _ in range(40)]
    r = S.paired_bootstrap([a], [b], resamples=2000, seed=5)
    assert r["diff"] == pytest.approx(sum(a) / 40 - sum(b) / 40)
    # brute force: resample pairs (the same rows for both judges), difference of the two accuracies
    d = _brute_means([[x - y for x, y in zip(a, b)]], 2000, 5)[0]
    assert r["ci"] == pytest.approx([_quantile(d, 0.025), _quantile(d, 0.975)], abs=1e-12)
    assert r["p"] == min(1.0, 2 * min(sum(x <= 0 for x in d), sum(x >= 0 for x in d)) / 2000)
    # 0/1 scores, 200 pairs, 30 pairs only a gets right and 15 only b: the bootstrap p-value is the
    # two-sided normal test of the paired difference (McNemar's statistic without continuity
    # correction); exact McNemar (binomial sum) is a little more conservative, both below 0.05
    n, only_a, only_b = 200, 30, 15
    a = [1] * only_a + [0] * only_b + [1] * 80 + [0] * 75
    b = [0] * only_a + [1] * only_b + [1] * 80 + [0] * 75
    r = S.paired_bootstrap([a], [b])
    diff = (only_a - only_b) / n
    se = math.sqrt(((only_a + only_b) / n - diff ** 2) / n)
    p_normal = math.erfc(diff / se / math.sqrt(2))
    p_mcnemar = min(1.0, 2 * sum(math.comb(45, k) for k in range(only_b + 1)) / 2 ** 45)
    assert r["diff"] == pytest.approx(0.075) and r["ci"][0] > 0
    assert r["p"] == pytest.approx(p_normal, abs=0.01) and r["p"] < p_mcnemar < 0.05
    # one judge against itself: no difference at all
    assert S.paired_bootstrap([a], [a]) == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    with pytest.raises(ValueError, match="stratum sizes differ"):
        S.paired_bootstrap([a], [b[:-1]])
