"""The GPU's memory bandwidth: a measured device-to-device copy peak and the datasheet's figure.

Decoding at batch 1 reads every weight once per token, so its speed is bounded by HBM
bandwidth; exp2.1 reports each baseline's bytes read per step over its step time as a
fraction of both. A copy reads and writes each byte once, so it moves twice its size; the
figure is the best of `repeats` after warm-up, timed with CUDA events, in decimal GB/s.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
# Peak memory bandwidth by device name, GB/s, from NVIDIA's datasheets: H200 (HBM3e) 4.8 TB/s,
# H100 SXM (HBM3) 3.35 TB/s. Matched on torch.cuda.get_device_name; the H100 PCIe (2.0 TB/s)
# is named "NVIDIA H100 PCIe", the SXM part "NVIDIA H100 80GB HBM3".
SPEC_GBPS = (("H200", 4800.0), ("H100 80GB HBM3", 3350.0), ("H100 SXM", 3350.0))


@dataclass(frozen=True)
class HbmBandwidth:
    device_name: str
    copy_gbps: float  # bytes read + written per second by the best device-to-device copy
    spec_gbps: float | None  # the datasheet's peak; None for a device not in SPEC_GBPS
    size_bytes: int
    repeats: int


def spec_gbps(device_name: str) -> float | None:
    return next((gbps for name, gbps in SPEC_GBPS if name in device_name), None)


def copy_gbps(src, dst, repeats: int, warmup: int = 1) -> float:
    """Best GB/s (read + write) of copying `src` into `dst`, two device tensors of one size."""
    import torch
    best = 0.0
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i >= warmup:
            best = max(best, 2 * src.nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def measure_hbm(device: str = "cuda", size_mb: int = 1024, repeats: int = 5) -> HbmBandwidth:
    import torch
    dev = torch.device(device)
    src = torch.ones(size_mb * MIB, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    try:
        gbps = copy_gbps(src, dst, repeats)
    finally:
        del src, dst
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev)
    return HbmBandwidth(name, gbps, spec_gbps(name), size_mb * MIB, repeats)


def bytes_read_per_step(weight_bytes: int, kv_bytes_per_token: int, kv_tokens_read: float, batch: int) -> float:
    """What one decode step reads from device memory: every weight once, and the keys and values
    of `kv_tokens_read` positions per sequence (a static cache's whole length, or the tokens so far)."""
    return weight_bytes + kv_bytes_per_token * kv_tokens_read * batch
