"""exp2.1's criteria on synthetic results: a passing, a failing and a borderline case each."""
from __future__ import annotations

import numpy as np

from djinn.equivalence import Equivalence, TeacherForced

from benchmarks.goals.exp2_1 import (BLIND, FAST, FAST_MIN_TOP1_AGREEMENT, FULL, NATIVE, PARTIAL, DecodeResult,
                                     Exp2_1Results, PairedRounds, agreeing_prefix, exp2_1_criteria, exp2_1_report)
from benchmarks.verdict import Outcome

PROMPT = (1, 2, 3)
TOKENS = ((*PROMPT, 7, 8, 9),)


def rng(name: str) -> np.random.Generator:
    """Samples of their own per baseline: a test's outcome does not depend on which ran before it."""
    return np.random.default_rng(sum(map(ord, name)))


def decode(baseline: str, ms: float, wire: float, tokens=TOKENS) -> DecodeResult:
    return DecodeResult(baseline, tokens, 3, tuple(ms * rng(baseline).normal(1, 0.02, 25)), wire)


def paired(target: str, factor: float, spread: float = 0.02) -> PairedRounds:
    r = rng(target)
    host = r.choice([1.0, 1.8], size=25)  # the host's drift touches both sides of a round
    reference = 10 * host * r.normal(1, spread, 25)
    return PairedRounds(target, NATIVE, tuple(reference * factor * r.normal(1, spread, 25)), tuple(reference))


def results(full_factor: float = 1.1, *, blind_tokens=TOKENS, full_wire: float = 40.0, on_gpu: bool = False,
            weight_bytes: int = 36 << 20, **extra) -> Exp2_1Results:
    return Exp2_1Results(
        decode={NATIVE: decode(NATIVE, 10, 0), BLIND: decode(BLIND, 400, 1e8, blind_tokens),
                PARTIAL: decode(PARTIAL, 12, 1e6), FULL: decode(FULL, 11, full_wire)},
        paired={FULL: paired(FULL, full_factor)}, on_gpu=on_gpu, weight_bytes=weight_bytes, **extra)


def outcome(r: Exp2_1Results, name: str) -> Outcome:
    return exp2_1_criteria(r).check(name).outcome


def test_a_run_within_every_bound_passes():
    verdict = exp2_1_criteria(results(1.1))
    assert verdict.passed, verdict.summary()
    assert verdict.check("latency_semantic_blind_vs_full_djinn").outcome is Outcome.SKIPPED, "CPU-scale model"


def test_full_djinn_well_over_its_bound_fails_with_its_interval():
    verdict = exp2_1_criteria(results(1.6))
    check = verdict.check("latency_full_djinn_vs_native_pytorch")
    assert check.outcome is Outcome.FAILED and "whole interval lies above 1.25" in check.message


def test_full_djinn_at_its_bound_is_not_shown_either_way_and_passes():
    check = exp2_1_criteria(results(1.25)).check("latency_full_djinn_vs_native_pytorch")
    assert check.outcome is Outcome.PASSED and "not shown either way" in check.message


def test_tokens_differing_from_native_fail_and_a_shorter_prefix_passes():
    assert outcome(results(blind_tokens=((*PROMPT, 7),)), "tokens_equal_native") is Outcome.PASSED
    wrong = exp2_1_criteria(results(blind_tokens=((*PROMPT, 7, 5, 9),))).check("tokens_equal_native")
    assert wrong.outcome is Outcome.FAILED and "semantic_blind differ" in wrong.message


def test_bytes_per_token_bound_is_exact():
    assert outcome(results(full_wire=1e5), "bytes_full_vs_blind") is Outcome.PASSED  # exactly 1/1000
    assert outcome(results(full_wire=1e5 + 1), "bytes_full_vs_blind") is Outcome.FAILED


def test_blind_latency_claim_is_judged_on_gpu_scale_models():
    gpu = results(on_gpu=True, weight_bytes=13 << 30)
    assert outcome(gpu, "latency_semantic_blind_vs_full_djinn") is Outcome.PASSED  # 400/11 = 36x
    slow_full = Exp2_1Results(decode={**gpu.decode, FULL: decode(FULL, 20, 40)}, paired=gpu.paired, on_gpu=True,
                              weight_bytes=13 << 30)
    assert outcome(slow_full, "latency_semantic_blind_vs_full_djinn") is Outcome.FAILED  # 20x


def fast(ms: float, path: str = "fast_compiled") -> DecodeResult:
    return DecodeResult(FAST, TOKENS, 3, tuple(ms * rng(FAST).normal(1, 0.02, 25)), 40.0, path, 14e9)


def fast_results(ms: float, *, on_gpu: bool = True, model: str = "llama-2-7b", path: str = "fast_compiled",
                 **extra) -> Exp2_1Results:
    r = results(on_gpu=on_gpu, **extra)
    return Exp2_1Results(decode={**r.decode, FAST: fast(ms, path)}, paired=r.paired, on_gpu=on_gpu, model=model,
                         weight_bytes=r.weight_bytes)


