"""The link sweep (issue 20): the seeds' two hosts as one machine's namespaces, RTT by RTT.

One emulated link (djinn.link: the server in its own network namespace behind a veth pair, tbf at
`--djinn-sweep-rate`, half of each RTT on each direction) holds one server for the whole sweep; the
link's RTT is changed in place between points, so no weights are uploaded twice.

- `test_full_djinn_latency[rtt=...]`: rounds of native_pytorch beside full_djinn over loopback and
  over the link, the two full_djinn generations driven in lockstep (`lockstep_steps`) so that their
  decode steps pair step by step, and the link's own RTT by ICMP echo after each round (the round
  trip the goals count the growth in). A decode step of full_djinn
  is one request and its reply (one `decode` per token), so it should grow by one RTT.
- `test_blind_throughput[rtt=...]`: semantic_blind over the link, which ships the whole model
  every step, captured at both ends of the link: each message's Ethernet bytes (as the shaper
  counts them) over the time it took to arrive at the link's far end, against the shaped rate
  (and the same bytes over whole steps, compute included, beside it); the capture's payload
  against the transport's counters.
- `test_link_verdict`: the goals (benchmarks.goals.link) on what this session measured; writes
  `link/<stamp>/sweep.json` and its figure (`benchmarks.report.link`) under --djinn-results.

Where namespaces cannot be made (no root, no kernel support) every test skips with the reason.
"""
from __future__ import annotations

import contextlib
import statistics

import pytest
import zmq

import djinn
from djinn.client import Client, StepRecord
from djinn.link import LinkSpec, parse_link_spec
from djinn.link.emulated import EmulatedLink, link_unavailable_reason, ping_rtt_s
from djinn.link.spec import format_time, parse_rate, parse_time
from djinn.netns_exec import call_in
from djinn.telemetry.wire_capture import Burst, WireBytes, WireCapture, capture_available
from djinn.transport import ClientConnection
from djinn.transport.sockets import HELLO_TIMEOUT_S

from benchmarks.goals.link import LatencyPoint, ThroughputPoint, link_criteria, link_report
from benchmarks.launcher import ServerSpec
from benchmarks.paired_steps import lockstep_steps
from benchmarks.plans import run_plan
from benchmarks.stats import Spread

LEDGER = "link_sweep"
WARMUP_ROUNDS = 2
PING_COUNT = 20
CLIENT_TIMEOUT_S = 900  # a semantic_blind step on a busy 2-core host ships the model: minutes at worst
# A message's end on the wire: no frame of it for this long (see burst_gap_s).
MIN_BURST_GAP_S = 10e-3
# Messages judged against the rate: 8 ms or more at 1 Gbit/s. A shorter one is mostly tbf's bucket
# (one tick of the rate, let through at memory speed) and TCP's slow start after the idle step.
MIN_JUDGED_BURST_BYTES = 1 << 20
CPU_RATE, GPU_RATE = "1gbit", "25gbit"  # the acceptance link on the CPU machine; the seeds' 25 GbE on a GPU

pytestmark = pytest.mark.link_sweep


def _rtts(text: str) -> list[float]:
    return [parse_time(part, "rtt") for part in text.split(",") if part.strip()]


def pytest_generate_tests(metafunc):
    if "sweep_rtt" in metafunc.fixturenames:
        rtts = _rtts(metafunc.config.getoption("--djinn-sweep-rtts"))
        if metafunc.function.__name__ == "test_blind_throughput":
            rtts = _rtts(metafunc.config.getoption("--djinn-sweep-blind-rtts")) or rtts
        metafunc.parametrize("sweep_rtt", rtts, ids=[f"rtt={format_time(r)}" for r in rtts])


