"""Telemetry: the wire capture against live loopback TCP and scapy-built
frames, the NVML sampler's arithmetic against a fake NVML, and the GPU probes'
refusals on a machine without a GPU (their real runs are marked ``gpu``)."""

from __future__ import annotations

import math
import re
import socket
import threading
import types
from dataclasses import dataclass

import pytest

from djinn import doctor
from djinn.telemetry import (
    CaptureDropped,
    CudaUnavailable,
    NvmlSampler,
    NvmlUnavailable,
    WireCapture,
    capture_available,
    cuda_unavailable_reason,
    measure_pcie_peak,
    nvml,
    nvml_available,
    parse_frame,
)
from djinn.telemetry.pcie import CopyMethod, MethodResult, best, nominal_link_gbps, probe_methods
from djinn.telemetry.wire_capture import _SeqRanges

# ---------------------------------------------------------------- header parser


# Explicit MACs: a bare Ether() makes scapy resolve the destination, a
# one-second neighbour lookup per IPv6 packet.
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def _frame(pkt) -> bytes:
    return bytes(pkt)


@pytest.mark.parametrize("payload_len", [0, 1, 1400, 9000])
@pytest.mark.parametrize(
    "layers",
    ["ipv4", "ipv4_options", "ipv6", "ipv6_ext", "vlan_ipv4"],
)
def test_parse_frame_counts_scapy_packets_exactly(layers: str, payload_len: int) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.packet import Raw

    tcp = TCP(sport=40000, dport=5556, seq=123456, options=[("MSS", 1460), ("NOP", None), ("WScale", 7)])
    data = Raw(b"\xab" * payload_len)
    ip = {
        "ipv4": lambda: Ether(**MACS) / IP(src="10.0.0.1", dst="10.0.0.2"),
        "ipv4_options": lambda: Ether(**MACS) / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 8),
        "ipv6": lambda: Ether(**MACS) / IPv6(src="::1", dst="::2"),
        "ipv6_ext": lambda: Ether(**MACS) / IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(),
        "vlan_ipv4": lambda: Ether(**MACS) / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.0.0.2"),
    }[layers]()
    pkt = ip / tcp / data
    raw = _frame(pkt)
    built = Ether(raw)  # re-dissect to read the lengths scapy computed
    l3 = built.payload.payload if layers == "vlan_ipv4" else built.payload
    tcp_hdr = built[TCP].dataofs * 4
    l3_hdr = len(l3) - len(l3[TCP])

    # The capture copies only the first 160 bytes; the rest must come from frame_len.
    got = parse_frame(raw[:160], len(raw))
    assert got is not None
    _, src, dst, seq, header_bytes, payload_bytes = got
    assert (src, dst, seq) == (40000, 5556, 123456)
    assert header_bytes == l3_hdr + tcp_hdr
    assert payload_bytes == payload_len
    assert len(raw) == (18 if layers == "vlan_ipv4" else 14) + header_bytes + payload_bytes


def test_parse_frame_ignores_ethernet_padding_and_reads_headerless_frames() -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    # A bare ACK is 54 bytes; NICs pad it to the 60-byte Ethernet minimum.
    raw = _frame(Ether(**MACS) / IP() / TCP(sport=1, dport=2)).ljust(60, b"\0")
    assert parse_frame(raw, len(raw))[4:] == (40, 0)
    ip_only = _frame(IP() / TCP(sport=1, dport=2) / (b"x" * 10))
    assert parse_frame(ip_only, len(ip_only), l2_len=0)[1:3] == (1, 2)
    assert parse_frame(ip_only, len(ip_only), l2_len=0)[5] == 10


def test_parse_frame_rejects_what_is_not_a_tcp_segment() -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether

    assert parse_frame(_frame(Ether(**MACS) / ARP()), 42) is None
    assert parse_frame(_frame(Ether(**MACS) / IP() / UDP(sport=5556, dport=5556)), 42) is None
    later_fragment = _frame(Ether(**MACS) / IP(frag=100) / TCP())
    assert parse_frame(later_fragment, len(later_fragment)) is None
    assert parse_frame(b"\0" * 20, 1500) is None  # truncated below the IP header


def test_seq_ranges_tell_retransmissions_from_reordering() -> None:
    r = _SeqRanges(1000, 100)  # [1000, 1100)
    assert r.add(1200, 100) == 0  # jumps ahead: hole [1100, 1200)
    assert r.add(1100, 100) == 0  # the late segment fills the hole: not a resend
    assert r.add(1100, 100) == 100  # now it is
    assert r.add(1250, 100) == 50  # half old, half new
    assert r.add(900, 150) == 50  # before the first segment seen: 900..1000 new
    wrap = _SeqRanges(2**32 - 50, 100)  # sequence numbers wrap at 4 GiB
    assert wrap.add(50, 10) == 0
    assert wrap.add(2**32 - 10, 20) == 20


