"""The emulated link's goals (issue 20), as pure functions of the sweep's results.

At the acceptance link, 1 Gbit/s with a 1 ms round trip:
- full_djinn's per-token latency grows by the round trip, 1 ms ± 20%, over its loopback figure
  (a decode step is one round trip). One server answers both ways, and step i over the link is
  paired with step i over loopback, the two generations driven in lockstep
  (benchmarks.paired_steps); the growth is the median of the pairs' differences over the RTT,
  with its bootstrap interval. Two figures of it:
  - of the steps' wall time: judged at every swept RTT of at least `MIN_JUDGED_RTT_S` (below it
    the host's jitter is the RTT's size), failing only when its whole interval lies outside
    0.8..1.2. On the 2-core machine a decode step's compute varies by a quarter of itself step to
    step (the host's other load), so hundreds of pairs still leave an interval of ±0.5 RTT;
  - of the steps' time off the server (wall less the server's queue and compute, as it reports
    them): the same growth without the compute's jitter, since the same server computes the same
    step whichever way the request came (measured in lockstep: the link's steps computed 0.05 ms
    longer at 1 ms RTT, within the pairs' noise; when whole generations were paired, a second
    apart, the host's drifting load made that ~1 ms). The acceptance (at 1 ms) is met only when
    this figure's whole interval lies within 0.8..1.2.
- semantic_blind's throughput within 10% of the shaped rate: for each message blind sent over the
  link (a request with the whole model, a reply with the KV), its Ethernet bytes as the shaper
  counts them (every segment's headers) over the time from its first to its last frame at the
  link's far end, both from the wire capture; the median over the messages. Blind ships the whole
  model every step, so its messages run at the link's rate; the figure over whole steps (server
  compute included) is reported beside it.
- the capture on the link's veth agrees with the transport's counters within 2%.

The growth is judged in round trips the link delivered: the RTT its ICMP echo measured during the
same rounds (the nominal RTT where no echo could be sent). The emulation is the harness, not
Djinn: on the 2-core VM the user-space delay line delivered 1.10 ms for a 1 ms setting one day and
1.28 ms another (its wake-ups land later the longer the vCPU slept), and Djinn's steps grew by that
delivered RTT each time. Whether the link delivered its setting within 20% is a check of its own
(`link_delivers_rtt_*`), so a verdict tells a slow link from a step that costs more than a round trip.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

from benchmarks.stats import RatioEstimate, Spread, paired_difference_over
from benchmarks.verdict import Check, Verdict, at_least, at_most, exact, skipped

ACCEPTANCE_RATE_BPS = 10**9
ACCEPTANCE_RTT_S = 1e-3
GROWTH_TOLERANCE = 0.20  # 1 ms ± 20%
THROUGHPUT_TOLERANCE = 0.10
CAPTURE_AGREEMENT = 0.02
MIN_JUDGED_RTT_S = 1e-3


@dataclass(frozen=True)
class LatencyPoint:
    """Rounds at one RTT: every decode step's client wall time, in ms. The link's and the loopback's
    are pairs (step i of two generations driven in lockstep); native's are beside them."""
    rtt_s: float
    link_step_ms: tuple[float, ...]  # full_djinn over the link
    loopback_step_ms: tuple[float, ...]  # full_djinn over loopback, paired with link_step_ms
    native_step_ms: tuple[float, ...]  # native_pytorch, beside them
    ping_rtt_ms: float | None = None  # ICMP echo over the link during the rounds, median
    link_off_server_ms: tuple[float, ...] = ()  # the same steps' wall less the server's queue and compute
    loopback_off_server_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for link, loopback in ((self.link_step_ms, self.loopback_step_ms),
                               (self.link_off_server_ms, self.loopback_off_server_ms)):
            if len(link) != len(loopback):
                raise ValueError(f"link and loopback steps are pairs: {len(link)} vs {len(loopback)}")

    @property
    def delivered_rtt_ms(self) -> float:
        """The round trip the link delivered: its ICMP echo, else its setting."""
        return self.ping_rtt_ms if self.ping_rtt_ms is not None else self.rtt_s * 1e3

    def growth_over_rtt(self) -> RatioEstimate:
        return paired_difference_over(self.link_step_ms, self.loopback_step_ms, self.delivered_rtt_ms)

    def off_server_growth_over_rtt(self) -> RatioEstimate | None:
        if not self.link_off_server_ms:
            return None
        return paired_difference_over(self.link_off_server_ms, self.loopback_off_server_ms, self.delivered_rtt_ms)

    @property
    def growth_ms(self) -> float:
        return statistics.median(a - b for a, b in zip(self.link_step_ms, self.loopback_step_ms))

    @property
    def off_server_growth_ms(self) -> float | None:
        if not self.link_off_server_ms:
            return None
        return statistics.median(a - b for a, b in zip(self.link_off_server_ms, self.loopback_off_server_ms))


