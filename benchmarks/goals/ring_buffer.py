"""The ring buffer's goals (seed 003), in this run's physics rather than one card's numbers.

Streaming is held to the true peak of the link it streams over (djinn.telemetry.pcie: the
best of several copy methods), so a fraction above 1.0 means the peak is wrong and fails as
such; decode is held to the tokens per second that peak allows for the bytes the residency
plan streams per token (a bs-1 decode step on a GPU is its copies: the resident layers'
compute hides behind them); the first token is held to the time the streamed bytes need at
that peak plus the resident model's own prefill, and, where a configuration sets one, to an
absolute goal (70B: < 2 s). Speedups over HF Accelerate are reported, not bounded: they
depend on how slowly Accelerate copies on that host, which is not Djinn's physics (the fixed
7x of the H100 was 6.81x on an H200 whose streamer was at the link's peak).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Mapping

from benchmarks.stats import RatioEstimate, unpaired_ratio
from benchmarks.verdict import Check, Verdict, at_least, at_most, exact, skipped

MIN_FRACTION_OF_PEAK = 0.90  # the goal: streaming at >= 90% of what the link can carry
# Issue 17: decode tokens/s >= 0.9 x (true PCIe peak / bytes streamed per token).
MIN_FRACTION_OF_IDEAL_DECODE = 0.90
# A true peak bounds every measurement, up to how differently the two are timed: the probe's
# samples are 1 GiB copies between CUDA events, the streamer's rate is a whole run's bytes over
# its wall time. On the H200 the streamer's 120 GB per token of the 70B ran at 55.06 GB/s
# against the probe's 54.91 (1.003x): a peak 1% low is still the link's; the 1.09x of a
# one-method probe (djinn.telemetry.pcie) is not.
MAX_FRACTION_OF_PEAK = 1.01
# TTFT <= factor x (streamed bytes / peak) + the resident model's TTFT: the copies of one
# forward at the peak, 15% for the first layers that cannot overlap compute, and the compute.
MAX_TTFT_FACTOR = 1.15
RESIDENT, ACCELERATE = "resident", "hf_accelerate"


@dataclass(frozen=True)
class RingResult:
    baseline: str
    bandwidth_gbps: tuple[float, ...]  # per run: weight bytes copied host->device / the run's wall time
    ttft_ms: tuple[float, ...]
    decode_tokens_per_s: tuple[float, ...]
    bit_identical_to_resident: bool | None  # None for the resident reference itself


@dataclass(frozen=True)
class RingResults:
    runs: Mapping[str, RingResult]
    goal_baseline: str  # the streamer judged: djinn_ring_buffer, or the remote one when alone
    peak_gbps: float | None  # the probe's best host->device method
    streamed_bytes: int  # weight bytes one forward streams: the residency plan's per token
    on_gpu: bool
    ttft_goal_ms: float | None = None  # an absolute first-token goal of this configuration, if any


def _fraction(result: RingResult, peak: float) -> RatioEstimate:
    return unpaired_ratio(result.bandwidth_gbps, [peak])


def ideal_decode_tokens_per_s(streamed_bytes: int, peak_gbps: float) -> float:
    """Tokens per second if every decode step were only its streamed bytes at the link's peak."""
    return peak_gbps * 1e9 / streamed_bytes


def ttft_bound_ms(streamed_bytes: int, peak_gbps: float, resident_ttft_ms: float) -> float:
    return MAX_TTFT_FACTOR * streamed_bytes / (peak_gbps * 1e9) * 1e3 + resident_ttft_ms


