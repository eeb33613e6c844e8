"""An emulated network link between this process and a server in its own network namespace.

`EmulatedLink(spec)` is a context manager that builds, through pyroute2 (no `ip` or `tc`
binary: the GPU host has neither):

* a network namespace for the server, ``djinn-link-<pid>-<token>-srv``, with ``lo`` up;
* a veth pair: ``dl<token>c`` stays in this (the client's) namespace, ``dl<token>s`` is the
  server's; a /30 of 10.213.0.0/16 on the two ends and nowhere else (the client's end gets the
  connected route of that /30 only);
* each direction shaped at the spec's rate by tbf, with half the RTT of delay:
  - where the kernel has sch_netem: tbf on each end's egress and ``netem`` (its child) under it;
  - else the user-space delay line (`djinn.link.delay_line`) in a third namespace ``...-wire``
    between the two ends, which forwards every frame after half the RTT each way, and tbf on the
    wire namespace's two egresses (after the delay line; see `_build`).
* with ``gso=off`` in the spec, ``gso_max_segs`` 1 on every end: TCP hands the qdisc and the
  capture MTU-sized frames, as a NIC without offloads puts them on the wire. By default the stack
  sends 64 KiB super-frames, as to a NIC with TSO: tbf and netem count each of its segments'
  headers (qdisc_pkt_len), so the shaped rate is of the segmented wire either way, and the
  capture's payload is exact either way (its header count is then a lower bound).

Queues: tbf and netem hold at least the bandwidth-delay product plus the largest TCP window a
receiver here advertises, so the shaper never drops a segment of the one connection a benchmark
runs (a drop would be a loss the cable does not have, and TCP would halve its rate).

Everything is torn down on exit, also when the body raised (removing a namespace removes its veth
ends and so their peers); `cleanup_stale()` removes namespaces of this prefix whose creating
process is gone (a killed pytest), and runs before every new link. `link_unavailable_reason()`
says why a link cannot be made here (no privilege, no kernel support), for fixtures and the doctor.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from djinn.errors import DjinnError
from djinn.link import delay_line
from djinn.link.delay_line import READY_LINE
from djinn.link.spec import LinkSpec

PREFIX = "djinn-link-"
SUBNET = ipaddress.ip_network("10.213.0.0/16")  # private; one /30 per link
# Held while an address is picked and assigned, so parallel links (other pytest workers) never
# pick the same /30.
ALLOCATION_LOCK = Path(tempfile.gettempdir()) / "djinn-link.lock"
ETH_HLEN = 14
MIN_FRAME = 64  # Ethernet's minimum frame: the most packets a queue of N bytes can hold
# Linux's largest default receive window (net.ipv4.tcp_rmem[2], 6 MiB) with room for slow start's
# overshoot: what one TCP connection can have queued beyond the BDP.
TCP_WINDOW_BYTES = 32 << 20
# tbf's bucket: two of the largest frames the stack sends (larger ones tbf would segment in
# software), or one timer tick of the rate when that is more (tc-tbf(8): burst >= rate/HZ; this
# machine's kernel has CONFIG_HZ=250). tbf's watchdog is an hrtimer, but its dequeue runs in the
# NET_TX softirq, which a loaded host defers to ksoftirqd by up to a tick: with a 100 µs bucket the
# link idled through every late wake-up (the 2-core machine at load 14-17 ran at 72-90% of the
# rate). A tick's bucket refills while the dequeue is late; its cost is one tick of bytes sent at
# memory speed after an idle spell (0.5 MB at 1 Gbit/s, ~1% of a blind step's request).
BUCKET_FRAMES = 2
KERNEL_HZ = 250
BUCKET_S = 1 / KERNEL_HZ
GSO_FRAME_BYTES = 65536 + 45 * 66  # a 64 KiB super-frame and its ~45 segments' Ethernet/IP/TCP headers
DELAY_LINE_READY_S = 30.0
DELAY_LINE_SCRIPT = str(Path(delay_line.__file__).resolve())  # by path: see its docstring
LINK_SETUP_TIMEOUT_S = 30.0


class LinkUnavailable(DjinnError):
    """A link cannot be emulated here; the message says why (privilege, kernel support)."""


@dataclass(frozen=True)
class LinkEnds:
    """Names and addresses of a built link."""
    server_netns: str
    wire_netns: str | None  # the delay line's namespace, None with netem
    client_interface: str  # in this process's namespace: capture here
    server_interface: str
    client_address: str
    server_address: str
    delay: str  # "netem" or "userspace": what made the delay


def _pyroute2():
    try:
        from pyroute2 import IPRoute, NetNS, netns
    except ImportError as exc:  # pragma: no cover - a dependency
        raise LinkUnavailable(f"pyroute2 is not installed ({exc})") from exc
    return IPRoute, NetNS, netns


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove this prefix's namespaces whose creating process is gone; returns their names."""
    _, _, netns = _pyroute2()
    removed = []
    for name in netns.listnetns():
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                netns.remove(name)
                removed.append(name)
            except OSError:
                pass  # another process's cleanup took it first
    return removed


