"""Bounds judged on intervals: fail only when the whole interval lies beyond (benchmarks.verdict)."""
from __future__ import annotations

from benchmarks.stats import RatioEstimate
from benchmarks.verdict import Outcome, Verdict, at_least, at_most, exact


def estimate(low: float, high: float) -> RatioEstimate:
    return RatioEstimate((low + high) / 2, low, high, 25)


def test_at_most_fails_only_when_the_whole_interval_is_above():
    assert at_most("r", estimate(1.0, 1.2), 1.25).outcome is Outcome.PASSED
    straddling = at_most("r", estimate(1.2, 1.3), 1.25)
    assert straddling.outcome is Outcome.PASSED and "not shown either way" in straddling.message
    failed = at_most("r", estimate(1.3, 1.5), 1.25)
    assert failed.outcome is Outcome.FAILED and "[1.3, 1.5]" in failed.message and "above 1.25" in failed.message


def test_at_least_fails_only_when_the_whole_interval_is_below():
    assert at_least("r", estimate(31, 40), 30).outcome is Outcome.PASSED
    assert at_least("r", estimate(25, 35), 30).outcome is Outcome.PASSED
    assert at_least("r", estimate(10, 20), 30).outcome is Outcome.FAILED


def test_a_check_that_does_not_apply_is_skipped_with_its_value():
    check = at_most("r", estimate(3, 4), 1.0, applies="GPU only")
    assert check.outcome is Outcome.SKIPPED and "GPU only" in check.message and "3.5x" in check.message


def test_verdict_fails_on_any_failed_check_and_lists_them():
    v = Verdict("x", (exact("a", True, "a ok"), exact("b", False, "b wrong"), at_most("r", estimate(0.9, 1), 1.25)))
    assert not v.passed and [c.name for c in v.failures] == ["b"]
    assert "FAILED  b wrong" in v.summary()
    assert v.as_dict()["checks"][2]["measured"]["ci_high"] == 1
