"""The ring buffer's goals on synthetic results: the true peak, the TTFT bound, bit-identity."""
from __future__ import annotations

from benchmarks.goals.ring_buffer import (RingResult, RingResults, ideal_decode_tokens_per_s, rates,
                                          ring_buffer_criteria, speedups_vs_accelerate, ttft_bound_ms)
from benchmarks.verdict import Outcome

PEAK = 55.0
STREAMED = 24 * 10**9  # a 13B shape's layers: 436 ms at 55 GB/s, an ideal 2.29 tokens/s


def run(name, gbps, ttft, identical=True, tps=(2.2, 2.25, 2.21)) -> RingResult:
    return RingResult(name, tuple(gbps), tuple(ttft), tuple(tps), identical)


def results(gbps=(52.0, 53.0, 52.5), ttft=(600.0, 610.0, 605.0), identical=True, on_gpu=True,
            tps=(2.2, 2.25, 2.21), ttft_goal_ms=None) -> RingResults:
    return RingResults({"resident": run("resident", (), (120.0, 121.0), None, ()),
                        "hf_accelerate": run("hf_accelerate", (7.5, 7.6, 7.7), (3000.0,), False, (0.3, 0.31)),
                        "djinn_ring_buffer": run("djinn_ring_buffer", gbps, ttft, identical, tps)},
                       "djinn_ring_buffer", PEAK, STREAMED, on_gpu, ttft_goal_ms)


def _ideal_check(verdict):
    return next(c for c in verdict.checks if c.name.startswith("decode_vs_ideal"))


def test_streaming_near_the_peak_within_the_ttft_bound_passes():
    verdict = ring_buffer_criteria(results())
    assert verdict.passed, verdict.summary()
    assert ttft_bound_ms(STREAMED, PEAK, 120.0) == 1.15 * STREAMED / 55e9 * 1e3 + 120.0


def test_streaming_well_below_the_peak_fails_with_its_interval():
    check = ring_buffer_criteria(results(gbps=(40.0, 41.0, 40.5))).check("fraction_of_peak")
    assert check.outcome is Outcome.FAILED and "below 0.9" in check.message


def test_streaming_around_ninety_percent_is_not_shown_either_way():
    check = ring_buffer_criteria(results(gbps=(47.0, 49.5, 52.0))).check("fraction_of_peak")
    assert check.outcome is Outcome.PASSED and "not shown either way" in check.message


def test_a_measurement_above_the_peak_says_the_peak_is_wrong():
    verdict = ring_buffer_criteria(results(gbps=(59.0, 60.0, 60.5)))
    assert [c.name for c in verdict.failures] == ["peak_bounds_streaming"]


def test_streaming_a_few_tenths_of_a_percent_above_the_probe_is_timing_not_a_wrong_peak():
    # the H200's 70B run: 55.06 GB/s streamed against the probe's 54.91
    verdict = ring_buffer_criteria(results(gbps=(PEAK * 1.003,) * 2))
    assert verdict.check("peak_bounds_streaming").outcome is Outcome.PASSED


def test_slow_first_token_and_differing_logits_fail():
    slow = ring_buffer_criteria(results(ttft=(900.0, 910.0, 905.0)))
    assert any(c.name.startswith("ttft_vs_bound") for c in slow.failures)
    assert ring_buffer_criteria(results(identical=False)).check("bit_identical").failed


def test_on_a_cpu_only_bit_identity_is_judged():
    verdict = ring_buffer_criteria(results(gbps=(1.0, 1.1, 1.2), on_gpu=False))
    assert verdict.passed and verdict.check("fraction_of_peak").outcome is Outcome.SKIPPED


def test_speedups_over_accelerate_are_reported_not_bounded():
    speedups = speedups_vs_accelerate(results())
    assert 6.5 < speedups["djinn_ring_buffer"]["bandwidth"]["ratio_of_medians"] < 7.5
    assert "resident" not in speedups


def test_decode_at_the_ideal_rate_for_the_streamed_bytes_passes():
    assert ideal_decode_tokens_per_s(STREAMED, PEAK) == PEAK * 1e9 / STREAMED
    check = _ideal_check(ring_buffer_criteria(results()))
    assert check.outcome is Outcome.PASSED and "above 0.9" in check.message and "2.29" in check.name


def test_decode_well_below_the_ideal_rate_fails_with_its_interval():
    check = _ideal_check(ring_buffer_criteria(results(tps=(1.5, 1.55, 1.6))))
    assert check.outcome is Outcome.FAILED and "below 0.9" in check.message


def test_decode_around_ninety_percent_of_ideal_is_not_shown_either_way():
    check = _ideal_check(ring_buffer_criteria(results(tps=(2.0, 2.06, 2.12))))
    assert check.outcome is Outcome.PASSED and "not shown either way" in check.message


def test_no_decode_steps_skip_the_decode_goal():
    check = _ideal_check(ring_buffer_criteria(results(tps=())))
    assert check.outcome is Outcome.SKIPPED


def test_an_absolute_ttft_goal_passes_under_and_fails_over():
    assert ring_buffer_criteria(results(ttft_goal_ms=2000.0)).check("ttft_vs_goal_2000ms").outcome is Outcome.PASSED
    slow = ring_buffer_criteria(results(ttft=(2100.0, 2150.0, 2120.0), ttft_goal_ms=2000.0))
    assert slow.check("ttft_vs_goal_2000ms").failed
    assert f"{STREAMED / (PEAK * 1e9) * 1e3:.0f} ms at the peak" in slow.check("ttft_vs_goal_2000ms").message
    borderline = ring_buffer_criteria(results(ttft=(1900.0, 2000.0, 2100.0), ttft_goal_ms=2000.0))
    assert borderline.check("ttft_vs_goal_2000ms").outcome is Outcome.PASSED
    assert not any(c.name.startswith("ttft_vs_goal") for c in ring_buffer_criteria(results()).checks)


def test_rates_report_accelerate_beside_the_streamer_and_the_ideal():
    table = rates(results())
    assert table["hf_accelerate"] == {"decode_tokens_per_s_median": 0.305, "bandwidth_gbps_median": 7.6}
    assert table["djinn_ring_buffer"]["decode_tokens_per_s_median"] == 2.21
    assert table["ideal"]["decode_tokens_per_s_median"] == ideal_decode_tokens_per_s(STREAMED, PEAK)
    assert table["resident"]["bandwidth_gbps_median"] is None
