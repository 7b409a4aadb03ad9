"""Seed summaries and paired tests (genrec.metrics.stats) against hand computations."""

import math

import numpy as np
import pytest

from genrec.metrics.stats import comparison_keys, paired_keys, paired_test, seed_summary


def test_seed_summary_is_the_student_t_interval():
    s = seed_summary([0.10, 0.12, 0.14])
    # mean 0.12, sd 0.02, t_{0.975, 2} = 4.302653
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert s["mean"] == pytest.approx(0.12) and s["std"] == pytest.approx(0.02)
    assert s["ci95_low"] == pytest.approx(0.12 - half, abs=1e-6) and s["ci95_high"] == pytest.approx(0.12 + half, abs=1e-6)
    one = seed_summary([0.3])
    assert one["ci95_low"] == one["ci95_high"] == 0.3 and one["n"] == 1
    assert math.isnan(seed_summary([])["mean"])


def test_paired_test_separates_effect_from_noise():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.2).astype(float)
    same = paired_test(base, base.copy())
    assert same["diff"] == 0 and same["p_value"] == 1.0
    better = base.copy()
    better[np.flatnonzero(base == 0)[:60]] = 1.0  # 60 extra hits of 400
    t = paired_test(better, base)
    assert t["diff"] == pytest.approx(60 / 400) and t["p_value"] < 0.001
    assert t["ci95_low"] <= t["diff"] <= t["ci95_high"] and t["ci95_low"] > 0
    noisy = paired_test(base, np.roll(base, 1))
    assert noisy["p_value"] > 0.05
    # (seeds, n) inputs are averaged over seeds first
    two = paired_test(np.stack([better, better]), np.stack([base, base]))
    assert two["diff"] == pytest.approx(t["diff"]) and two["n"] == 400
    with pytest.raises(ValueError, match="same instances"):
        paired_test(base, base[:10])


def test_paired_test_p_value_matches_exact_sign_flips_on_a_tiny_case():
    d = np.array([1.0, 1.0, 1.0, -1.0])  # |mean| = 0.5; exact: 2·(flips with |sum| ≥ 2)/16 = 10/16
    t = paired_test(d, np.zeros(4), num_resamples=20000, seed=3)
    assert t["p_value"] == pytest.approx(10 / 16, abs=0.02)


def test_bench_key_helpers():
    keys = comparison_keys("dact/hr@10", [0.1, 0.2])
    assert set(keys) == {"dact/hr@10/mean", "dact/hr@10/ci95_low", "dact/hr@10/ci95_high", "dact/hr@10/std"}
    pk = paired_keys("dact", "frozen", "hr@10", np.ones(5), np.zeros(5))
    assert pk["dact_vs_frozen/hr@10/diff"] == 1.0 and "dact_vs_frozen/hr@10/p_value" in pk
