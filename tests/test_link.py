"""The emulated link, live: namespaces built and torn down, the delay and rate applied, the capture
on its veth agreeing with the transport's counters, a server started inside it.

Needs root (network namespaces, veth, tc); every live test skips with the reason elsewhere. The
figures asserted are lower bounds a link must respect (nothing arrives before its delay, no transfer
beats its rate) or exact agreements, never timing goals: those are the link sweep's
(benchmarks/test_link_sweep.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

import djinn
from djinn.link import parse_link_spec
from djinn.link.delay_line import EARLY_GUARD_NS, MAX_EARLY_NS, MIN_EARLY_NS, DelayLine, next_early_ns
from djinn.link.emulated import (PREFIX, EmulatedLink, cleanup_stale, link_unavailable_reason, ping_rtt_s,
                                 tbf_parameters)
from djinn.netns_exec import SCRIPT as NETNS_EXEC
from djinn.netns_exec import call_in
from djinn.telemetry.wire_capture import WireCapture, capture_available
from djinn.transport import ClientConnection, ServerSocket

from benchmarks.launcher import cpu_server
from tcp_sink import byte_sink

AGREEMENT = 0.02
TRANSFER_ELEMENTS = (32 << 20) // 4  # 32 MB: seconds through the delay line on a busy 2-core host
UNAVAILABLE = link_unavailable_reason()
live = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"emulated link: {UNAVAILABLE}")


def namespaces() -> set[str]:
    from pyroute2 import netns

    return {n for n in netns.listnetns() if n.startswith(PREFIX)}


# -- the delay line on its own (no privilege needed) ---------------------------------------------
def test_the_delay_line_holds_each_frame_for_its_delay_in_order():
    a_in, a = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b, b_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
    delay_ns = 30_000_000
    line = DelayLine(a, b, delay_ns)
    sent_at = time.time_ns()
    for frame in (b"one", b"two"):
        a_in.send(frame)
    b_out.settimeout(5)
    got: list[tuple[bytes, int]] = []
    worker = threading.Thread(target=line.run, args=(lambda: len(got) == 2,), daemon=True)
    worker.start()
    for _ in range(2):
        got.append((b_out.recv(100), time.time_ns()))
    worker.join(5)
    assert [frame for frame, _ in got] == [b"one", b"two"]
    assert all(arrived - sent_at >= delay_ns for _, arrived in got)
    assert line.forwarded == 2 and line.dropped == 0


def test_the_delay_lines_waits_end_as_early_as_its_wake_ups_have_been_late():
    early = MIN_EARLY_NS
    early = next_early_ns(early, 150_000)  # a late wake-up: the next wait ends that much earlier at once
    assert early == 150_000 + EARLY_GUARD_NS
    for _ in range(200):  # punctual wake-ups: it comes back down, not below the floor
        early = next_early_ns(early, 1_000)
    assert early == MIN_EARLY_NS
    assert next_early_ns(MIN_EARLY_NS, 10**9) == MAX_EARLY_NS  # a wake-up seconds late: the spin stays bounded


def test_netns_exec_refuses_bad_usage_and_a_missing_namespace():
    usage = subprocess.run([sys.executable, NETNS_EXEC, "only-a-name"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    if UNAVAILABLE is None:
        missing = subprocess.run([sys.executable, NETNS_EXEC, f"{PREFIX}no-such", "--", "true"],
                                 capture_output=True, text=True)
        assert missing.returncode == 1 and "cannot enter network namespace" in missing.stderr


def test_call_in_a_missing_namespace_raises_in_the_caller():
    if UNAVAILABLE is not None:
        pytest.skip(f"emulated link: {UNAVAILABLE}")
    with pytest.raises(OSError):
        call_in(f"{PREFIX}no-such", lambda: None)


# -- live links ----------------------------------------------------------------------------------
@live
def test_what_call_in_makes_stays_in_the_namespace():
    with EmulatedLink(parse_link_spec("1gbit")) as link:
        there = call_in(link.server_netns, lambda: {name for _, name in socket.if_nameindex()})
        assert there == {"lo", link.ends.server_interface}
        assert link.ends.server_interface not in {name for _, name in socket.if_nameindex()}  # this thread: unmoved
        with pytest.raises(ZeroDivisionError):
            call_in(link.server_netns, lambda: 1 / 0)


@live
def test_a_link_is_torn_down_at_exit_also_after_a_failure():
    before = namespaces()
    with pytest.raises(RuntimeError, match="inside the body"):
        with EmulatedLink(parse_link_spec("1gbit,rtt=1ms")) as link:
            made = namespaces() - before
            assert link.server_netns in made
            interface = link.client_interface
            assert os.path.exists(f"/sys/class/net/{interface}")
            raise RuntimeError("inside the body")
    assert namespaces() == before
    assert not os.path.exists(f"/sys/class/net/{interface}")


@live
def test_stale_namespaces_of_a_dead_process_are_cleaned_up():
    from pyroute2 import netns

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{PREFIX}{int(dead.stdout)}-0badc0-srv"
    mine = f"{PREFIX}{os.getpid()}-0badc1-srv"
    netns.create(stale)
    netns.create(mine)
    try:
        removed = cleanup_stale()
        assert stale in removed and mine not in removed
        assert stale not in namespaces() and mine in namespaces()
    finally:
        for name in (stale, mine):
            if name in namespaces():
                netns.remove(name)


@live
def test_the_round_trip_is_never_shorter_than_the_links_rtt():
    with EmulatedLink(parse_link_spec("1gbit,rtt=0")) as link:
        floor = min(ping_rtt_s(link.server_address, 5))
        link.set_rtt(4e-3)
        samples = ping_rtt_s(link.server_address, 10)
        assert min(samples) >= 4e-3, samples
        link.set_rtt(0.0)
        assert min(ping_rtt_s(link.server_address, 5)) < 4e-3  # changed in place, both ways
    assert floor < 4e-3


def _in_netns(name: str, target) -> threading.Thread:
    """`target` on a thread that joined `name` first: a network namespace is per thread, and a
    socket bound there stays there (libzmq creates a listener in the binding thread)."""
    from pyroute2 import netns

    def run():
        netns.setns(name, flags=0)
        target()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@live
def test_the_capture_on_the_links_veth_agrees_with_the_transports_counters():
    ok, reason = capture_available()
    if not ok:
        pytest.skip(f"wire capture: {reason}")
    with EmulatedLink(parse_link_spec("20gbit,rtt=200us")) as link:
        bound: list[ServerSocket] = []
        stop = threading.Event()

        def serve():
            # A context of its own: libzmq's I/O threads join the namespace of the thread that
            # makes the context's first socket, and the client's must stay in this one.
            server = ServerSocket(f"tcp://{link.server_address}:0", ["sink"], context=zmq.Context())
            bound.append(server)
            while not stop.is_set():
                incoming = server.receive(50)
                if incoming is not None:
                    server.reply(incoming.peer, incoming.request_id, {"n": len(incoming.message.tensors)})
            server.close()

        interface = link.client_interface
        thread = _in_netns(link.server_netns, serve)
        deadline = time.monotonic() + 30
        while not bound and time.monotonic() < deadline:
            time.sleep(0.01)
        server = bound[0]
        port = int(server.address.rsplit(":", 1)[1])
        data = torch.arange(TRANSFER_ELEMENTS, dtype=torch.float32)
        try:
            with ClientConnection(server.address, timeout_s=120) as client:
                client.request("sink")  # connect and handshake before the measured region
                before = client.counters.snapshot()
                with WireCapture(port, link.client_interface) as capture:
                    client.request("sink", tensors={f"part{i}": c for i, c in enumerate(data.chunk(2))})
                counted = client.counters.since(before)
        finally:
            stop.set()
            thread.join(10)
    wire = capture.result
    framed = counted.sent_total + counted.received_total
    assert wire.interface == interface and wire.kernel_drops == 0
    assert counted.sent_payload == TRANSFER_ELEMENTS * 4
    assert abs(wire.unique_payload_bytes - framed) <= AGREEMENT * framed, (wire, counted)
    # Ethernet frames: the wire carries at least the payload and the 14-byte header of every frame.
    assert wire.wire_bytes >= wire.payload_bytes + 14 * wire.packets


@live
def test_no_transfer_beats_the_links_rate():
    rate = parse_link_spec("200mbit")
    with EmulatedLink(rate) as link:
        thread, received = byte_sink(link, 7009)
        payload = bytes(8 << 20)
        sender = socket.create_connection((link.server_address, 7009), timeout=10)
        start = time.perf_counter()
        with sender:
            sender.sendall(payload)
            sender.shutdown(socket.SHUT_WR)
            thread.join(60)
        elapsed = time.perf_counter() - start
    assert received == [len(payload)]
    # tbf may let one bucket through at once.
    assert elapsed >= (len(payload) - tbf_parameters(rate).burst_bytes) * 8 / rate.rate_bps, elapsed


@live
def test_a_server_in_the_links_namespace_serves_full_djinn(server_launcher, tiny_model, make_prompt, hf_greedy):
    with EmulatedLink(parse_link_spec("10gbit,rtt=1ms")) as link:
        server = server_launcher.start("on-link", cpu_server(), link=link)
        try:
            assert server.host_port.startswith(link.server_address + ":")
            prompt = make_prompt(tiny_model, 8)
            expected, _ = hf_greedy(tiny_model, prompt, 4)
            with djinn.connect(server.host_port, timeout_s=120) as client:
                remote = client.load(tiny_model, mode="full_djinn")
                tokens = remote.generate(prompt, max_new_tokens=4)
                steps = [s.wall_ms for s in remote.last_stats.steps]
            assert torch.equal(tokens, expected)
            assert min(steps) >= 1.0  # every step is a round trip of the 1 ms link
            assert server_launcher.describe()[-1]["link"]["server_netns"] == link.server_netns
        finally:
            server.stop()