@dataclass(frozen=True)
class ThroughputPoint:
    """semantic_blind over the link at one RTT."""
    rtt_s: float
    rate_bps: int
    burst_wire_bps: tuple[float, ...]  # per message: its Ethernet bits / seconds it took to arrive
    run_step_bps: tuple[float, ...]  # per run: its Ethernet bits / seconds of its whole steps
    counted_bytes: int  # the transport's framed bytes over the measured runs, both ways
    captured_payload_bytes: int | None  # the capture's unique TCP payload over the same runs (None: no capture)

    @property
    def rate_fraction(self) -> Spread:
        return Spread.of([bps / self.rate_bps for bps in self.burst_wire_bps])


def _growth_checks(latency: Mapping[float, LatencyPoint]) -> list[Check]:
    judged = [p for rtt, p in sorted(latency.items()) if rtt >= MIN_JUDGED_RTT_S]
    if not judged:
        return [skipped("latency_grows_by_rtt", f"no swept RTT of at least {MIN_JUDGED_RTT_S * 1e3:g} ms")]
    checks = []
    for point in judged:
        checks.append(_link_delivers(point))
        growth = point.growth_over_rtt()
        name = f"latency_growth_over_rtt_{point.rtt_s * 1e3:g}ms"
        checks.append(at_least(name, growth, 1 - GROWTH_TOLERANCE))
        checks.append(at_most(name, growth, 1 + GROWTH_TOLERANCE))
        if point.rtt_s == ACCEPTANCE_RTT_S:
            checks.append(_growth_shown(point))
    return checks


def _link_delivers(point: LatencyPoint) -> Check:
    """The emulated link's own fidelity: its ICMP echo within 1 ± 20% of the RTT it was set to."""
    setting_ms = point.rtt_s * 1e3
    name = f"link_delivers_rtt_{setting_ms:g}ms"
    if point.ping_rtt_ms is None:
        return skipped(name, "no ICMP echo over the link (needs CAP_NET_RAW): growths judged against the setting")
    ratio = point.ping_rtt_ms / setting_ms
    ok = abs(ratio - 1) <= GROWTH_TOLERANCE
    return exact(name, ok, f"{name}: the link's ICMP echo took {point.ping_rtt_ms:.3f} ms for its {setting_ms:g} ms "
                           f"({ratio:.2f}x; bound 1 ± {GROWTH_TOLERANCE:g})", ratio, (1 - GROWTH_TOLERANCE, 1 + GROWTH_TOLERANCE))


def _growth_shown(point: LatencyPoint) -> Check:
    """The acceptance figure is met only when its whole interval lies within 1 ± 20%: the bounds
    above pass a run that could not tell, this one does not. Judged off the server where the
    sweep measured it (see the module's docstring), else on the wall time."""
    low, high = 1 - GROWTH_TOLERANCE, 1 + GROWTH_TOLERANCE
    name = f"latency_growth_shown_within_{point.rtt_s * 1e3:g}ms"
    off_server = point.off_server_growth_over_rtt()
    growth, figure = (off_server, "off the server") if off_server is not None else (point.growth_over_rtt(), "wall")
    ok = low <= growth.low and growth.high <= high
    shown = "within" if ok else "not shown within"
    return exact(name, ok, f"{name}: the step's time {figure} grew by {growth} of the link's "
                           f"{point.delivered_rtt_ms:.3f} ms round trips: {shown} {low:g}..{high:g}", growth, (low, high))