# ------------------------------------------------------------------ live capture

CAPTURE_OK, CAPTURE_REASON = capture_available()
needs_capture = pytest.mark.skipif(not CAPTURE_OK, reason=CAPTURE_REASON)


@dataclass(frozen=True)
class Sent:
    up: int  # client -> server port
    down: int  # server port -> client


def _recv_exactly(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    while n:
        got = sock.recv_into(view[: min(n, len(buf))])
        if not got:
            raise ConnectionError(f"peer closed with {n} bytes outstanding")
        n -= got


def _bulk(client: socket.socket, peer: socket.socket) -> Sent:
    """256 MiB up in 1 MiB sends, then 32 MiB down."""
    up, down, chunk = 256 << 20, 32 << 20, memoryview(bytes(1 << 20))
    buf = bytearray(1 << 20)

    def serve() -> None:
        _recv_exactly(peer, up, buf)
        for _ in range(down // len(chunk)):
            peer.sendall(chunk)

    t = threading.Thread(target=serve)
    t.start()
    for _ in range(up // len(chunk)):
        client.sendall(chunk)
    _recv_exactly(client, down, bytearray(1 << 20))
    t.join()
    return Sent(up, down)


def _small_messages(client: socket.socket, peer: socket.socket) -> Sent:
    """2000 request/reply round trips of 37/301 bytes, then 20000 one-way 64 B sends."""
    for s in (client, peer):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rounds, req, rep, burst, msg = 2000, 37, 301, 20000, 64
    buf = bytearray(4096)

    def serve() -> None:
        for _ in range(rounds):
            _recv_exactly(peer, req, buf)
            peer.sendall(b"r" * rep)
        _recv_exactly(peer, burst * msg, buf)

    t = threading.Thread(target=serve)
    t.start()
    for _ in range(rounds):
        client.sendall(b"q" * req)
        _recv_exactly(client, rep, buf)
    for _ in range(burst):
        client.sendall(b"m" * msg)
    t.join()
    return Sent(rounds * req + burst * msg, rounds * rep)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield srv
    srv.close()


@pytest.mark.transport
@needs_capture
@pytest.mark.parametrize("workload", [_bulk, _small_messages], ids=["bulk_256MiB", "small_messages"])
def test_capture_counts_exactly_the_application_bytes(listener, workload) -> None:
    port = listener.getsockname()[1]
    with WireCapture(port) as cap:
        client = socket.create_connection(("127.0.0.1", port))
        peer, _ = listener.accept()
        with client, peer:
            sent = workload(client, peer)
    wire = cap.result
    assert wire.kernel_drops == 0
    assert wire.to_port.unique_payload_bytes == sent.up
    assert wire.from_port.unique_payload_bytes == sent.down
    for side in (wire.to_port, wire.from_port):
        # Loopback frames are a 14-byte Ethernet header + IP datagram, no padding.
        assert side.wire_bytes == 14 * side.packets + side.header_bytes + side.payload_bytes
        # IPv4 + TCP with timestamps is 52 bytes; options never exceed 120.
        assert 40 * side.packets <= side.header_bytes <= 120 * side.packets
    if workload is _bulk:
        # 64 KiB loopback segments: headers are a rounding error of the payload.
        assert wire.to_port.overhead_bytes < 0.005 * sent.up
    assert wire.other_packets == 0


def _one_way(host: str, port: int, listener: socket.socket, n: int) -> None:
    client = socket.create_connection((host, port))
    peer, _ = listener.accept()
    with client, peer:
        t = threading.Thread(target=_recv_exactly, args=(peer, n, bytearray(1 << 20)))
        t.start()
        client.sendall(bytes(n))
        t.join()


@pytest.mark.transport
@needs_capture
def test_capture_counts_ipv6() -> None:
    try:
        srv = socket.socket(socket.AF_INET6)
        srv.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with srv:
        srv.listen(1)
        port = srv.getsockname()[1]
        with WireCapture(port) as cap:
            _one_way("::1", port, srv, 8 << 20)
    assert cap.result.to_port.unique_payload_bytes == 8 << 20
    assert cap.result.kernel_drops == 0


@needs_capture
def test_capture_skips_loopback_outgoing_copies_without_kernel_help(listener, monkeypatch) -> None:
    # Kernels before 4.20 lack PACKET_IGNORE_OUTGOING; an unknown option name
    # makes this one refuse it too, so the reader's own filtering runs.
    from djinn.telemetry import wire_capture

    monkeypatch.setattr(wire_capture, "PACKET_IGNORE_OUTGOING", 0x7FFF)
    port = listener.getsockname()[1]
    with WireCapture(port) as cap:
        _one_way("127.0.0.1", port, listener, 8 << 20)
    assert cap._skip_outgoing_in_reader
    assert cap.result.to_port.unique_payload_bytes == 8 << 20
    # Counting the outgoing copies too would make every byte look resent (100%). Loopback TCP itself
    # resends a little on a loaded host: 130,966 B (1.6%) in a CI run on the 2-core machine.
    assert cap.result.to_port.retransmitted_bytes < (8 << 20) // 10


@needs_capture
def test_one_capture_measures_successive_regions(listener) -> None:
    port = listener.getsockname()[1]
    cap = WireCapture(port)
    for n in (1 << 20, 3 << 20):
        with cap:
            _one_way("127.0.0.1", port, listener, n)
        assert cap.result.to_port.unique_payload_bytes == n


@pytest.mark.transport
@needs_capture
def test_capture_of_a_quiet_port_is_zero_despite_traffic_elsewhere(listener) -> None:
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))  # reserved, never used
    with quiet, WireCapture(quiet.getsockname()[1]) as cap:
        _one_way("127.0.0.1", listener.getsockname()[1], listener, 1 << 20)
    assert cap.result.packets == 0
    assert cap.result.payload_bytes == 0
    assert cap.result.kernel_packets == 0  # the BPF filter kept the other port out
    assert cap.result.kernel_drops == 0


@needs_capture
def test_drops_raise_unless_allowed(listener, monkeypatch) -> None:
    port = listener.getsockname()[1]
    monkeypatch.setattr(WireCapture, "_read_kernel_stats", staticmethod(lambda sock: (10, 3)))
    with pytest.raises(CaptureDropped, match="dropped 3 of 10 packets"):
        with WireCapture(port):
            pass
    with WireCapture(port, allow_drops=True) as cap:
        pass
    assert (cap.result.kernel_packets, cap.result.kernel_drops) == (10, 3)


@needs_capture
def test_real_kernel_drops_are_detected(listener) -> None:
    # A receive buffer smaller than one 64 KiB loopback segment forces drops.
    port = listener.getsockname()[1]
    with pytest.raises(CaptureDropped):
        with WireCapture(port, rcvbuf_bytes=1):
            _one_way("127.0.0.1", port, listener, 64 << 20)


def test_capture_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError):
        WireCapture(0)


