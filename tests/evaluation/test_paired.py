"""Paired bootstrap on synthetic rows with a known difference, and verdicts read from intervals."""

from __future__ import annotations

import numpy as np
import pytest

from instaflow.evaluation.paired import fid_of, mean_of, paired_bootstrap, verdict


def _rows(n: int = 2000, seed: int = 0):
    """Two models on the same prompts: B hits where A hits, plus 20% more of the prompts (known difference 0.2);
    prompts differ in difficulty, so the rows are strongly correlated."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n)
    a = (easy < 0.5).astype(float)  # A aligns 50% of the prompts
    b = (easy < 0.7).astype(float)  # B aligns those and 20% more
    return a, b


def test_paired_difference_recovers_the_known_difference_and_is_narrower_than_unpaired():
    a, b = _rows()
    d = paired_bootstrap(mean_of(b), mean_of(a), len(a), combine="difference", n=500)
    assert d["value"] == pytest.approx(b.mean() - a.mean()) and d["value"] == pytest.approx(0.2, abs=0.03)
    assert d["low"] < d["value"] < d["high"] and d["low"] > 0.15 and d["high"] < 0.25
    # an unpaired interval (rows resampled independently) of the same difference is wider
    rng = np.random.default_rng(1)
    unpaired = [b[rng.integers(0, len(b), len(b))].mean() - a[rng.integers(0, len(a), len(a))].mean() for _ in range(500)]
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert (hi - lo) > 1.5 * (d["high"] - d["low"])
    # seeded: the same call gives the same interval
    assert paired_bootstrap(mean_of(b), mean_of(a), len(a), combine="difference", n=500) == d


def test_paired_fid_ratio_of_a_row_with_itself_is_exactly_one_and_shifted_rows_are_worse():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 4))
    good = rng.normal(size=(600, 4))
    bad = good + 0.5  # the same samples, shifted: a worse model on the same prompts
    same = paired_bootstrap(fid_of(good, ref), fid_of(good, ref), 600, n=100)
    assert same["value"] == same["low"] == same["high"] == 1.0
    r = paired_bootstrap(fid_of(bad, ref), fid_of(good, ref), 600, n=100)
    assert r["low"] > 1.0 and r["low"] <= r["value"] <= r["high"]


def test_verdicts_come_from_the_interval_not_the_point():
    assert verdict({"low": 0.8, "high": 1.1}, 1.25, "<=") == "holds"
    assert verdict({"low": 1.1, "high": 1.4}, 1.25, "<=") == "cannot tell"  # the point may be below 1.25
    assert verdict({"low": 1.3, "high": 1.4}, 1.25, "<=") == "does not hold"
    assert verdict({"low": 1.21, "high": 1.5}, 1.2, ">=") == "holds"
    assert verdict({"low": 0.9, "high": 1.3}, 1.2, ">=") == "cannot tell"
    assert verdict({"low": 0.9, "high": 1.1}, 1.2, ">=") == "does not hold"
    with pytest.raises(ValueError):
        verdict({"low": 0, "high": 1}, 1, "<")
