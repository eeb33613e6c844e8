"""The emulated link's round trip as the transport sees it: request/reply of an empty message.

    python -m benchmarks.probes.link_round_trip [--rate 1gbit] [--rtts 0,1ms,5ms] [--count 300]

One echo server per measurement on a thread in the link's server namespace (djinn.link), and
the same on loopback before and after; prints one JSON line per measurement: median and
quartiles of the round trip in ms, the ICMP echo over the link beside it, and the link's one-way
delay each way as the kernel sees it (each request's frame stamped by a capture at the client's
veth end and at the server's, each reply's the other way round: no process wake-up in it). It
separates the link's own cost (what its delay element adds at RTT 0, how much of an RTT a
request/reply actually grows by, and how much of that the wire itself holds) from the noise of a
model's decode step on a shared host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from contextlib import ExitStack

import zmq

from djinn.link import parse_link_spec
from djinn.link.emulated import EmulatedLink, link_unavailable_reason, ping_rtt_s
from djinn.link.spec import parse_time
from djinn.telemetry.wire_capture import WireCapture
from djinn.transport import ClientConnection, ServerSocket


def _serve(address: str, bound: list, stop: threading.Event, netns: str | None) -> None:
    if netns is not None:
        from pyroute2 import netns as namespaces

        namespaces.setns(netns, flags=0)  # this thread only: the client stays in ours
    # Its own context: libzmq's I/O threads join the namespace of the thread that makes its first socket.
    server = ServerSocket(address, ["echo"], context=zmq.Context())
    bound.append(server)
    while not stop.is_set():
        incoming = server.receive(50)
        if incoming is not None:
            server.reply(incoming.peer, incoming.request_id, {})
    server.close()


# Shorter than any gap between two requests' frames, longer than between a message's own frames.
FRAME_GAP_S = 10e-6


def _one_way_us(leaving: list, arriving: list) -> float:
    return statistics.median((b.first_ns - a.first_ns) / 1e3 for a, b in zip(leaving, arriving))


def round_trips_ms(address: str, count: int, netns: str | None = None,
                   link: EmulatedLink | None = None) -> tuple[list[float], dict]:
    """The round trips, and with `link` the kernel's one-way delays each way (medians, µs)."""
    bound: list = []
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(address, bound, stop, netns), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not bound:
        if time.monotonic() > deadline:
            raise RuntimeError(f"echo server on {address} did not bind within 30 s")
        time.sleep(0.01)
    one_way: dict = {}
    try:
        with ClientConnection(bound[0].address, timeout_s=30) as client, ExitStack() as captures:
            client.request("echo")  # connect and handshake first
            if link is not None:
                port, ends = int(bound[0].address.rsplit(":", 1)[1]), link.ends
                near = captures.enter_context(WireCapture(port, ends.client_interface, burst_gap_s=FRAME_GAP_S))
                far = captures.enter_context(WireCapture(port, ends.server_interface, netns=ends.server_netns,
                                                         burst_gap_s=FRAME_GAP_S))
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                client.request("echo")
                samples.append((time.perf_counter() - start) * 1e3)
    finally:
        stop.set()
        thread.join(10)
    if link is not None:
        one_way = {"one_way_up_us": _one_way_us(near.result.to_port.bursts, far.result.to_port.bursts),
                   "one_way_down_us": _one_way_us(far.result.from_port.bursts, near.result.from_port.bursts),
                   "messages_up": [len(near.result.to_port.bursts), len(far.result.to_port.bursts)]}
    return samples, one_way


def _row(where: str, samples: list[float], **extra) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return {"where": where, "round_trip_ms_median": median, "round_trip_ms_q1": q1, "round_trip_ms_q3": q3,
            "n": len(samples), **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--rtts", default="0,1ms,5ms")
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args(argv)
    reason = link_unavailable_reason()
    if reason:
        print(json.dumps({"error": f"no emulated link here: {reason}"}))
        return 1
    print(json.dumps(_row("loopback", round_trips_ms("tcp://127.0.0.1:0", args.count)[0])), flush=True)
    with EmulatedLink(parse_link_spec(args.rate)) as link:
        for rtt in (parse_time(t, "rtt") for t in args.rtts.split(",")):
            link.set_rtt(rtt)
            ping = statistics.median(ping_rtt_s(link.server_address, 20)) * 1e3
            samples, one_way = round_trips_ms(f"tcp://{link.server_address}:0", args.count, link.server_netns, link)
            print(json.dumps(_row("link", samples, rtt_ms=rtt * 1e3, ping_ms=ping, **one_way, link=link.describe())),
                  flush=True)
    print(json.dumps(_row("loopback", round_trips_ms("tcp://127.0.0.1:0", args.count)[0])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
