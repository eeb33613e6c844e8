"""exp2.1's criteria on synthetic results: a passing, a failing and a borderline case each."""
from __future__ import annotations

import numpy as np

from djinn.equivalence import Equivalence, TeacherForced

from benchmarks.goals.exp2_1 import (BLIND, FULL, GRAPHS, NATIVE, PARTIAL, DecodeResult, Exp2_1Results,
                                     PairedRounds, agreeing_prefix, exp2_1_criteria, exp2_1_report)
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


def test_graph_runtime_latency_is_judged_on_a_gpu_only():
    graphs = {FULL: paired(FULL, 1.1), GRAPHS: paired(GRAPHS, 1.5)}
    cpu = Exp2_1Results(decode=results().decode, paired=graphs)
    assert outcome(cpu, "latency_full_djinn_graphs_vs_native_pytorch") is Outcome.SKIPPED
    gpu = Exp2_1Results(decode=results().decode, paired=graphs, on_gpu=True)
    assert outcome(gpu, "latency_full_djinn_graphs_vs_native_pytorch") is Outcome.FAILED


def teacher_forced(verdict: Equivalence) -> TeacherForced:
    return TeacherForced(verdict, 50, 0.01, 1e-3, 0.98, 1e-2, 0.9)


def test_graph_runtime_passes_equivalent_and_fails_silently_wrong():
    assert outcome(results(graphs_teacher_forced=teacher_forced(Equivalence.EQUIVALENT)),
                   "graphs_teacher_forced") is Outcome.PASSED
    assert outcome(results(graphs_teacher_forced=teacher_forced(Equivalence.SILENTLY_WRONG)),
                   "graphs_teacher_forced") is Outcome.FAILED


def test_what_did_not_run_is_skipped_not_failed():
    only_native = Exp2_1Results(decode={NATIVE: decode(NATIVE, 10, 0)})
    verdict = exp2_1_criteria(only_native)
    assert verdict.passed and all(c.outcome is Outcome.SKIPPED for c in verdict.checks)


def test_report_gives_spreads_intervals_and_graph_agreement():
    r = results()
    r = Exp2_1Results(decode={**r.decode, GRAPHS: decode(GRAPHS, 9, 40, ((*PROMPT, 7, 8, 4),))}, paired=r.paired)
    report = exp2_1_report(r)
    assert set(report["per_token_ms"][NATIVE]) == {"median", "q1", "q3", "n"}
    assert report["interleaved"][FULL]["ci_low"] <= report["interleaved"][FULL]["ratio_of_medians"]
    assert report["graphs_new_tokens_agreeing_with_native"] == 2


def test_agreeing_prefix_counts_up_to_the_first_divergence_in_any_row():
    reference = ((0, 5, 6, 7, 8), (0, 1, 2, 3, 4))
    assert agreeing_prefix(reference, reference, 1) == 4
    assert agreeing_prefix(((0, 5, 6, 7, 8), (0, 1, 2, 9, 4)), reference, 1) == 2
    assert agreeing_prefix(((0, 5, 6, 7),), reference[:1], 1) == 3, "a shorter run agrees over its own length"
