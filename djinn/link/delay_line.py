"""The user-space delay element of an emulated link, for kernels without netem.

The 2-core CI machine's kernel has tbf but neither netem nor fq, so nothing in its qdisc layer can
hold a packet for a time. This program sits in the link's middle namespace between two veth ends
and passes every Ethernet frame from one to the other (and back) `delay` after the kernel received
it: a bridge with a constant one-way delay per direction. The rate stays in the kernel (tbf on the
end hosts' egress); this only delays.

    python djinn/link/delay_line.py NETNS IF_A IF_B DELAY_NS

(run by its path: `-m` would import the djinn package, torch with it, ~1-25 s on a busy host,
where this needs only the standard library and pyroute2).

It prints `delay line ready` once both packet sockets are bound, and exits on SIGTERM (or when its
parent dies) with one line of counts on stderr.

Why deadlines come from the kernel's receive timestamps (SO_TIMESTAMPNS): a frame's delay then
starts when it reached the wire's end, not when this process woke up, so a late wake-up on a busy
host is absorbed into the delay instead of added to it (as long as it is shorter than the delay).
Why it wakes before a deadline and spins to it: a wake-up lands late, and the frame with it, on
every frame; a frame of small-message traffic then leaves within microseconds of its deadline,
measured: a 1 ms RTT link's request/reply grew 1.22 ms over loopback without the spin. How early
is measured, not fixed (`next_early_ns`): the largest recent lateness of its own wake-ups, plus a
guard. On the 2-core VM a wake-up after a long sleep is late by more the longer the vCPU slept
(idle, a 2.5 ms wait's frames reached the far end 80 µs late with a fixed 50 µs), and under load
a fixed 250 µs spin took so much of a core from the end hosts that round trips grew.
Why one thread and select(): select's timeout has microsecond resolution (epoll's has
milliseconds), and both directions' queues are drained in arrival order by one loop, without a
lock. Timer slack is set to 1 ns so a sleep ends at its deadline rather than up to 50 µs after.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # frames this process sends are not read back (Linux >= 4.20)
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: struct timespec in the control message
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
PACKET_VNET_HDR = 15  # each frame read and written with its virtio_net_hdr
VNET_HDR_BYTES = 10
PR_SET_TIMERSLACK = 29
PR_SET_PDEATHSIG = 1
RCVBUF_BYTES = 64 << 20  # a burst of the link's queue while this process is descheduled
# What this process's frames may hold in the tbf queue behind it (more than the link's queue
# bytes, djinn.link.emulated.queue_bytes): past it, a send would fail and the frame be lost.
SNDBUF_BYTES = 128 << 20
MAX_FRAME = VNET_HDR_BYTES + 65535 + 18  # the header, veth's largest MTU, Ethernet and one VLAN tag
_TIMESPEC = struct.Struct("ll")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
READY_LINE = "delay line ready"
# The wire never waits for a CPU; this process stands in for it, so it runs real-time (FIFO,
# the lowest priority: above every ordinary task, below the kernel's own): on the 2-core machine
# shared with the server, the client and their spinning OpenMP threads, an ordinary process woke
# up to several ms late, and each step crosses it twice. It sleeps in select() between frames, and
# the kernel's RT throttling leaves other tasks 5% of a core should it ever spin.
RT_PRIORITY = 1
NICENESS = -10  # where real-time is not permitted: at least ahead of ordinary tasks


def _open(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    # A frame the local TCP stack sent over veth has its checksum left to "the hardware"
    # (CHECKSUM_PARTIAL): read plainly it carries no valid checksum and the far end drops it.
    # The virtio_net_hdr says so (NEEDS_CSUM, where the checksum goes), and writing it back with
    # the frame hands the far end the same promise, so the frame passes as it would a cable.
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF_BYTES)
    sock.bind((interface, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def _libc_prctl(option: int, value: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


# How early a wait ends before its deadline: at least MIN_EARLY_NS (a punctual wake-up's own
# cost), at most MAX_EARLY_NS (a spin of real-time priority is a core taken from the end hosts);
# EARLY_GUARD_NS over the largest recent lateness; that maximum forgets 1/EARLY_DECAY of itself
# per wake-up, so one late wake-up (an interrupt, a preemption) costs spin for a few dozen frames.
MIN_EARLY_NS = 20_000
MAX_EARLY_NS = 400_000
EARLY_GUARD_NS = 10_000
EARLY_DECAY = 16


def next_early_ns(early_ns: int, late_ns: int) -> int:
    """How early the next wait ends, given that the last wake-up came `late_ns` after it was asked."""
    decayed = early_ns - early_ns // EARLY_DECAY
    return max(MIN_EARLY_NS, min(MAX_EARLY_NS, max(decayed, late_ns + EARLY_GUARD_NS)))


class DelayLine:
    """Frames read on one socket leave on the other `delay_ns` after the kernel received them."""

    def __init__(self, a: socket.socket, b: socket.socket, delay_ns: int):
        self.delay_ns = delay_ns
        self.other = {a: b, b: a}
        self.queues: dict[socket.socket, deque] = {a: deque(), b: deque()}  # keyed by the socket frames leave on
        self.forwarded = 0
        self.dropped = 0  # frames the far end refused (its backlog full), as a real link drops them
        self.truncated = 0
        self.early_ns = MIN_EARLY_NS

    def _drain(self, sock: socket.socket) -> None:
        out = self.queues[self.other[sock]]
        delay = self.delay_ns
        while True:
            try:
                frame, ancillary, flags, _ = sock.recvmsg(MAX_FRAME, _CMSG_SPACE)
            except BlockingIOError:
                return
            if flags & socket.MSG_TRUNC:
                self.truncated += 1
                continue
            stamp = next((data for level, kind, data in ancillary
                          if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
            if stamp is None:
                received = time.time_ns()
            else:
                sec, nsec = _TIMESPEC.unpack_from(stamp)
                received = sec * 1_000_000_000 + nsec
            out.append((received + delay, frame))

    def _send_due(self, now: int) -> None:
        for sock, queue in self.queues.items():
            while queue and queue[0][0] <= now:
                try:
                    sock.send(queue.popleft()[1])
                    self.forwarded += 1
                except OSError:  # ENOBUFS / EAGAIN: the far end's backlog is full
                    self.dropped += 1

    def run(self, stop) -> None:
        sockets = list(self.other)
        while not stop():
            heads = [q[0][0] for q in self.queues.values() if q]
            if heads:
                due = min(heads)
                wake = due - self.early_ns
                timeout = max(0.0, (wake - time.time_ns()) / 1e9)
            else:
                due, timeout = None, 0.2
            readable, _, _ = select.select(sockets, [], [], timeout)
            for sock in readable:
                self._drain(sock)
            if due is not None and not readable:
                if timeout > 0:
                    self.early_ns = next_early_ns(self.early_ns, time.time_ns() - wake)
                while time.time_ns() < due:  # at most early_ns: the deadline, not a wake-up later
                    pass
            self._send_due(time.time_ns())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or not argv[3].isdigit():
        print("usage: python delay_line.py NETNS IF_A IF_B DELAY_NS", file=sys.stderr)
        return 2
    name, if_a, if_b, delay_ns = argv[0], argv[1], argv[2], int(argv[3])
    from pyroute2 import netns

    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _libc_prctl(PR_SET_TIMERSLACK, 1)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except OSError:
        try:
            os.nice(NICENESS)
        except OSError:
            pass  # not permitted: it still works, with later wake-ups
    netns.setns(name, flags=0)  # flags=0: never create a namespace that is not there
    line = DelayLine(_open(if_a), _open(if_b), delay_ns)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    print(READY_LINE, flush=True)
    try:
        line.run(lambda: bool(stopping))
    except InterruptedError:
        pass
    print(f"delay line {if_a}<->{if_b} {delay_ns} ns: forwarded {line.forwarded}, dropped {line.dropped}, "
          f"truncated {line.truncated}; waits end {line.early_ns} ns early", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
