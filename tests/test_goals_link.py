"""The link sweep's goals (benchmarks.goals.link) on synthetic results."""
from __future__ import annotations

import pytest

from benchmarks.goals.link import (ACCEPTANCE_RATE_BPS, LatencyPoint, ThroughputPoint, capture_agreement,
                                   link_criteria, link_report)
from benchmarks.stats import paired_difference_over
from benchmarks.verdict import Outcome

LOOPBACK = (5.0, 5.2, 4.9, 5.1, 5.0, 5.3, 4.8, 5.0, 5.1, 5.0)
JITTER = (0.02, -0.01, 0.0, 0.01, -0.02, 0.0, 0.01, -0.01, 0.02, 0.0)  # what the link's steps add besides the RTT
NATIVE = tuple(x - 2 for x in LOOPBACK)


def latency(rtt_s: float, grown_ms: float) -> LatencyPoint:
    return LatencyPoint(rtt_s, tuple(x + grown_ms + j for x, j in zip(LOOPBACK, JITTER)), LOOPBACK, NATIVE,
                        ping_rtt_ms=rtt_s * 1e3)


def throughput(rtt_s: float, fraction: float, rate: int = ACCEPTANCE_RATE_BPS, captured: int | None = 10**8,
               counted: int = 10**8) -> ThroughputPoint:
    return ThroughputPoint(rtt_s, rate, (rate * fraction,) * 3, (rate * fraction * 0.8,) * 3, counted, captured)


def outcomes(verdict) -> dict[str, set[Outcome]]:
    found: dict[str, set[Outcome]] = {}
    for check in verdict.checks:
        found.setdefault(check.name, set()).add(check.outcome)
    return found


def test_the_acceptance_link_passes_when_every_figure_is_where_it_belongs():
    verdict = link_criteria({0.0: latency(0.0, 0.1), 1e-3: latency(1e-3, 1.05), 5e-3: latency(5e-3, 5.2)},
                            {1e-3: throughput(1e-3, 0.95)})
    assert verdict.passed, verdict.summary()
    names = outcomes(verdict)
    assert names["latency_growth_over_rtt_1ms"] == {Outcome.PASSED}
    assert names["latency_growth_over_rtt_5ms"] == {Outcome.PASSED}
    assert "latency_growth_over_rtt_0ms" not in names  # below the judged RTT: the host's jitter is its size
    assert names["blind_throughput_at_shaped_rate"] == {Outcome.PASSED}


@pytest.mark.parametrize("grown_ms", [0.5, 1.6])
def test_latency_that_grows_by_other_than_the_rtt_fails(grown_ms):
    verdict = link_criteria({1e-3: latency(1e-3, grown_ms)}, {})
    assert not verdict.passed
    assert Outcome.FAILED in outcomes(verdict)["latency_growth_over_rtt_1ms"]


@pytest.mark.parametrize("fraction, ok", [(0.91, True), (1.09, True), (0.72, False), (1.2, False)])
def test_blind_throughput_within_ten_percent_of_the_rate(fraction, ok):
    verdict = link_criteria({}, {1e-3: throughput(1e-3, fraction)})
    check = next(c for c in verdict.checks if c.name == "blind_throughput_at_shaped_rate")
    assert check.outcome is (Outcome.PASSED if ok else Outcome.FAILED)
    assert "of the shaped 1 Gbit/s" in check.message


def test_blind_throughput_at_another_rate_is_reported_not_judged():
    verdict = link_criteria({}, {1e-3: throughput(1e-3, 0.5, rate=25 * 10**9)})
    check = next(c for c in verdict.checks if c.name == "blind_throughput_at_shaped_rate")
    assert check.outcome is Outcome.SKIPPED and check.measured == pytest.approx(0.5)


@pytest.mark.parametrize("captured, ok", [(10**8, True), (int(1.019 * 10**8), True), (int(0.97 * 10**8), False)])
def test_capture_agrees_with_counters_within_two_percent(captured, ok):
    point = throughput(1e-3, 1.0, captured=captured)
    verdict = link_criteria({}, {1e-3: point})
    check = next(c for c in verdict.checks if c.name.startswith("capture_equals_counters"))
    assert check.outcome is (Outcome.PASSED if ok else Outcome.FAILED)
    assert capture_agreement(point) == pytest.approx(abs(captured - 10**8) / 10**8)


def test_a_missing_capture_or_sweep_point_is_skipped_with_its_reason():
    verdict = link_criteria({0.0: latency(0.0, 0.0)}, {1e-3: throughput(1e-3, 1.0, captured=None)})
    assert verdict.passed
    skipped = {c.name: c.message for c in verdict.checks if c.outcome is Outcome.SKIPPED}
    assert "no swept RTT" in skipped["latency_grows_by_rtt"]
    assert "CAP_NET_RAW" in skipped["capture_equals_counters_rtt_1ms"]


def test_paired_difference_over_a_scale():
    estimate = paired_difference_over([6.0, 6.1, 6.2], [5.0, 5.1, 5.2], 1.0)
    assert estimate.ratio == pytest.approx(1.0)
    assert estimate.low <= 1.0 <= estimate.high
    with pytest.raises(ValueError):
        paired_difference_over([1.0], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError):
        paired_difference_over([1.0], [1.0], 0.0)