FAST_CHECK = "latency_full_djinn_fast_ms_per_token"


def test_fast_path_goal_passes_below_fails_above_and_is_undecided_at_its_bound():
    assert outcome(fast_results(3.9), FAST_CHECK) is Outcome.PASSED
    assert outcome(fast_results(5.2), FAST_CHECK) is Outcome.FAILED
    borderline = exp2_1_criteria(fast_results(4.5)).check(FAST_CHECK)
    assert borderline.outcome is Outcome.PASSED and "not shown either way" in borderline.message
    assert outcome(fast_results(8.0, model="llama-2-13b"), FAST_CHECK) is Outcome.PASSED  # 13B's goal is 8.5


def test_fast_path_goal_is_for_a_gpu_and_a_listed_model_and_fails_on_hf_eager():
    assert outcome(fast_results(30.0, on_gpu=False), FAST_CHECK) is Outcome.SKIPPED
    assert outcome(fast_results(30.0, model="tiny-llama"), FAST_CHECK) is Outcome.SKIPPED
    assert outcome(fast_results(4.0, path="hf_eager"), FAST_CHECK) is Outcome.FAILED


def test_full_djinn_on_a_gpu_is_held_to_eager_parity():
    assert outcome(results(1.02, on_gpu=True, weight_bytes=13 << 30),
                   "latency_full_djinn_vs_native_pytorch") is Outcome.PASSED
    assert outcome(results(1.15, on_gpu=True, weight_bytes=13 << 30),
                   "latency_full_djinn_vs_native_pytorch") is Outcome.FAILED  # 1.25 would pass it on a CPU


def teacher_forced(verdict: Equivalence, top1: float = 0.995) -> TeacherForced:
    return TeacherForced(verdict, 512, 0.01, 1e-3, top1, 1e-2, FAST_MIN_TOP1_AGREEMENT)


def test_fast_path_passes_equivalent_and_fails_silently_wrong_on_any_prompt():
    ok = {"prompt_file": teacher_forced(Equivalence.EQUIVALENT), "random_ids": teacher_forced(Equivalence.EXACT)}
    assert outcome(results(fast_teacher_forced=ok), "fast_teacher_forced") is Outcome.PASSED
    wrong = {**ok, "random_ids": teacher_forced(Equivalence.SILENTLY_WRONG, top1=0.95)}
    check = exp2_1_criteria(results(fast_teacher_forced=wrong)).check("fast_teacher_forced")
    assert check.outcome is Outcome.FAILED and "random_ids: silently_wrong" in check.message


def test_physics_gives_bytes_read_over_the_step_as_fractions_of_copy_and_spec():
    r = fast_results(4.0)
    r = Exp2_1Results(decode=r.decode, on_gpu=True, model=r.model, hbm_copy_gbps=4000.0, hbm_spec_gbps=4800.0)
    report = exp2_1_report(r)
    p = report["physics"][FAST]
    assert abs(p["per_token_ms"] - 4.0) < 0.1
    assert abs(p["achieved_gbps"] - 14e9 / (p["per_token_ms"] / 1e3) / 1e9) < 1e-6
    assert abs(p["fraction_of_copy"] * 4000 - p["fraction_of_spec"] * 4800) < 1e-6
    assert NATIVE not in report["physics"], "a baseline without a byte count gets no physics"
    assert report["decode_path"][FAST] == "fast_compiled" and report["decode_path"][NATIVE] == "hf_eager"


def test_what_did_not_run_is_skipped_not_failed():
    only_native = Exp2_1Results(decode={NATIVE: decode(NATIVE, 10, 0)})
    verdict = exp2_1_criteria(only_native)
    assert verdict.passed and all(c.outcome is Outcome.SKIPPED for c in verdict.checks)


def test_report_gives_spreads_intervals_and_fast_path_agreement():
    r = results()
    r = Exp2_1Results(decode={**r.decode, FAST: decode(FAST, 9, 40, ((*PROMPT, 7, 8, 4),))}, paired=r.paired)
    report = exp2_1_report(r)
    assert set(report["per_token_ms"][NATIVE]) == {"median", "q1", "q3", "n"}
    assert report["interleaved"][FULL]["ci_low"] <= report["interleaved"][FULL]["ratio_of_medians"]
    assert report["fast_new_tokens_agreeing_with_native"] == 2


def test_agreeing_prefix_counts_up_to_the_first_divergence_in_any_row():
    reference = ((0, 5, 6, 7, 8), (0, 1, 2, 3, 4))
    assert agreeing_prefix(reference, reference, 1) == 4
    assert agreeing_prefix(((0, 5, 6, 7, 8), (0, 1, 2, 9, 4)), reference, 1) == 2
    assert agreeing_prefix(((0, 5, 6, 7),), reference[:1], 1) == 3, "a shorter run agrees over its own length"