def ring_buffer_criteria(results: RingResults) -> Verdict:
    runs, djinn = results.runs, results.runs.get(results.goal_baseline)
    checks: list[Check] = []
    streamers = {b: r for b, r in runs.items() if b != RESIDENT and r.bit_identical_to_resident is not None}
    differ = [b for b, r in streamers.items() if b.startswith("djinn") and not r.bit_identical_to_resident]
    checks.append(exact("bit_identical", not differ,
                        f"bit_identical: {', '.join(differ) + ' differ from' if differ else 'djinn streamers equal'} "
                        f"the resident model's tokens and logits", differ))
    gpu_only = None if results.on_gpu else "the bandwidth and TTFT goals are about a GPU's link"
    if djinn is None:
        checks.append(skipped("fraction_of_peak", f"{results.goal_baseline} did not run"))
        return Verdict("ring_buffer", tuple(checks))
    if results.peak_gbps is None:
        checks.append(skipped("fraction_of_peak", "no PCIe peak measured (no CUDA device, or test_pcie_peak not run)"))
    else:
        fraction = _fraction(djinn, results.peak_gbps)
        checks.append(at_least("fraction_of_peak", fraction, MIN_FRACTION_OF_PEAK, applies=gpu_only))
        checks.append(at_most("peak_bounds_streaming", fraction, MAX_FRACTION_OF_PEAK, applies=gpu_only))
        if not djinn.decode_tokens_per_s:
            checks.append(skipped("decode_vs_ideal", f"{results.goal_baseline} made no decode steps"))
        else:
            ideal = ideal_decode_tokens_per_s(results.streamed_bytes, results.peak_gbps)
            checks.append(at_least(f"decode_vs_ideal_{ideal:.3g}_tokens_per_s",
                                   unpaired_ratio(djinn.decode_tokens_per_s, [ideal]), MIN_FRACTION_OF_IDEAL_DECODE,
                                   applies=gpu_only))
        resident = runs.get(RESIDENT)
        if resident is None:
            checks.append(skipped("ttft", "the resident reference did not run"))
        else:
            bound = ttft_bound_ms(results.streamed_bytes, results.peak_gbps, min(resident.ttft_ms))
            checks.append(at_most(f"ttft_vs_bound_{bound:.0f}ms", unpaired_ratio(djinn.ttft_ms, [bound]), 1.0,
                                  applies=gpu_only))
    if results.ttft_goal_ms is not None:
        check = at_most(f"ttft_vs_goal_{results.ttft_goal_ms:.0f}ms",
                        unpaired_ratio(djinn.ttft_ms, [results.ttft_goal_ms]), 1.0, applies=gpu_only)
        if results.peak_gbps is not None:  # a goal below the link's floor cannot be met by any streamer on it
            floor_ms = results.streamed_bytes / (results.peak_gbps * 1e9) * 1e3
            check = replace(check, message=f"{check.message} (the link's floor: the streamed bytes alone take "
                                           f"{floor_ms:.0f} ms at the peak)")
        checks.append(check)
    return Verdict("ring_buffer", tuple(checks))


def rates(results: RingResults) -> dict:
    """Each baseline's median decode tokens/s and streaming GB/s, beside the ideal: what the report
    shows for HF Accelerate (and DeepSpeed) next to the streamers."""
    out = {}
    for name, r in results.runs.items():
        out[name] = {"decode_tokens_per_s_median": statistics.median(r.decode_tokens_per_s)
                     if r.decode_tokens_per_s else None,
                     "bandwidth_gbps_median": statistics.median(r.bandwidth_gbps) if r.bandwidth_gbps else None}
    if results.peak_gbps:
        out["ideal"] = {"decode_tokens_per_s_median": ideal_decode_tokens_per_s(results.streamed_bytes,
                                                                                results.peak_gbps),
                        "bandwidth_gbps_median": results.peak_gbps}
    return out


def speedups_vs_accelerate(results: RingResults) -> dict:
    """Each streamer over HF Accelerate, in bytes/s and tokens/s: reported beside the verdict."""
    accelerate = results.runs.get(ACCELERATE)
    if accelerate is None:
        return {}
    out = {}
    for name, r in results.runs.items():
        if name in (ACCELERATE, RESIDENT):
            continue
        out[name] = {"bandwidth": unpaired_ratio(r.bandwidth_gbps, accelerate.bandwidth_gbps).as_dict()
                     if r.bandwidth_gbps and accelerate.bandwidth_gbps else None,
                     "decode_tokens_per_s": unpaired_ratio(r.decode_tokens_per_s, accelerate.decode_tokens_per_s)
                     .as_dict() if r.decode_tokens_per_s and accelerate.decode_tokens_per_s else None}
    return out
