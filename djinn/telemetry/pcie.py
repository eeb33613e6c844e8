"""The host<->GPU copy bandwidth this machine actually reaches.

This module owns the PCIe peak probe: the ring-buffer experiment (seed 003)
reports weight-streaming throughput as a fraction of it, and the doctor
prints it.  Copies are timed with CUDA events on one stream, so the figure is
the DMA engine's, not Python's; each direction is the median of ``repeats``
copies after warm-up, in decimal GB/s (1e9 bytes per second, as PCIe is
specified).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from djinn.errors import DjinnError

__all__ = ["CudaUnavailable", "PcieBandwidth", "cuda_unavailable_reason", "measure_pcie_peak"]


class CudaUnavailable(DjinnError):
    """No usable CUDA device; the message says why."""


@dataclass(frozen=True)
class PcieBandwidth:
    device_name: str
    size_bytes: int
    repeats: int
    h2d_pinned_gbps: float  # host->device from page-locked memory: the DMA peak
    h2d_pageable_gbps: float  # host->device from ordinary memory, staged by the driver
    d2h_pinned_gbps: float  # device->host into page-locked memory
    h2d_pinned_samples_gbps: tuple[float, ...]
    h2d_pageable_samples_gbps: tuple[float, ...]
    d2h_pinned_samples_gbps: tuple[float, ...]


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


def measure_pcie_peak(size_mb: int = 1024, repeats: int = 10, device: str = "cuda", warmup: int = 2) -> PcieBandwidth:
    """Time ``size_mb`` MiB copies host->device (pinned, pageable) and device->host (pinned)."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CudaUnavailable(f"cannot measure PCIe bandwidth on {device!r}: {reason}")
    if size_mb <= 0 or repeats <= 0 or warmup < 0:
        raise ValueError(f"size_mb and repeats must be positive, warmup >= 0; got {size_mb}, {repeats}, {warmup}")
    import torch

    dev = torch.device(device)
    size = size_mb << 20
    # fill_ touches every page: first-touch faults would otherwise land in the
    # timed pageable copies.
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.empty(size, dtype=torch.uint8).fill_(1)
    on_device = torch.empty(size, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(device=dev)

    def timed(dst: torch.Tensor, src: torch.Tensor) -> tuple[float, ...]:
        rates = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            for i in range(warmup + repeats):
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                if i >= warmup:
                    rates.append(size / (start.elapsed_time(end) / 1e3) / 1e9)
        return tuple(rates)

    try:
        h2d_pinned = timed(on_device, pinned)
        h2d_pageable = timed(on_device, pageable)
        d2h_pinned = timed(pinned, on_device)
    finally:
        del pinned, pageable, on_device
        torch.cuda.empty_cache()
    return PcieBandwidth(
        device_name=torch.cuda.get_device_name(dev),
        size_bytes=size,
        repeats=repeats,
        h2d_pinned_gbps=statistics.median(h2d_pinned),
        h2d_pageable_gbps=statistics.median(h2d_pageable),
        d2h_pinned_gbps=statistics.median(d2h_pinned),
        h2d_pinned_samples_gbps=h2d_pinned,
        h2d_pageable_samples_gbps=h2d_pageable,
        d2h_pinned_samples_gbps=d2h_pinned,
    )