def test_the_report_has_a_row_per_rtt_with_its_growth():
    report = link_report({0.0: latency(0.0, 0.1), 1e-3: latency(1e-3, 1.0)}, {1e-3: throughput(1e-3, 0.95)})
    rows = {row["rtt_ms"]: row for row in report["points"]}
    assert set(rows) == {0.0, 1.0}
    assert rows[1.0]["growth_ms"] == pytest.approx(1.0)
    assert rows[1.0]["blind_rate_fraction_median"] == pytest.approx(0.95)
    assert "growth_over_rtt" not in rows[0.0]


def test_the_sweep_figure_is_redrawn_from_its_json(tmp_path):
    import json

    from benchmarks.report import own_json_figure

    data = {"experiment": "link_sweep", "model": "tiny-llama",
            **link_report({0.0: latency(0.0, 0.1), 1e-3: latency(1e-3, 1.0)}, {1e-3: throughput(1e-3, 0.95)})}
    source = tmp_path / "sweep.json"
    source.write_text(json.dumps(data))
    figure = own_json_figure(source, tmp_path / "out")
    assert figure is not None and figure.stat().st_size > 10_000


def test_the_acceptance_growth_is_met_only_when_its_interval_lies_within_the_tolerance():
    shown = link_criteria({1e-3: latency(1e-3, 1.05)}, {})
    assert shown.check("latency_growth_shown_within_1ms").outcome is Outcome.PASSED
    # Steps whose noise is wider than the tolerance: the bounds cannot tell, and the acceptance is not met.
    noisy = tuple(x + 1.0 + 3.0 * (-1) ** i for i, x in enumerate(LOOPBACK))
    unshown = link_criteria({1e-3: LatencyPoint(1e-3, noisy, LOOPBACK, NATIVE)}, {})
    assert unshown.check("latency_growth_shown_within_1ms").outcome is Outcome.FAILED
    assert "not shown within 0.8..1.2" in unshown.check("latency_growth_shown_within_1ms").message
    # The same wall times with the server's compute taken out: its jitter gone, the growth is shown.
    off_server = tuple(1.0 + 1.05 + j for j in JITTER)
    judged = link_criteria({1e-3: LatencyPoint(1e-3, noisy, LOOPBACK, NATIVE, None, off_server, (1.0,) * 10)}, {})
    check = judged.check("latency_growth_shown_within_1ms")
    assert check.outcome is Outcome.PASSED and "off the server" in check.message
    # Off the server, a growth of 1.5 RTTs is not hidden by the wall time's noise.
    grown = tuple(1.0 + 1.5 + j for j in JITTER)
    assert link_criteria({1e-3: LatencyPoint(1e-3, noisy, LOOPBACK, NATIVE, None, grown, (1.0,) * 10)},
                         {}).check("latency_growth_shown_within_1ms").outcome is Outcome.FAILED


def test_the_growth_is_counted_in_the_round_trips_the_link_delivered():
    # A link set to 1 ms that delivered 1.28 (the 2-core VM's delay line, one day): steps that grew by
    # its round trip cost one round trip each, and the link's own miss is a check of its own.
    slow = LatencyPoint(1e-3, tuple(x + 1.28 + j for x, j in zip(LOOPBACK, JITTER)), LOOPBACK, NATIVE, 1.28,
                        tuple(1.0 + 1.28 + j for j in JITTER), (1.0,) * 10)
    verdict = link_criteria({1e-3: slow}, {})
    assert verdict.check("latency_growth_shown_within_1ms").outcome is Outcome.PASSED
    assert outcomes(verdict)["latency_growth_over_rtt_1ms"] == {Outcome.PASSED}
    delivered = verdict.check("link_delivers_rtt_1ms")
    assert delivered.outcome is Outcome.FAILED and "1.280 ms for its 1 ms" in delivered.message
    # Steps that grew by 1.28 ms over a link that delivered its 1 ms: 1.28 round trips, which fails.
    punctual = LatencyPoint(1e-3, slow.link_step_ms, LOOPBACK, NATIVE, 1.0, slow.link_off_server_ms, (1.0,) * 10)
    verdict = link_criteria({1e-3: punctual}, {})
    assert verdict.check("link_delivers_rtt_1ms").outcome is Outcome.PASSED
    assert verdict.check("latency_growth_shown_within_1ms").outcome is Outcome.FAILED
    # Without an echo the setting stands for the round trip, and the link's fidelity is not judged.
    unechoed = link_criteria({1e-3: LatencyPoint(1e-3, slow.link_step_ms, LOOPBACK, NATIVE)}, {})
    assert unechoed.check("link_delivers_rtt_1ms").outcome is Outcome.SKIPPED
    assert Outcome.FAILED in outcomes(unechoed)["latency_growth_over_rtt_1ms"]


def test_latency_steps_are_pairs():
    with pytest.raises(ValueError, match="pairs"):
        LatencyPoint(1e-3, (1.0, 2.0), (1.0,), ())
    with pytest.raises(ValueError, match="pairs"):
        LatencyPoint(1e-3, (1.0,), (1.0,), (), None, (1.0, 2.0), (1.0,))


def test_the_growth_is_the_median_of_the_paired_differences():
    # Each pair moved together (a slow spell hit both); the medians of the two sides do not pair up.
    estimate = paired_difference_over([1.0, 2.0, 30.0], [0.0, 20.0, 29.0], 1.0)
    assert estimate.ratio == pytest.approx(1.0)
