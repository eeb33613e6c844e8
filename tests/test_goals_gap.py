"""The gap's goals on synthetic results: passing, failing and borderline (equal bytes) cases."""
from __future__ import annotations

from benchmarks.goals.gap import MODES, GapResult, gap_criteria
from benchmarks.verdict import Outcome

LOCAL = ((1, 2, 3, 4),)
BYTES = {"local": 0.0, "naive": 1e8, "remote_cache": 4e4, "sys_simulated": 40.0}


def results(tokens=None, bytes_=None) -> dict:
    tokens, bytes_ = tokens or {}, {**BYTES, **(bytes_ or {})}
    return {(p, m): GapResult(p, m, tokens.get(m, LOCAL), bytes_[m]) for p in ("prefill", "decode") for m in MODES}


def test_every_mode_equal_and_bytes_falling_passes():
    assert gap_criteria(results()).passed


def test_a_mode_with_other_tokens_fails_naming_it():
    verdict = gap_criteria(results(tokens={"remote_cache": ((1, 2, 3, 5),)}))
    assert not verdict.passed and "remote_cache tokens differ" in verdict.check("decode_tokens_equal_local").message


def test_naive_decoding_fewer_tokens_compares_its_prefix():
    assert gap_criteria(results(tokens={"naive": ((1, 2, 3),)})).passed


def test_equal_bytes_on_two_rungs_still_fall_and_rising_bytes_fail():
    assert gap_criteria(results(bytes_={"sys_simulated": 4e4})).passed, "non-increasing is the seed's claim"
    assert gap_criteria(results(bytes_={"sys_simulated": 5e4})).check("decode_bytes_fall").outcome is Outcome.FAILED


def test_a_selection_of_one_mode_is_skipped_not_failed():
    only = {k: v for k, v in results().items() if k[1] == "local"}
    verdict = gap_criteria(only)
    assert verdict.passed and all(c.outcome is Outcome.SKIPPED for c in verdict.checks)
