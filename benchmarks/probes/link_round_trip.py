"""The emulated link's round trip as the transport sees it: request/reply of an empty message.

    python -m benchmarks.probes.link_round_trip [--rate 1gbit] [--rtts 0,1ms,5ms] [--count 300]

One echo server per measurement on a thread in the link's server namespace (djinn.link), and
the same on loopback before and after; prints one JSON line per measurement: median and
quartiles of the round trip in ms, and the ICMP echo over the link beside it. It separates the
link's own cost (what its delay element adds at RTT 0, how much of an RTT a request/reply
actually grows by) from the noise of a model's decode step on a shared host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import zmq

from djinn.link import parse_link_spec
from djinn.link.emulated import EmulatedLink, link_unavailable_reason, ping_rtt_s
from djinn.link.spec import parse_time
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


def round_trips_ms(address: str, count: int, netns: str | None = None) -> list[float]:
    bound: list = []
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(address, bound, stop, netns), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not bound:
        if time.monotonic() > deadline:
            raise RuntimeError(f"echo server on {address} did not bind within 30 s")
        time.sleep(0.01)
    try:
        with ClientConnection(bound[0].address, timeout_s=30) as client:
            client.request("echo")  # connect and handshake first
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                client.request("echo")
                samples.append((time.perf_counter() - start) * 1e3)
    finally:
        stop.set()
        thread.join(10)
    return samples


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
    print(json.dumps(_row("loopback", round_trips_ms("tcp://127.0.0.1:0", args.count))), flush=True)
    with EmulatedLink(parse_link_spec(args.rate)) as link:
        for rtt in (parse_time(t, "rtt") for t in args.rtts.split(",")):
            link.set_rtt(rtt)
            ping = statistics.median(ping_rtt_s(link.server_address, 20)) * 1e3
            samples = round_trips_ms(f"tcp://{link.server_address}:0", args.count, link.server_netns)
            print(json.dumps(_row("link", samples, rtt_ms=rtt * 1e3, ping_ms=ping, link=link.describe())), flush=True)
    print(json.dumps(_row("loopback", round_trips_ms("tcp://127.0.0.1:0", args.count))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
