"""The suite's statistics: spreads and bootstrap intervals of ratios (benchmarks.stats)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stats import Spread, paired_ratio, unpaired_ratio


def test_spread_is_median_and_quartiles():
    s = Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert s.as_dict("per_token", "ms") == {"per_token_ms_median": 3.0, "per_token_ms_q1": 2.0,
                                            "per_token_ms_q3": 4.0, "per_token_n": 5}


def test_a_single_sample_has_no_spread_rather_than_a_made_up_one():
    s = Spread.of([7.0])
    assert (s.median, s.iqr, s.n) == (7.0, 0.0, 1)
    with pytest.raises(ValueError):
        Spread.of([])


def test_paired_ratio_cancels_what_a_slow_spell_did_to_both_sides():
    rng = np.random.default_rng(1)
    host = rng.choice([1.0, 2.0], size=40)  # the host's speed per round: half the rounds twice as slow
    reference = 10.0 * host * rng.normal(1, 0.01, 40)
    target = 12.0 * host * rng.normal(1, 0.01, 40)
    paired = paired_ratio(target, reference)
    assert paired.low <= 1.2 <= paired.high and paired.high - paired.low < 0.05
    unpaired = unpaired_ratio(target, reference)
    assert unpaired.high - unpaired.low > 5 * (paired.high - paired.low), "unpaired, the spell widens the interval"


def test_interval_is_reproducible_and_contains_the_point_estimate():
    a, b = [1.0, 1.1, 0.9, 1.05, 1.2], [2.0, 2.1, 1.9, 2.2, 2.0]
    first, second = paired_ratio(a, b), paired_ratio(a, b)
    assert first == second
    assert first.low <= first.ratio <= first.high


def test_paired_samples_must_pair():
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