def kernel_has_netem() -> bool:
    """Whether the kernel can make a netem qdisc (built in or loadable): tried on a throwaway veth."""
    IPRoute, _, _ = _pyroute2()
    name = f"dlprobe{secrets.token_hex(3)}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": name + "p"})
        try:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.tc("add", "netem", index, handle="1:", delay=1)
            return True
        except Exception:  # noqa: BLE001 - ENOENT: no such qdisc kind; anything else: not usable either
            return False
        finally:
            ipr.link("del", ifname=name)


def link_unavailable_reason() -> str | None:
    """None when a link can be emulated here; else why not (for a fixture's skip and the doctor)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    try:
        IPRoute, _, netns = _pyroute2()
    except LinkUnavailable as exc:
        return str(exc)
    name = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        netns.create(name)
    except Exception as exc:  # noqa: BLE001 - EPERM, no /run, no CONFIG_NET_NS: the reason is the point
        return f"cannot create a network namespace ({type(exc).__name__}: {exc}; needs root / CAP_SYS_ADMIN)"
    try:
        netns.remove(name)
    except OSError:
        pass
    try:
        with IPRoute() as ipr:
            probe = f"dlprobe{secrets.token_hex(3)}"
            ipr.link("add", ifname=probe, kind="veth", peer={"ifname": probe + "p"})
            try:
                index = ipr.link_lookup(ifname=probe)[0]
                ipr.tc("add", "tbf", index, handle="1:", rate="1gbit", burst=64 << 10, limit=1 << 20)
            finally:
                ipr.link("del", ifname=probe)
    except Exception as exc:  # noqa: BLE001
        return f"cannot make a veth pair shaped by tbf ({type(exc).__name__}: {exc}; needs CONFIG_VETH, CONFIG_NET_SCH_TBF)"
    return None


def describe_support() -> str:
    """One line on how a link would be made here (the doctor's detail when it can)."""
    delay = "netem in the kernel" if kernel_has_netem() else \
        "the user-space delay line (this kernel has no netem; the rate is tbf's)"
    return f"network namespace, veth and tbf work; delay by {delay}"


def _free_subnet(ipr) -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
            for a in ipr.get_addr(family=socket.AF_INET)]
    candidates = list(SUBNET.subnets(new_prefix=30))
    for _ in range(64):
        net = candidates[secrets.randbelow(len(candidates))]
        if not any(net.overlaps(u) for u in used):
            return net
    raise LinkUnavailable(f"no free /30 in {SUBNET} for the link's addresses")


def queue_bytes(spec: LinkSpec) -> int:
    return spec.bdp_bytes + TCP_WINDOW_BYTES


@dataclass(frozen=True)
class TbfParameters:
    """What tbf is given on each egress of a link: its rate, bucket and queue, in tc's units."""
    rate_bps: int
    burst_bytes: int  # the bucket: bytes that may leave back to back after an idle spell
    limit_bytes: int  # the queue behind the bucket


def tbf_parameters(spec: LinkSpec) -> TbfParameters:
    frame = GSO_FRAME_BYTES if spec.gso else spec.mtu + ETH_HLEN
    burst = max(BUCKET_FRAMES * frame, round(spec.rate_bytes_per_s * BUCKET_S))
    return TbfParameters(spec.rate_bps, burst, queue_bytes(spec))


