"""The multitenant goals on synthetic rounds: passing, failing and not-applicable cases, and its figure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import report
from benchmarks.goals.multitenant import TenancyRound, UploadStall, multitenant_criteria
from benchmarks.stats import percentile_ratio
from benchmarks.verdict import Outcome

ROUNDS = 5
EXACT_ALL = {1: ["exact"], 4: ["equivalent"] * 4, 16: ["equivalent"] * 16}


def rounds(gain16: float, p99_growth: float, gain4: float = 3.0) -> list[TenancyRound]:
    """N=1 at 100 tokens/s and 10 ms per token; N=4 and N=16 scaled by the given factors."""
    out = []
    rng = np.random.default_rng(0)
    for r in range(ROUNDS):
        for n, gain, growth in ((1, 1.0, 1.0), (4, gain4, 1.2), (16, gain16, p99_growth)):
            jitter = rng.normal(1, 0.01)
            steps = tuple(10.0 * growth * rng.normal(1, 0.01, 200))
            out.append(TenancyRound(n, r, int(1000 * gain * jitter), 10.0, steps, tuple(np.full(200, 0.5))))
    return out


def test_scaling_within_the_gpu_goals_passes():
    verdict = multitenant_criteria(rounds(12.0, 1.5), EXACT_ALL, [], on_gpu=True)
    assert verdict.passed, verdict.summary()
    assert verdict.check("throughput_N16_over_N1").outcome is Outcome.PASSED
    assert verdict.check("throughput_N4_over_N1").outcome is Outcome.SKIPPED, "the CPU's goal, not the GPU's"


@pytest.mark.parametrize("gain16,growth,failing", [(5.0, 1.5, "throughput_N16_over_N1"),
                                                    (12.0, 3.0, "p99_per_token_N16_over_N1")])
def test_too_little_gain_or_too_much_tail_fails_with_its_interval(gain16, growth, failing):
    verdict = multitenant_criteria(rounds(gain16, growth), EXACT_ALL, [], on_gpu=True)
    assert [c.name for c in verdict.failures] == [failing]
    assert "whole interval" in verdict.failures[0].message


def test_on_a_cpu_only_the_four_tenant_goal_is_judged():
    verdict = multitenant_criteria(rounds(1.0, 9.0, gain4=1.2), EXACT_ALL, [], on_gpu=False)
    assert [c.name for c in verdict.failures] == ["throughput_N4_over_N1"]
    assert verdict.check("p99_per_token_N16_over_N1").outcome is Outcome.SKIPPED


def test_a_silently_wrong_tenant_or_an_inexact_solo_run_fails():
    wrong = multitenant_criteria(rounds(12, 1.5), {1: ["exact"], 4: ["equivalent", "silently_wrong"]}, [], True)
    assert [c.name for c in wrong.failures] == ["tenants_equivalent_to_solo"] and "{4: [1]}" in wrong.failures[0].message
    inexact = multitenant_criteria(rounds(12, 1.5), {1: ["equivalent"]}, [], True)
    assert [c.name for c in inexact.failures] == ["tenants_equivalent_to_solo"]


def test_an_upload_that_stalls_decode_fails_on_a_gpu():
    rng = np.random.default_rng(1)
    solo = tuple(rng.normal(8, 0.2, 1000))
    small, large = 4 << 20, 32 << 20
    calm = UploadStall(small, solo, tuple(rng.normal(9, 0.2, 1000)))
    stalled = UploadStall(small, solo, tuple(np.concatenate([rng.normal(9, 0.2, 900), np.full(100, 40.0)])))
    assert multitenant_criteria(rounds(12, 1.5), EXACT_ALL, [calm], True).passed
    verdict = multitenant_criteria(rounds(12, 1.5), EXACT_ALL, [stalled], True)
    assert [c.name for c in verdict.failures] == ["upload_stall_p99_chunk4MiB"]
    assert multitenant_criteria(rounds(12, 1.5), EXACT_ALL, [stalled], False).check(
        "upload_stall_p99_chunk4MiB").outcome is Outcome.SKIPPED
    oversized = UploadStall(large, stalled.solo_step_ms, stalled.during_upload_ms)
    reported = multitenant_criteria(rounds(12, 1.5), EXACT_ALL, [calm, oversized], True)
    assert reported.passed and reported.check("upload_stall_p99_chunk32MiB").outcome is Outcome.SKIPPED, \
        "a message larger than the judged size is reported beside the verdict"


def test_percentile_ratio_brackets_the_ratio_of_tails():
    rng = np.random.default_rng(2)
    base = rng.normal(10, 1, 2000)
    estimate = percentile_ratio(base * 2, base, 99)
    assert estimate.low <= 2.0 <= estimate.high and estimate.ratio == pytest.approx(2.0)
    with pytest.raises(ValueError):
        percentile_ratio([], base, 99)


def test_djinn_report_redraws_the_multitenant_figure(tmp_path, capsys):
    points = [{"tenants": n, "tokens_per_s_median": 10.0 * n, "tokens_per_s_q1": 9.0 * n, "tokens_per_s_q3": 11.0 * n,
               "per_token_ms_p50": 10.0, "per_token_ms_p99": 12.0 + n, "queue_ms_p50": 0.1, "queue_ms_p99": 1.0}
              for n in (1, 2, 4)]
    path = tmp_path / "20260101T000000.json"
    path.write_text(json.dumps({"experiment": "multitenant", "model": "tiny-llama", "points": points,
                                "environment": {"device": "cpu"}}))
    assert report.main([str(path), "--out-dir", str(tmp_path / "out")]) == 0
    figure = tmp_path / "out" / "20260101T000000.png"
    assert figure.stat().st_size > 0 and str(figure) in capsys.readouterr().out
