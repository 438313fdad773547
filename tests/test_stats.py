"""Error bars and paired comparisons: known samples, known answers."""

from __future__ import annotations

import math
import random

import pytest

from fedsdr.stats import (
    binomial_se,
    bootstrap_se,
    mean_ci95,
    paired_bootstrap_diff,
    paired_diff_over_seeds,
    t975,
    verdict,
)


def test_binomial_se() -> None:
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.0, 10) == 0.0
    assert binomial_se(1.0, 10) == 0.0
    assert binomial_se(0.2, 400) == pytest.approx(math.sqrt(0.2 * 0.8 / 400))
    with pytest.raises(ValueError):
        binomial_se(0.5, 0)


def test_bootstrap_se_of_a_mean_matches_the_analytic_se() -> None:
    rng = random.Random(1)
    values = [rng.gauss(3.0, 2.0) for _ in range(400)]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    analytic = sd / math.sqrt(n)
    se = bootstrap_se(values, seed=0, resamples=2000)
    assert se == pytest.approx(analytic, rel=0.08)
    assert bootstrap_se(values, seed=0) == bootstrap_se(values, seed=0)  # seeded
    assert bootstrap_se([4.0]) == 0.0
    assert bootstrap_se([2.0] * 10) == 0.0


def test_bootstrap_se_of_a_ratio_of_sums() -> None:
    # Equal token counts: the ratio of sums is the mean of per-record means.
    sums = [float(v) for v in range(1, 41)]
    counts = [2.0] * 40
    ratio = bootstrap_se(sums, denominators=counts, seed=3)
    plain = bootstrap_se([s / 2 for s in sums], seed=3)
    assert ratio == pytest.approx(plain, rel=1e-9)
    # Unequal counts weight long records more: a different (still positive) figure.
    uneven = bootstrap_se(sums, denominators=[1.0 + (i % 5) for i in range(40)], seed=3)
    assert uneven > 0 and uneven != pytest.approx(ratio)
    with pytest.raises(ValueError, match="denominators"):
        bootstrap_se([1.0, 2.0], denominators=[1.0])


def test_t_quantiles() -> None:
    assert t975(2) == pytest.approx(4.303)
    assert t975(30) == pytest.approx(2.042)
    assert t975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t975(120) == pytest.approx(1.9799, abs=1e-3)
    assert t975(10**6) == pytest.approx(1.95996, abs=1e-4)


def test_mean_ci95() -> None:
    mean, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean - lo == pytest.approx(hi - mean)
    assert mean_ci95([5.0]) == (5.0, -math.inf, math.inf)


def test_paired_diff_with_a_clear_shift_excludes_zero() -> None:
    rng = random.Random(0)
    b = [float(rng.random() < 0.4) for _ in range(300)]
    a = [1.0 if (x or rng.random() < 0.5) else 0.0 for x in b]  # a is right wherever b is, and more
    mean, lo, hi = paired_bootstrap_diff(a, b, seed=0)
    assert mean == pytest.approx(sum(a) / 300 - sum(b) / 300)
    assert 0 < lo < mean < hi
    assert verdict(lo, hi, expected_sign=1) == "held"
    assert verdict(lo, hi, expected_sign=-1) == "not held"
    flipped = paired_bootstrap_diff(b, a, seed=0)
    assert flipped[2] < 0


def test_paired_diff_of_identical_items_is_zero() -> None:
    a = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert paired_bootstrap_diff(a, list(a), seed=1) == (0.0, 0.0, 0.0)
    assert verdict(0.0, 0.0) == "inconclusive"


def test_paired_diff_without_a_shift_is_inconclusive() -> None:
    rng = random.Random(2)
    a = [float(rng.random() < 0.5) for _ in range(200)]
    b = a[1:] + a[:1]  # the same rate, items shuffled
    _, lo, hi = paired_bootstrap_diff(a, b, seed=0)
    assert lo < 0 < hi
    assert verdict(lo, hi) == "inconclusive"


def test_paired_diff_pairs_mappings_by_item_id() -> None:
    a = {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    b = {"q3": 0.0, "q1": 0.0, "q2": 1.0}
    assert paired_bootstrap_diff(a, b)[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="q4"):
        paired_bootstrap_diff(a, {**b, "q4": 1.0})
    with pytest.raises(ValueError, match="differ in number"):
        paired_bootstrap_diff([1.0, 0.0], [1.0])


def test_paired_diff_over_seeds() -> None:
    a = {0: 0.62, 1: 0.60, 2: 0.64}
    b = {0: 0.50, 1: 0.51, 2: 0.49}
    mean, lo, hi = paired_diff_over_seeds(a, b)
    diffs = [0.12, 0.09, 0.15]
    assert mean == pytest.approx(0.12)
    assert (mean, lo, hi) == pytest.approx(mean_ci95(diffs))
    assert lo > 0
    one = paired_diff_over_seeds([0.6], [0.5])
    assert one[0] == pytest.approx(0.1) and verdict(one[1], one[2]) == "inconclusive"