@pytest.fixture(scope="module")
def sweep_link(pytestconfig, bench_device):
    """The sweep's link: --djinn-sweep-rate (else --djinn-link's rate, else the device's default), the
    rest of --djinn-link's spec (MTU, GSO, delay element); its RTT is set by each test."""
    reason = link_unavailable_reason()
    if reason:
        pytest.skip(f"link sweep: {reason}")
    given = pytestconfig.getoption("--djinn-link")
    base = parse_link_spec(given or (CPU_RATE if bench_device == "cpu" else GPU_RATE))
    rate = pytestconfig.getoption("--djinn-sweep-rate")
    spec = LinkSpec(parse_rate(rate) if rate else base.rate_bps, 0.0, base.mtu, base.gso, base.delay)
    with EmulatedLink(spec) as link:
        yield link


@pytest.fixture(scope="module")
def sweep_server(sweep_link, bench_device, server_launcher):
    """The CLI's default kernels, not the benchmarks' deterministic ones: the sweep compares times only
    (its two sides share this server), and the deterministic eager step (the H200's 7B: 41 ms, ±10 ms
    run to run there) hid every RTT under 5 ms. HF's eager forward (`--exact`), not the fast path:
    the lockstep's two concurrent sessions need the same path, and the fast path has one bs-1 slot per
    model (on the H200 the loopback side took it, 9.4 ms a step, and the link side decoded on HF eager,
    39.2: `paired_steps.DifferentDecodePaths` now refuses such pairs)."""
    return server_launcher.start("link-sweep", ServerSpec(bench_device, deterministic=False, exact=True),
                                 link=sweep_link)


