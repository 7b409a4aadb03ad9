"""Honest comparisons: means over seeds with a 95% interval, and paired tests on the same test instances.

* ``seed_summary(values)``: mean, Student-t 95% interval over seeds (n − 1 degrees of freedom; one seed gives an
  interval of width 0 and says so through ``n``).
* ``paired_test(a, b)``: per-instance metric arrays of two methods on the same instances (shape (n,), or
  (seeds, n): averaged over seeds first, so the unit of resampling stays the test instance). The p-value is a
  two-sided sign-flip permutation test of the mean difference (exact under the null that the two methods are
  exchangeable per instance); the 95% interval of the difference is a percentile bootstrap over instances. Both
  are seeded, so a report is reproducible.
"""

from __future__ import annotations

import math

import numpy as np


def seed_summary(values, level: float = 0.95) -> dict[str, float]:
    """{'mean', 'ci95_low', 'ci95_high', 'std', 'n'} of one metric over seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "std": math.nan, "n": 0}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "std": std, "n": n}


def _per_instance(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=0) if x.ndim == 2 else x


def paired_test(a, b, num_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean difference a − b over the same instances, its bootstrap interval and the sign-flip p-value."""
    a, b = _per_instance(a), _per_instance(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs the same instances: shapes {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    if n == 0:
        return {"diff": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "p_value": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    observed = d.mean()
    # resample in blocks so 10k × n stays small in memory
    flips, boots = [], []
    for start in range(0, num_resamples, 1000):
        m = min(1000, num_resamples - start)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        flips.append(np.abs((signs * d).mean(axis=1)))
        boots.append(d[rng.integers(0, n, size=(m, n))].mean(axis=1))
    flips, boots = np.concatenate(flips), np.concatenate(boots)
    # +1 in numerator and denominator: the observed labelling is one of the permutations (never p = 0)
    p = (1 + int((flips >= abs(observed) - 1e-12).sum())) / (1 + len(flips))
    lo, hi = np.quantile(boots, [(1 - level) / 2, 0.5 + level / 2])
    return {"diff": float(observed), "ci95_low": float(lo), "ci95_high": float(hi), "p_value": float(p), "n": n}


def comparison_keys(name: str, per_seed: list[float]) -> dict[str, float]:
    """``{name}/mean``, ``/ci95_low``, ``/ci95_high``, ``/std`` of a metric over seeds (flat bench keys)."""
    s = seed_summary(per_seed)
    return {f"{name}/{k}": float(s[k]) for k in ("mean", "ci95_low", "ci95_high", "std")}


def paired_keys(method: str, baseline: str, metric: str, a, b, seed: int = 0) -> dict[str, float]:
    """``{method}_vs_{baseline}/{metric}/p_value`` (and ``/diff``, ``/diff_ci95_low|high``)."""
    t = paired_test(a, b, seed=seed)
    base = f"{method}_vs_{baseline}/{metric}"
    return {f"{base}/p_value": t["p_value"], f"{base}/diff": t["diff"],
            f"{base}/diff_ci95_low": t["ci95_low"], f"{base}/diff_ci95_high": t["ci95_high"]}


def subset_values(table: dict, column: str, subset: str = "overall") -> np.ndarray:
    """One metric column of a per-instance table (``RankingMetrics.per_instance_table``) in instance-id order,
    restricted to a subset: two models' tables on the same data then pair row by row."""
    order = np.argsort(table["instance_id"], kind="stable")
    values = np.asarray(table[column])[order]
    return values[np.asarray(table[f"mask/{subset}"])[order]]
