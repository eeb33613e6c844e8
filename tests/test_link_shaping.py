"""How a link is shaped: tbf's rate, bucket and queue for a spec, and what the capture makes of
shaped frames (super-frames counted as their segments, messages timed as bursts).

The parameters are checked as numbers here and, where a link can be built (root), as the kernel
holds them; timing goals are the link sweep's (benchmarks/test_link_sweep.py), never these tests'.
"""
from __future__ import annotations

import socket

import pytest

from djinn.link import parse_link_spec
from djinn.link.delay_line import SNDBUF_BYTES
from djinn.link.emulated import (BUCKET_FRAMES, GSO_FRAME_BYTES, KERNEL_HZ, TCP_WINDOW_BYTES, EmulatedLink,
                                 link_unavailable_reason, tbf_parameters)
from djinn.telemetry.wire_capture import Burst, WireCapture, capture_available, segmented_length

from tcp_sink import byte_sink

UNAVAILABLE = link_unavailable_reason()
live = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"emulated link: {UNAVAILABLE}")
# psched's time unit (/proc/net/psched: 64 ns per tick on every kernel since 2.6.24): tbf's
# bucket travels as the time the rate takes to send it.
PSCHED_TICK_NS = 64


@pytest.mark.parametrize("text", ["1gbit,rtt=1ms", "25gbit,rtt=50us", "100mbit,rtt=5ms", "1gbit,rtt=1ms,gso=off"])
def test_the_bucket_covers_a_timer_tick_and_two_of_the_largest_frames(text):
    spec = parse_link_spec(text)
    tbf = tbf_parameters(spec)
    assert tbf.rate_bps == spec.rate_bps
    assert tbf.burst_bytes >= spec.rate_bytes_per_s / KERNEL_HZ  # tc-tbf(8): burst >= rate/HZ
    frame = GSO_FRAME_BYTES if spec.gso else spec.mtu + 14
    assert tbf.burst_bytes >= BUCKET_FRAMES * frame


@pytest.mark.parametrize("text", ["1gbit,rtt=1ms", "1gbit,rtt=5ms", "25gbit,rtt=5ms"])
def test_the_queue_holds_the_bandwidth_delay_product_and_a_tcp_window(text):
    spec = parse_link_spec(text)
    tbf = tbf_parameters(spec)
    assert tbf.limit_bytes >= spec.bdp_bytes + TCP_WINDOW_BYTES
    # The delay line's frames wait in that queue behind it: its send buffer must hold all of them.
    assert SNDBUF_BYTES > tbf.limit_bytes


def test_a_super_frame_counts_as_its_segments_headers():
    # A 64 KiB TSO frame over a 1500-byte MTU: IPv4 + TCP with timestamps is 52 bytes, 1448 of payload each.
    payload, header = 65160, 52
    frame = 14 + header + payload
    assert segmented_length(frame, header, payload, 1500) == payload + 45 * (14 + header)
    assert segmented_length(1514, header, 1448, 1500) == 1514  # already one segment
    assert segmented_length(66, header, 0, 1500) == 66  # a bare ACK
    assert segmented_length(frame, header, payload, 65536) == frame  # loopback: no segmentation


def test_a_bursts_rate_leaves_out_the_frame_that_opened_it():
    burst = Burst(first_ns=0, last_ns=8_000_000, frames=101, wire_bytes=1_001_000, first_frame_bytes=1000)
    assert burst.duration_s == pytest.approx(8e-3)
    assert burst.rate_bps == pytest.approx(1e9)
    assert Burst(5, 5, 1, 1000, 1000).rate_bps is None


def test_a_capture_refuses_a_non_positive_burst_gap():
    with pytest.raises(ValueError, match="burst_gap_s"):
        WireCapture(5556, burst_gap_s=0)


@live
def test_the_kernel_holds_the_links_tbf_parameters():
    from pyroute2 import NetNS

    spec = parse_link_spec("1gbit,rtt=1ms")
    expected = tbf_parameters(spec)
    with EmulatedLink(spec) as link:
        namespace = link.ends.wire_netns or link.server_netns
        with NetNS(namespace) as ns:
            held = [q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS") for q in ns.get_qdiscs()
                    if q.get_attr("TCA_KIND") == "tbf"]
    assert held, f"no tbf qdisc in {namespace}"
    for parms in held:
        assert parms["rate"] == expected.rate_bps // 8
        assert parms["limit"] == expected.limit_bytes
        bucket = parms["buffer"] * PSCHED_TICK_NS * 1e-9 * expected.rate_bps / 8
        assert bucket == pytest.approx(expected.burst_bytes, rel=1e-3)


@live
def test_a_message_is_one_burst_at_the_far_end_no_faster_than_the_rate():
    ok, reason = capture_available()
    if not ok:
        pytest.skip(f"wire capture: {reason}")
    spec = parse_link_spec("200mbit,rtt=1ms")
    size = 4 << 20
    with EmulatedLink(spec) as link:
        thread, received = byte_sink(link, 7010)
        ends = link.ends
        with socket.create_connection((link.server_address, 7010), timeout=30) as sender, \
                WireCapture(7010, ends.server_interface, netns=ends.server_netns, burst_gap_s=0.02) as far:
            sender.sendall(bytes(size))
            sender.shutdown(socket.SHUT_WR)
            thread.join(60)
    assert received == [size]
    arrived = far.result.to_port
    assert arrived.unique_payload_bytes == size
    assert arrived.segmented_wire_bytes > arrived.wire_bytes  # super-frames, counted as their segments
    (burst,) = arrived.bursts
    # tbf lets at most its bucket through faster than the rate.
    assert burst.duration_s >= (burst.wire_bytes - tbf_parameters(spec).burst_bytes) * 8 / spec.rate_bps