def _shape(ipr, index: int, spec: LinkSpec, with_netem: bool) -> None:
    """tbf at the rate on `index`'s egress, and (`with_netem`) half the RTT by netem under it."""
    tbf = tbf_parameters(spec)
    ipr.tc("add", "tbf", index, handle="1:", rate=f"{tbf.rate_bps}bit", burst=tbf.burst_bytes,
           limit=tbf.limit_bytes)
    if with_netem:
        ipr.tc("add", "netem", index, handle="10:", parent="1:1", delay=_delay_us(spec),
               limit=tbf.limit_bytes // MIN_FRAME)


def _delay_us(spec: LinkSpec) -> int:
    # netem's legacy latency field is whole microseconds here (pyroute2's time2tick).
    return round(spec.one_way_delay_s * 1e6)


def _veth(ipr, name: str, peer: str, peer_netns: str, spec: LinkSpec, local_netns: str | None = None) -> None:
    # gso_max_segs at creation (kernels before 5.19 cannot change it later).
    segments = {} if spec.gso else {"gso_max_segs": 1}
    ipr.link("add", ifname=name, kind="veth", mtu=spec.mtu, **segments,
             peer={"ifname": peer, "net_ns_fd": peer_netns, "mtu": spec.mtu, **segments})
    if local_netns is not None:
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], net_ns_fd=local_netns)


