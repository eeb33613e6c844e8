"""The host<->GPU copy bandwidth this machine actually reaches: a true peak, and the link's nominal rate.

This module owns the PCIe peak probe: the ring-buffer experiment (seed 003) and the KV
page-in report their throughput as a fraction of it, and the doctor prints it. A peak
used as a denominator must bound what the runtime reaches: one 1 GiB copy on one stream
measured 50.6 GB/s on an H200 while the streamer, with 64 MiB chunks on two streams,
reached 55.2 GB/s (a "fraction of peak" of 1.09). So the probe times several methods
(chunk sizes the streamer uses, one and two streams, pinned buffers allocated once and
reused) in both directions and takes the best; a fraction above 1.0 can then only be an
error. Beside it: the link's nominal rate (NVML's generation and width), and the HBM
device-to-device copy peak for figures that use one. Copies are timed with CUDA events,
so the figures are the DMA engines', in decimal GB/s (1e9 bytes per second, as PCIe is
specified); each method is the median of ``repeats`` after warm-up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from djinn.errors import DjinnError
from djinn.telemetry.hbm import copy_gbps as hbm_copy_gbps

__all__ = ["CopyMethod", "CudaUnavailable", "MethodResult", "PcieBandwidth", "best", "cuda_unavailable_reason",
           "measure_pcie_peak", "nominal_link_gbps", "probe_methods"]

MIB = 1 << 20
# The streamer's copy chunk (djinn.server.streamer's default) and the chunk sweep's sizes,
# up to one large copy: the sizes the runtime's copies come in.
CHUNK_SIZES = (16 * MIB, 64 * MIB, 128 * MIB, 512 * MIB, 1024 * MIB)
STREAMS = (1, 2)  # the streamer keeps two copies in flight (prefetch depth 2)
# PCIe signalling per lane (GT/s) and line encoding by generation (PCI-SIG base specs):
# 8b/10b up to Gen2, 128b/130b for Gen3-5, Gen6's FLIT mode counted at 242/256.
PCIE_GENERATIONS = {1: (2.5, 8 / 10), 2: (5.0, 8 / 10), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130),
                    5: (32.0, 128 / 130), 6: (64.0, 242 / 256)}


class CudaUnavailable(DjinnError):
    """No usable CUDA device; the message says why."""


@dataclass(frozen=True)
class CopyMethod:
    direction: str  # h2d | d2h
    chunk_bytes: int
    streams: int

    def __str__(self) -> str:
        return f"{self.direction} {self.chunk_bytes // MIB} MiB chunks x {self.streams} stream(s)"


@dataclass(frozen=True)
class MethodResult:
    method: CopyMethod
    samples_gbps: tuple[float, ...]

    @property
    def gbps(self) -> float:
        return statistics.median(self.samples_gbps)


@dataclass(frozen=True)
class PcieBandwidth:
    device_name: str
    size_bytes: int  # bytes moved per timed sample of each method
    repeats: int
    h2d_pinned_gbps: float  # host->device from page-locked memory: the best method's median
    d2h_pinned_gbps: float  # device->host into page-locked memory: the best method's median
    h2d_pageable_gbps: float  # host->device from ordinary memory, one copy, staged by the driver
    best_h2d: str
    best_d2h: str
    methods: tuple[MethodResult, ...]
    link_generation: int | None  # NVML's current link; None where it cannot tell
    link_width: int | None
    nominal_gbps: float | None  # signalling rate per direction (Gen5 x16: 64 GB/s)
    nominal_after_encoding_gbps: float | None  # less the line encoding (Gen5 x16: 63.0 GB/s)
    hbm_copy_gbps: float | None  # device-to-device copy, bytes read + written per second


def nominal_link_gbps(generation: int, width: int) -> tuple[float, float]:
    """(signalling, after line encoding) GB/s per direction of a PCIe link."""
    if generation not in PCIE_GENERATIONS or width <= 0:
        raise ValueError(f"unknown PCIe link: Gen{generation} x{width}")
    rate, encoding = PCIE_GENERATIONS[generation]
    raw = rate * width / 8
    return raw, raw * encoding


def probe_methods(total_bytes: int, chunk_sizes: Sequence[int] = CHUNK_SIZES,
                  streams: Sequence[int] = STREAMS) -> list[CopyMethod]:
    """Every direction x chunk size x stream count whose chunks fit `total_bytes` once per stream."""
    return [CopyMethod(d, c, s) for d in ("h2d", "d2h") for c in chunk_sizes for s in streams
            if c * s <= total_bytes]


def best(results: Iterable[MethodResult], direction: str) -> MethodResult:
    """The method of `direction` with the highest median: the peak a measurement can be held to."""
    candidates = [r for r in results if r.method.direction == direction]
    if not candidates:
        raise ValueError(f"no {direction} method was measured")
    return max(candidates, key=lambda r: r.gbps)


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot use CUDA here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        # is_available() swallows the driver's error; device_count() is 0 both
        # for "no driver" and "CUDA_VISIBLE_DEVICES hides every GPU".
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: no driver or no visible device"
    return None


def _link(device_index: int) -> tuple[int | None, int | None]:
    """NVML's current PCIe generation and width; (None, None) where NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            return (int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                    int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, a device NVML does not list: the nominal rate is left out
        return None, None


