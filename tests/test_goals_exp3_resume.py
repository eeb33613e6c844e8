"""exp3's resume goals on synthetic results: passing, failing and borderline cases."""
from __future__ import annotations

import numpy as np

from benchmarks.goals.exp3_resume import Identity, ResumePoint, exp3_resume_criteria
from benchmarks.verdict import Outcome

IDENTICAL = Identity(40, (), 1.0, 0.05)


def point(baseline: str, layer: int, ms: float, seed: int) -> ResumePoint:
    return ResumePoint(baseline, 512, layer, tuple(ms * np.random.default_rng(seed).normal(1, 0.02, 9)))


def points(djinn_ms: float, layer: int = 10) -> list[ResumePoint]:
    return [point("recompute", layer, 5.0, 1), point("manual_offload", layer, 0.5, 2),
            point("djinn_resume", layer, djinn_ms, 3)]


def test_identical_resume_within_the_bounds_passes():
    assert exp3_resume_criteria(IDENTICAL, points(0.52), on_gpu=True).passed


def test_djinn_resume_well_over_manual_offload_fails_with_its_interval():
    verdict = exp3_resume_criteria(IDENTICAL, points(0.7), on_gpu=True)
    (failure,) = verdict.failures
    assert failure.name == "djinn_resume_vs_manual_offload_S512_L10" and "above 1.1" in failure.message


def test_djinn_resume_at_the_bound_is_not_shown_either_way():
    check = exp3_resume_criteria(IDENTICAL, points(0.55), on_gpu=True).check("djinn_resume_vs_manual_offload_S512_L10")
    assert check.outcome is Outcome.PASSED and "not shown either way" in check.message


def test_a_mismatched_layer_fails_and_cpu_timings_are_not_judged():
    verdict = exp3_resume_criteria(Identity(40, (3,), 1.0, 0.05), points(0.7), on_gpu=False)
    assert [c.name for c in verdict.failures] == ["resume_bit_identical"]
    assert verdict.check("djinn_resume_vs_manual_offload_S512_L10").outcome is Outcome.SKIPPED


def test_recompute_is_not_compared_in_the_first_layers():
    verdict = exp3_resume_criteria(IDENTICAL, points(0.52, layer=1), on_gpu=True)
    assert not any("recompute" in c.name for c in verdict.checks)
