"""Error bars and paired comparisons for evaluation figures.

- `binomial_se`: standard error of a rate, sqrt(p(1-p)/n).
- `bootstrap_se`: standard error of a mean (or of a ratio of sums, e.g. per-token loss) by
  resampling records with replacement (seeded).
- `mean_ci95`: Student-t 95% interval of a mean (for a handful of seeds).
- `paired_bootstrap_diff`: mean difference of two methods on the same items with a percentile
  bootstrap 95% interval; `paired_diff_over_seeds`: the same over per-seed figures (t interval).
- `verdict`: "held" / "not held" / "inconclusive" from such an interval and a claim's direction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

# Student t 0.975 quantiles for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959963984540054
_MAX_CELLS = 2_000_000  # resample indices drawn per block (bounds memory for large sets)

Items = Sequence[float] | Mapping[str, float]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, accurate to 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def binomial_se(p: float, n: int) -> float:
    """Standard error of a rate `p` measured on `n` items: sqrt(p(1-p)/n)."""
    if n < 1:
        raise ValueError(f"a rate needs n >= 1 items, got {n}")
    p = min(1.0, max(0.0, p))
    return math.sqrt(p * (1 - p) / n)


def _resampled(values: np.ndarray, denominators: np.ndarray | None, seed: int, resamples: int) -> np.ndarray:
    """The statistic (mean, or ratio of sums) of `resamples` bootstrap resamples of the items."""
    n = len(values)
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_CELLS // n)
    out = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        if denominators is None:
            out.append(values[idx].mean(axis=1))
        else:
            den = denominators[idx].sum(axis=1)
            num = values[idx].sum(axis=1)
            out.append(num[den > 0] / den[den > 0])
    return np.concatenate(out)


def bootstrap_se(
    values: Sequence[float], *, denominators: Sequence[float] | None = None, seed: int = 0, resamples: int = 1000
) -> float:
    """Bootstrap standard error over items (seeded) of the mean of `values`, or, with
    `denominators`, of the ratio sum(values) / sum(denominators) (per-token loss: values are
    per-record NLL sums, denominators their token counts). 0 for a single item."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("bootstrap_se needs a non-empty list of values")
    d = None
    if denominators is not None:
        d = np.asarray(denominators, dtype=np.float64)
        if d.shape != v.shape:
            raise ValueError(f"{len(d)} denominators for {len(v)} values")
        if d.sum() <= 0:
            raise ValueError("the denominators sum to 0")
    if len(v) == 1:
        return 0.0
    stats = _resampled(v, d, seed, resamples)
    return float(stats.std(ddof=1)) if len(stats) > 1 else 0.0


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t 95% interval of the mean; (m, -inf, inf) for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("mean_ci95 needs a non-empty list of values")
    mean = float(v.mean())
    if len(v) == 1:
        return mean, -math.inf, math.inf
    half = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def _paired(a: Items, b: Items) -> np.ndarray:
    """a - b per item: sequences pair by position, mappings by key (the keys must agree)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise ValueError("pair two mappings (item id -> value) or two sequences, not one of each")
        missing = sorted(set(a) ^ set(b), key=str)
        if missing:
            raise ValueError(f"the two sides cover different items, e.g. {missing[0]!r} ({len(missing)} differ)")
        keys = sorted(a, key=str)
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    if len(a) != len(b):
        raise ValueError(f"paired items differ in number: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("no items to compare")
    return np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)


def paired_bootstrap_diff(a_items: Items, b_items: Items, seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi): the paired difference of two methods on the same items with a
    percentile-bootstrap 95% interval (`n` resamples of the items, seeded). Items are per-item
    figures (0/1 correctness, per-item loss...), as sequences in the same order or as mappings
    item id -> figure."""
    diffs = _paired(a_items, b_items)
    mean = float(diffs.mean())
    if len(diffs) == 1 or np.all(diffs == diffs[0]):
        return mean, mean, mean
    means = _resampled(diffs, None, seed, n)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return mean, float(lo), float(hi)


def paired_diff_over_seeds(a_by_seed: Items, b_by_seed: Items) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi) over seeds: per-seed figures of two methods paired by seed (same
    order, or mappings seed -> figure), with a Student-t 95% interval ((d, -inf, inf) for one seed)."""
    return mean_ci95(_paired(a_by_seed, b_by_seed).tolist())


Verdict = Literal["held", "not held", "inconclusive"]


def verdict(lo: float, hi: float, expected_sign: int = 1) -> Verdict:
    """A claim that the difference is positive (`expected_sign=1`) or negative (-1): "held" when
    the 95% interval excludes 0 in that direction, "not held" when it excludes 0 the other way,
    else "inconclusive"."""
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be 1 or -1, got {expected_sign}")
    if lo > 0:
        return "held" if expected_sign == 1 else "not held"
    if hi < 0:
        return "held" if expected_sign == -1 else "not held"
    return "inconclusive"