def measure_pcie_peak(size_mb: int = 1024, repeats: int = 5, device: str = "cuda", warmup: int = 1) -> PcieBandwidth:
    """Time every `probe_methods` method moving ``size_mb`` MiB per sample, both directions; the best."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CudaUnavailable(f"cannot measure PCIe bandwidth on {device!r}: {reason}")
    if size_mb <= 0 or repeats <= 0 or warmup < 0:
        raise ValueError(f"size_mb and repeats must be positive, warmup >= 0; got {size_mb}, {repeats}, {warmup}")
    import torch

    dev = torch.device(device)
    size = size_mb * MIB
    # Allocated once and reused by every method, as the streamer's pinned layers and ring are;
    # fill_ touches every page so no first-touch fault lands in a timed copy.
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
    on_device = torch.empty(size, dtype=torch.uint8, device=dev)
    streams = [torch.cuda.Stream(device=dev) for _ in range(max(STREAMS))]

    def timed(copies: list[tuple[torch.Tensor, torch.Tensor]], n_streams: int) -> float:
        """GB/s of `copies` issued round-robin on `n_streams` streams, from the first start to the last end."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        current = torch.cuda.current_stream(dev)
        start.record(current)
        for s in streams[:n_streams]:
            s.wait_stream(current)
        for i, (dst, src) in enumerate(copies):
            with torch.cuda.stream(streams[i % n_streams]):
                dst.copy_(src, non_blocking=True)
        for s in streams[:n_streams]:
            current.wait_stream(s)
        end.record(current)
        end.synchronize()
        return sum(d.numel() for d, _ in copies) / (start.elapsed_time(end) / 1e3) / 1e9

    def run(method: CopyMethod) -> MethodResult:
        offsets = range(0, size - method.chunk_bytes + 1, method.chunk_bytes)
        host = [pinned[o:o + method.chunk_bytes] for o in offsets]
        gpu = [on_device[o:o + method.chunk_bytes] for o in offsets]
        copies = list(zip(gpu, host)) if method.direction == "h2d" else list(zip(host, gpu))
        samples = [timed(copies, method.streams) for _ in range(warmup + repeats)][warmup:]
        return MethodResult(method, tuple(samples))

    try:
        results = tuple(run(m) for m in probe_methods(size))
        pageable = torch.empty(size, dtype=torch.uint8).fill_(1)
        h2d_pageable = statistics.median(timed([(on_device, pageable)], 1) for _ in range(warmup + repeats))
        del pageable
        other = torch.empty(size, dtype=torch.uint8, device=dev)
        hbm = hbm_copy_gbps(on_device, other, repeats, warmup)
        del other
    finally:
        del pinned, on_device
        torch.cuda.empty_cache()
    generation, width = _link(dev.index or 0)
    nominal = nominal_link_gbps(generation, width) if generation in PCIE_GENERATIONS and width else (None, None)
    h2d, d2h = best(results, "h2d"), best(results, "d2h")
    return PcieBandwidth(
        device_name=torch.cuda.get_device_name(dev), size_bytes=size, repeats=repeats,
        h2d_pinned_gbps=h2d.gbps, d2h_pinned_gbps=d2h.gbps, h2d_pageable_gbps=h2d_pageable,
        best_h2d=str(h2d.method), best_d2h=str(d2h.method), methods=results,
        link_generation=generation, link_width=width, nominal_gbps=nominal[0],
        nominal_after_encoding_gbps=nominal[1], hbm_copy_gbps=hbm)