# ------------------------------------------------------------------------- NVML


def test_nvml_sampler_rejects_coarse_intervals() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        NvmlSampler(interval_s=0.1)


def test_nvml_unavailable_says_why() -> None:
    ok, reason = nvml_available()
    if ok:
        pytest.skip(f"NVML works here ({reason}); the refusal path is not reachable")
    assert reason
    with pytest.raises(NvmlUnavailable, match=re.escape(reason)):
        with NvmlSampler():
            pass


class _FakeNvml(types.SimpleNamespace):
    """Just enough of pynvml: a GPU at 50% SM, 200 W, 1 GiB growing by 1 MiB a read."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    def __init__(self, energy_counter: bool) -> None:
        super().__init__(reads=0, inits=0, energy_counter=energy_counter)

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.inits -= 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h"

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlSystemGetDriverVersion(self):
        return "0.0"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50, memory=25)

    def nvmlDeviceGetMemoryInfo(self, h):
        self.reads += 1
        return types.SimpleNamespace(used=(1 << 30) + self.reads * (1 << 20), total=80 << 30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 200_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_counter:
            raise self.NVMLError("Not Supported")
        return 1_000_000 + 7_000 * self.reads  # mJ


@pytest.mark.parametrize("energy_counter", [True, False], ids=["counter", "trapezoid"])
def test_nvml_sampler_summary_against_a_fake_gpu(monkeypatch, energy_counter: bool) -> None:
    fake = _FakeNvml(energy_counter)
    monkeypatch.setattr(nvml, "pynvml", fake)
    import time

    with NvmlSampler(interval_s=0.01) as gpu:
        time.sleep(0.2)
    s = gpu.summary
    assert fake.inits == 0  # every nvmlInit matched by a shutdown
    assert s.device_name == "Fake GPU"
    assert s.n_samples == len(s.samples) >= 10
    assert s.sm_util_mean_pct == s.sm_util_max_pct == 50
    assert s.membw_util_mean_pct == 25
    assert s.power_mean_w == 200
    assert s.mem_used_max_bytes == s.samples[-1].mem_used_bytes > s.samples[0].mem_used_bytes
    assert s.mem_total_bytes == 80 << 30
    assert all(a.t_s < b.t_s for a, b in zip(s.samples, s.samples[1:]))
    assert 0.2 <= s.duration_s < 1.0
    if energy_counter:
        assert s.energy_source == "counter"
        assert s.energy_j == pytest.approx(7.0 * fake.reads)  # one read per sample between the two counter reads
    else:
        assert s.energy_source == "trapezoid"
        assert s.energy_j == pytest.approx(200 * s.duration_s)


@pytest.mark.gpu
def test_nvml_sampler_sees_a_real_gpu_work() -> None:
    ok, reason = nvml_available()
    if not ok or cuda_unavailable_reason():
        pytest.skip(reason if not ok else cuda_unavailable_reason())
    import torch

    a = torch.randn(8192, 8192, device="cuda")
    with NvmlSampler(interval_s=0.02) as gpu:
        for _ in range(100):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    s = gpu.summary
    assert s.n_samples >= 3
    assert s.sm_util_max_pct > 0
    assert s.mem_used_max_bytes >= a.numel() * 4
    assert s.energy_j > 0 and not math.isnan(s.power_mean_w)


# ------------------------------------------------------------------------- PCIe


def test_pcie_probe_without_cuda_says_why() -> None:
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA works here; the refusal path is not reachable")
    with pytest.raises(CudaUnavailable, match="cannot measure PCIe bandwidth"):
        measure_pcie_peak(size_mb=1, repeats=1)


@pytest.mark.gpu
def test_pcie_probe_takes_the_best_method_in_both_directions() -> None:
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    bw = measure_pcie_peak(size_mb=256, repeats=3)
    assert bw.h2d_pinned_gbps == max(r.gbps for r in bw.methods if r.method.direction == "h2d")
    assert {r.method.streams for r in bw.methods} == {1, 2} and all(len(r.samples_gbps) == 3 for r in bw.methods)
    # Even PCIe 3.0 x16 moves >10 GB/s pinned; below 1 GB/s something is broken.
    assert bw.h2d_pinned_gbps > 1 and bw.d2h_pinned_gbps > 1 and bw.h2d_pageable_gbps > 0.1
    assert bw.hbm_copy_gbps > bw.h2d_pinned_gbps
    if bw.nominal_after_encoding_gbps is not None:
        assert bw.h2d_pinned_gbps <= bw.nominal_after_encoding_gbps * 1.01, "a copy cannot beat the link"


def test_nominal_pcie_rates_follow_the_spec() -> None:
    assert nominal_link_gbps(5, 16) == pytest.approx((64.0, 63.015), rel=1e-4)  # the H100/H200 link
    assert nominal_link_gbps(4, 16) == pytest.approx((32.0, 31.508), rel=1e-4)
    assert nominal_link_gbps(2, 8)[1] == pytest.approx(4.0)  # 8b/10b
    with pytest.raises(ValueError):
        nominal_link_gbps(9, 16)


def test_probe_methods_cover_streamer_chunks_both_streams_and_directions() -> None:
    methods = probe_methods(256 << 20)
    assert {m.direction for m in methods} == {"h2d", "d2h"}
    assert CopyMethod("h2d", 64 << 20, 2) in methods, "the streamer's chunk with two copies in flight"
    assert all(m.chunk_bytes * m.streams <= 256 << 20 for m in methods)


def test_best_picks_the_highest_median_of_a_direction() -> None:
    results = [MethodResult(CopyMethod("h2d", 1 << 30, 1), (50.1, 50.6, 50.4)),
               MethodResult(CopyMethod("h2d", 64 << 20, 2), (55.0, 55.4, 12.0)),
               MethodResult(CopyMethod("d2h", 64 << 20, 2), (60.0, 60.0, 60.0))]
    assert best(results, "h2d").method == CopyMethod("h2d", 64 << 20, 2)
    with pytest.raises(ValueError):
        best(results[:1], "d2h")


# ----------------------------------------------------------------------- doctor


def test_doctor_reports_every_item_and_its_exit_code(capsys) -> None:
    checks = doctor.run_checks(require_gpu=False, measure_pcie=False)
    names = [c.name for c in checks]
    assert names == ["cuda", "gpu", "pinned_memory", "host_memory", "nvml", "wire_capture", "network_link"]
    for c in checks:
        assert c.detail
        assert str(c).startswith(("PASS ", "FAIL ", "SKIP "))
    # Without --require-gpu a missing GPU is a SKIP, not a failure.
    code = doctor.main(["--no-pcie"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert code == (0 if all(c.ok for c in checks if c.required) else 1)


def test_doctor_requires_the_gpu_when_asked() -> None:
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA works here")
    checks = doctor.run_checks(require_gpu=True, measure_pcie=False)
    failed = [c for c in checks if not c.ok and c.required]
    assert failed[0].name == "cuda"
    assert failed[0].detail == cuda_unavailable_reason()
    assert doctor.main(["--require-gpu", "--no-pcie"]) == 1