@pytest.fixture(scope="module")
def sweep_client(sweep_server):
    with djinn.connect(sweep_server.host_port, timeout_s=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def loopback_client(sweep_link, sweep_server):
    """full_djinn over loopback to the sweep's own server: a client made inside the server's
    namespace, where the server's link address is local and the kernel carries it over lo. One
    server on both sides of every pair: two server processes' decode steps differed by up to 2 ms
    (measured here, run to run, either way: memory placement, the host's other load), twice the
    RTT being measured."""

    def connect_there() -> Client:
        # Its own context, made in that namespace: libzmq's I/O threads, which own the TCP
        # connection, start with the context's first socket, in the thread that makes it.
        connection = ClientConnection(sweep_server.address, timeout_s=CLIENT_TIMEOUT_S, context=zmq.Context())
        try:
            connection.confirm(HELLO_TIMEOUT_S)
        except BaseException:
            connection.close()
            raise
        return Client(connection)

    with call_in(sweep_link.server_netns, connect_there) as client:
        yield client


def test_full_djinn_latency(sweep_rtt, sweep_link, sweep_client, loopback_client, bench_model, prompt_ids, benchmark,
                            pytestconfig, ledger, progress):
    """Per-token latency, decode step by decode step: each round generates natively, then on
    loopback and over the link in lockstep (one server, reached both ways; `lockstep_steps`), step i
    of one paired with step i of the other (the same token, the same KV length). The benchmark's
    own timing is that of a whole round."""
    benchmark.group = f"link_sweep-latency-{bench_model.name}"
    sweep_link.set_rtt(sweep_rtt)
    pings: list[float] = []  # the link's ICMP echoes after each round: the round trip it delivered meanwhile
    echoing = True

    def echo_over_the_link() -> None:
        nonlocal echoing
        if not echoing:
            return
        try:
            pings.extend(ping_rtt_s(sweep_link.server_address, PING_COUNT))
        except OSError as exc:  # a raw ICMP socket needs CAP_NET_RAW; the sweep does not
            progress(f"no ICMP echo over the link: {exc}")
            echoing = False

    native = bench_model.load("native_pytorch", None)
    clients = {"loopback": loopback_client, "link": sweep_client}
    remotes = {side: bench_model.load("full_djinn", client) for side, client in clients.items()}
    counters = {side: client.counters for side, client in clients.items()}
    tokens = pytestconfig.getoption("--djinn-sweep-tokens")
    steps: dict[str, list[StepRecord]] = {side: [] for side in ("native", *remotes)}

    def one_round() -> None:
        native.generate(prompt_ids, max_new_tokens=tokens)
        steps["native"].extend(native.last_stats.steps[1:])  # decode steps: the prefill is not a token's
        with contextlib.ExitStack() as opened:
            sessions = {side: opened.enter_context(remote.session()) for side, remote in remotes.items()}
            for side, records in lockstep_steps(sessions, counters, prompt_ids, tokens).items():
                steps[side].extend(records)
        echo_over_the_link()

    for _ in range(WARMUP_ROUNDS):
        one_round()
    for records in [*steps.values(), pings]:
        records.clear()
    benchmark.pedantic(one_round, rounds=pytestconfig.getoption("--djinn-sweep-rounds"), warmup_rounds=0, iterations=1)
    ping = statistics.median(pings) * 1e3 if pings else None
    wall = {side: tuple(s.wall_ms for s in records) for side, records in steps.items()}
    # The step's time off the server (wall less the server's queue and compute): the same pairs
    # without the compute's jitter, to show where the growth is.
    off_server = {side: tuple(s.wall_ms - s.queue_ms - s.compute_ms for s in steps[side]) for side in ("loopback", "link")}
    point = LatencyPoint(sweep_rtt, wall["link"], wall["loopback"], wall["native"], ping,
                         off_server["link"], off_server["loopback"])
    benchmark.extra_info.update({"link": sweep_link.describe(), "rtt_s": sweep_rtt, "ping_rtt_ms": ping,
                                 "ping_samples": len(pings),
                                 "model": bench_model.name, "tokens": tokens,
                                 **{f"{side}_step_ms": list(v) for side, v in wall.items()},
                                 **{f"{side}_off_server_ms": list(v) for side, v in off_server.items()},
                                 **{k: v for side, v in wall.items()
                                    for k, v in Spread.of(v).as_dict(f"{side}_step", "ms").items()}})
    ledger.record(LEDGER, ("latency", sweep_rtt), point)
    shown = "n/a" if ping is None else f"{ping:.3f}"
    progress(f"rtt {format_time(sweep_rtt)} (ping {shown} ms): link {statistics.median(point.link_step_ms):.3f}, "
             f"loopback {statistics.median(point.loopback_step_ms):.3f}, native "
             f"{statistics.median(point.native_step_ms):.3f} ms/token over {len(point.link_step_ms)} paired steps; "
             f"grew {point.growth_ms:.3f} ms (off the server {point.off_server_growth_ms:.3f} ms)")


def burst_gap_s(rtt_s: float) -> float:
    """The quiet time that ends a message on the wire: longer than slow start's pauses (one RTT
    each), shorter than the server's compute between a request and its reply."""
    return max(MIN_BURST_GAP_S, 2 * rtt_s)


def delivered_bursts(near: WireBytes, far: WireBytes) -> list[Burst]:
    """Each direction's messages where the link delivered them: requests at the server's end
    (`far`), replies at the client's (`near`). At its sending end a message is timed by the
    sender's TCP, which may run a window ahead of the shaper."""
    return [*far.to_port.bursts, *near.from_port.bursts]


def test_blind_throughput(sweep_rtt, sweep_link, sweep_server, sweep_client, bench_model, prompt_ids, benchmark,
                          pytestconfig, ledger, progress):
    benchmark.group = f"link_sweep-blind-{bench_model.name}"
    ok, reason = capture_available(sweep_link.client_interface)
    if not ok:
        pytest.skip(f"semantic_blind's throughput is measured on the wire: {reason}")
    sweep_link.set_rtt(sweep_rtt)
    remote = bench_model.load("semantic_blind", sweep_client)
    runs = pytestconfig.getoption("--djinn-sweep-blind-runs")
    plan = run_plan("semantic_blind", bench_model.weight_bytes, pytestconfig, new_tokens=3, runs=runs, warmup=1)
    stats = []

    def run_once() -> None:
        remote.generate(prompt_ids, max_new_tokens=plan.new_tokens)
        stats.append(remote.last_stats)

    for _ in range(plan.warmup):
        run_once()
    stats.clear()
    gap = burst_gap_s(sweep_rtt)
    ends = sweep_link.ends
    with WireCapture(sweep_server.port, ends.client_interface, burst_gap_s=gap) as near, \
            WireCapture(sweep_server.port, ends.server_interface, netns=ends.server_netns, burst_gap_s=gap) as far:
        benchmark.pedantic(run_once, rounds=plan.runs, warmup_rounds=0, iterations=1)
    bursts = [b for b in delivered_bursts(near.result, far.result) if b.wire_bytes >= MIN_JUDGED_BURST_BYTES]
    if not bursts:
        pytest.fail(f"semantic_blind sent no message of {MIN_JUDGED_BURST_BYTES} B or more over the link")
    counted = sum(s.bytes_sent + s.bytes_received for s in stats)
    captured = near.result.unique_payload_bytes
    # Whole steps, compute included: the run's segmented bytes over its wall time, beside the wire's figure.
    segmented_per_byte = (near.result.to_port.segmented_wire_bytes + near.result.from_port.segmented_wire_bytes) \
        / max(1, near.result.payload_bytes)
    step_bps = tuple((s.bytes_sent + s.bytes_received) * segmented_per_byte * 8 / (s.total_ms / 1e3) for s in stats)
    point = ThroughputPoint(sweep_rtt, sweep_link.spec.rate_bps, tuple(b.rate_bps for b in bursts), step_bps,
                            counted, captured)
    benchmark.extra_info.update({"link": sweep_link.describe(), "rtt_s": sweep_rtt, "model": bench_model.name,
                                 "runs": plan.runs, "new_tokens": plan.new_tokens,
                                 "burst_wire_bps": list(point.burst_wire_bps),
                                 "burst_bytes": [b.wire_bytes for b in bursts],
                                 "burst_s": [b.duration_s for b in bursts], "burst_gap_s": gap,
                                 "run_step_bps": list(step_bps), "counted_bytes": counted,
                                 "captured_payload_bytes": captured, "far_end_payload_bytes":
                                     far.result.unique_payload_bytes,
                                 "rate_fraction_median": point.rate_fraction.median})
    ledger.record(LEDGER, ("throughput", sweep_rtt), point)
    progress(f"rtt {format_time(sweep_rtt)}: semantic_blind's {len(bursts)} messages arrived at "
             f"{statistics.median(point.burst_wire_bps) / 1e9:.3f} Gbit/s, {point.rate_fraction.median:.1%} of "
             f"{sweep_link.spec.rate_bps / 1e9:g} Gbit/s (whole steps {statistics.median(step_bps) / 1e9:.3f}); "
             f"capture {captured} B vs counters {counted} B")


def test_link_verdict(bench_model, results_writer, ledger, progress):
    held = ledger.results(LEDGER)
    if not held:
        pytest.skip("nothing of the link sweep was measured in this session")
    latency = {k[1]: v for k, v in held.items() if k[0] == "latency"}
    throughput = {k[1]: v for k, v in held.items() if k[0] == "throughput"}
    verdict = link_criteria(latency, throughput)
    link = next((p for p in throughput.values()), None)
    data = {"experiment": "link_sweep", "model": bench_model.name, "model_shape": bench_model.shape,
            "rate_bps": link.rate_bps if link else None, "verdict": verdict.as_dict(),
            **link_report(latency, throughput)}
    path = results_writer.write(f"link/{results_writer.stamp}/sweep.json", data)
    from benchmarks.report.link import plot_link_sweep

    plot_link_sweep(data, path.with_suffix(".png"))
    for line in verdict.summary().splitlines():
        progress(line)
    assert verdict.passed, "\n" + verdict.summary()
