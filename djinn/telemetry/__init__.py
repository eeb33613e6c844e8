"""Measurements taken beside the runtime, never by it: GPU utilisation and
energy (NVML), bytes on the wire of a TCP port (packet capture), and the
host<->GPU copy peak (CUDA events).  Benchmarks decide what to time; these
report what the hardware and the kernel saw meanwhile."""

from djinn.telemetry.nvml import NvmlSample, NvmlSampler, NvmlSummary, NvmlUnavailable, nvml_available
from djinn.telemetry.pcie import CudaUnavailable, PcieBandwidth, cuda_unavailable_reason, measure_pcie_peak
from djinn.telemetry.wire_capture import (
    CaptureDropped,
    CaptureUnavailable,
    DirectionBytes,
    WireBytes,
    WireCapture,
    capture_available,
    parse_frame,
)

__all__ = [
    "CaptureDropped",
    "CaptureUnavailable",
    "CudaUnavailable",
    "DirectionBytes",
    "NvmlSample",
    "NvmlSampler",
    "NvmlSummary",
    "NvmlUnavailable",
    "PcieBandwidth",
    "WireBytes",
    "WireCapture",
    "capture_available",
    "cuda_unavailable_reason",
    "measure_pcie_peak",
    "nvml_available",
    "parse_frame",
]