class EmulatedLink:
    """The link of `spec`, built on enter and torn down on exit (also on failure)."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self.ends: LinkEnds | None = None
        self._stack = ExitStack()
        self._delay_line: subprocess.Popen | None = None
        self._token = secrets.token_hex(3)

    # -- the public face -------------------------------------------------------------------
    @property
    def server_netns(self) -> str:
        return self._require().server_netns

    @property
    def server_address(self) -> str:
        return self._require().server_address

    @property
    def client_interface(self) -> str:
        return self._require().client_interface

    @property
    def delay(self) -> str:
        return self._require().delay

    def describe(self) -> dict:
        ends = self._require()
        return {"spec": str(self.spec), "rate_bps": self.spec.rate_bps, "rtt_s": self.spec.rtt_s,
                "mtu": self.spec.mtu, "gso": self.spec.gso, "delay": ends.delay, "queue_bytes": queue_bytes(self.spec),
                "tbf_burst_bytes": tbf_parameters(self.spec).burst_bytes, "server_netns": ends.server_netns,
                "client_interface": ends.client_interface, "server_interface": ends.server_interface,
                "server_address": ends.server_address}

    def set_rtt(self, rtt_s: float) -> None:
        """Change the round trip in place (the servers and their connections stay)."""
        spec = self.spec.with_rtt(rtt_s)
        ends = self._require()
        if ends.delay == "netem":
            IPRoute, NetNS, _ = _pyroute2()
            with IPRoute() as ipr:
                self._change_netem(ipr, ends.client_interface, spec)
            with NetNS(ends.server_netns) as ns:
                self._change_netem(ns, ends.server_interface, spec)
        else:
            self._stop_delay_line()
            self._start_delay_line(ends.wire_netns, spec)
        self.spec = spec

    # -- building ---------------------------------------------------------------------------
    def __enter__(self) -> "EmulatedLink":
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self.ends = None

    def _require(self) -> LinkEnds:
        if self.ends is None:
            raise RuntimeError("the link is not built: use it inside `with EmulatedLink(spec) as link:`")
        return self.ends

    def _build(self) -> None:
        IPRoute, NetNS, netns = _pyroute2()
        cleanup_stale()
        use_netem = {"netem": True, "userspace": False}.get(self.spec.delay)
        if use_netem is None:
            use_netem = kernel_has_netem()
        base = f"{PREFIX}{os.getpid()}-{self._token}"
        server_ns, wire_ns = f"{base}-srv", (None if use_netem else f"{base}-wire")
        client_if, server_if = f"dl{self._token}c", f"dl{self._token}s"
        for name in filter(None, (server_ns, wire_ns)):
            netns.create(name)
            self._stack.callback(netns.remove, name)
        with open(ALLOCATION_LOCK, "a") as lock, IPRoute() as ipr:
            fcntl.flock(lock, fcntl.LOCK_EX)
            net = _free_subnet(ipr)
            client_addr, server_addr = (str(h) for h in list(net.hosts())[:2])
            if use_netem:
                _veth(ipr, client_if, server_if, server_ns, self.spec)
            else:
                # client end <-> wire (wc), wire (ws) <-> server end: the delay line joins wc and ws.
                _veth(ipr, client_if, f"dl{self._token}wc", wire_ns, self.spec)
                _veth(ipr, f"dl{self._token}ws", server_if, server_ns, self.spec, local_netns=wire_ns)
            # Deleting the root end deletes its peer: undone even if a namespace removal fails.
            self._stack.callback(_delete_link, client_if)
            index = ipr.link_lookup(ifname=client_if)[0]
            ipr.addr("add", index=index, address=client_addr, prefixlen=net.prefixlen)
            ipr.link("set", index=index, state="up")
            if use_netem:
                _shape(ipr, index, self.spec, with_netem=True)
        with NetNS(server_ns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            index = ns.link_lookup(ifname=server_if)[0]
            ns.addr("add", index=index, address=server_addr, prefixlen=net.prefixlen)
            ns.link("set", index=index, state="up")
            if use_netem:
                _shape(ns, index, self.spec, with_netem=True)
        self.ends = LinkEnds(server_ns, wire_ns, client_if, server_if, client_addr, server_addr,
                             "netem" if use_netem else "userspace")
        if wire_ns is not None:
            with NetNS(wire_ns) as ns:
                for name in (f"dl{self._token}wc", f"dl{self._token}ws"):
                    index = ns.link_lookup(ifname=name)[0]
                    ns.link("set", index=index, state="up")
                    # The rate on the wire's own egress, after the delay line: a frame the line
                    # has read is freed on the sender's side, so TCP's small-queue limit (about
                    # 1 ms of its pacing rate may wait in qdiscs) never couples to the queue.
                    _shape(ns, index, self.spec, with_netem=False)
            self._stack.callback(self._stop_delay_line)
            self._start_delay_line(wire_ns, self.spec)
        _wait_reachable(server_addr)

    @staticmethod
    def _change_netem(ipr, interface: str, spec: LinkSpec) -> None:
        index = ipr.link_lookup(ifname=interface)[0]
        # replace: creates or changes, so a netem that some tc call already changed cannot make it fail.
        ipr.tc("replace", "netem", index, handle="10:", parent="1:1", delay=_delay_us(spec),
               limit=queue_bytes(spec) // MIN_FRAME)

    def _start_delay_line(self, wire_ns: str, spec: LinkSpec) -> None:
        argv = [sys.executable, DELAY_LINE_SCRIPT, wire_ns, f"dl{self._token}wc", f"dl{self._token}ws",
                str(round(spec.one_way_delay_s * 1e9))]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        from djinn.server.process import ServerStartError, wait_for_ready_line

        try:
            ready = wait_for_ready_line(process, READY_LINE, DELAY_LINE_READY_S, "the link's delay line")
        except ServerStartError as exc:
            raise LinkUnavailable(f"{exc}: {process.stderr.read().strip()}") from None
        if ready is None:
            process.kill()
            raise LinkUnavailable(f"the link's delay line was not ready within {DELAY_LINE_READY_S:.0f} s")
        self._delay_line = process

    def _stop_delay_line(self) -> None:
        process, self._delay_line = self._delay_line, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _delete_link(name: str) -> None:
    IPRoute, _, _ = _pyroute2()
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)


def _wait_reachable(address: str, timeout_s: float = LINK_SETUP_TIMEOUT_S) -> None:
    """Until a TCP connect to `address` is refused (the server end answers: no route problem, ARP done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            try:
                probe.connect((address, 9))  # discard: nothing listens in the fresh namespace
                return
            except ConnectionRefusedError:
                return
            except OSError:
                time.sleep(0.05)
    raise LinkUnavailable(f"the link's server end {address} did not answer within {timeout_s:.0f} s")


def ping_rtt_s(address: str, count: int = 20, payload: int = 56) -> list[float]:
    """Round trips of ICMP echoes to `address` (a raw socket: root), the link's own RTT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(2.0)
    ident, samples = os.getpid() & 0xFFFF, []
    try:
        for seq in range(count):
            body = bytes(payload)
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = header[:2] + struct.pack("!H", _checksum(header + body)) + header[4:] + body
            start = time.perf_counter()
            sock.sendto(packet, (address, 0))
            while True:
                reply, _ = sock.recvfrom(2048)
                ihl = (reply[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", reply, ihl)
                if kind == 0 and rid == ident and rseq == seq:
                    samples.append(time.perf_counter() - start)
                    break
    finally:
        sock.close()
    return samples


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


__all__ = ["EmulatedLink", "LinkEnds", "LinkUnavailable", "cleanup_stale", "describe_support", "kernel_has_netem",
           "link_unavailable_reason", "ping_rtt_s", "queue_bytes", "tbf_parameters", "TbfParameters"]