def _throughput_checks(throughput: Mapping[float, ThroughputPoint]) -> list[Check]:
    point = throughput.get(ACCEPTANCE_RTT_S)
    name = "blind_throughput_at_shaped_rate"
    if point is None:
        return [skipped(name, f"semantic_blind did not run at {ACCEPTANCE_RTT_S * 1e3:g} ms RTT")]
    fraction = point.rate_fraction
    message = (f"{name}: semantic_blind's messages at {fraction.median:.1%} of the shaped {point.rate_bps / 1e9:g} "
               f"Gbit/s (IQR {fraction.q1:.1%}-{fraction.q3:.1%}, {fraction.n} messages), bound ±{THROUGHPUT_TOLERANCE:.0%}")
    if point.rate_bps != ACCEPTANCE_RATE_BPS:
        return [skipped(name, f"{message}: judged only at the acceptance rate, 1 Gbit/s", fraction.median)]
    ok = abs(fraction.median - 1) <= THROUGHPUT_TOLERANCE
    return [exact(name, ok, message, fraction.median, (1 - THROUGHPUT_TOLERANCE, 1 + THROUGHPUT_TOLERANCE))]


def capture_agreement(point: ThroughputPoint) -> float | None:
    """|captured - counted| / counted, None without a capture."""
    if point.captured_payload_bytes is None or not point.counted_bytes:
        return None
    return abs(point.captured_payload_bytes - point.counted_bytes) / point.counted_bytes


def _capture_checks(throughput: Mapping[float, ThroughputPoint]) -> list[Check]:
    checks = []
    for rtt, point in sorted(throughput.items()):
        name = f"capture_equals_counters_rtt_{rtt * 1e3:g}ms"
        off = capture_agreement(point)
        if off is None:
            checks.append(skipped(name, "no wire capture on the link (needs CAP_NET_RAW)"))
            continue
        checks.append(exact(name, off <= CAPTURE_AGREEMENT,
                            f"{name}: capture {point.captured_payload_bytes} B vs counters {point.counted_bytes} B: "
                            f"{off:.3%} apart (bound {CAPTURE_AGREEMENT:.0%})", off, CAPTURE_AGREEMENT))
    return checks or [skipped("capture_equals_counters", "semantic_blind did not run over the link")]


def link_criteria(latency: Mapping[float, LatencyPoint], throughput: Mapping[float, ThroughputPoint]) -> Verdict:
    """Both mappings are keyed by the RTT in seconds."""
    return Verdict("link_sweep", tuple(_growth_checks(latency) + _throughput_checks(throughput)
                                       + _capture_checks(throughput)))


def link_report(latency: Mapping[float, LatencyPoint], throughput: Mapping[float, ThroughputPoint]) -> dict:
    """The sweep's figures as JSON: one row per RTT (medians and IQRs, in ms and bit/s)."""
    rows = []
    for rtt in sorted(set(latency) | set(throughput)):
        row: dict = {"rtt_ms": round(rtt * 1e3, 6)}
        if (lat := latency.get(rtt)) is not None:
            for side in ("link", "loopback", "native"):
                row.update(Spread.of(getattr(lat, f"{side}_step_ms")).as_dict(f"{side}_step", "ms"))
            row["ping_rtt_ms"] = lat.ping_rtt_ms
            if rtt > 0:
                row["growth_over_rtt"] = lat.growth_over_rtt().as_dict()
                off_server = lat.off_server_growth_over_rtt()
                row["off_server_growth_over_rtt"] = off_server.as_dict() if off_server is not None else None
            row["growth_ms"] = lat.growth_ms
            row["off_server_growth_ms"] = lat.off_server_growth_ms
        if (tp := throughput.get(rtt)) is not None:
            row.update(Spread.of(tp.burst_wire_bps).as_dict("blind_wire", "bps"))
            row.update(Spread.of(tp.run_step_bps).as_dict("blind_step", "bps"))
            row["rate_bps"] = tp.rate_bps
            row["blind_rate_fraction_median"] = tp.rate_fraction.median
            row["counted_bytes"] = tp.counted_bytes
            row["captured_payload_bytes"] = tp.captured_payload_bytes
            row["capture_vs_counters"] = capture_agreement(tp)
        rows.append(row)
    return {"points": rows}
