"""Telemetry around a measured region: NVML samples and wire bytes, where available.

A benchmark wraps its measured rounds (warm-up excluded) in `Collectors.region()`;
each collector that cannot run here (no NVIDIA GPU, no CAP_NET_RAW) is left out
and its reason recorded, so CPU runs still produce every other number.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from djinn.telemetry.nvml import NvmlSampler, NvmlSummary, nvml_available
from djinn.telemetry.wire_capture import WireBytes, WireCapture, capture_available

NVML_INTERVAL_S = 0.02  # 20 ms: well under the 50 ms the plan asks for, cheap for the sampler thread


@dataclass
class RegionTelemetry:
    nvml: NvmlSummary | None = None
    wire: WireBytes | None = None
    nvml_reason: str | None = None
    wire_reason: str | None = None

    @property
    def sm_util_pct(self) -> float | None:
        return self.nvml.sm_util_mean_pct if self.nvml else None

    @property
    def membw_util_pct(self) -> float | None:
        return self.nvml.membw_util_mean_pct if self.nvml else None

    @property
    def energy_j(self) -> float | None:
        return self.nvml.energy_j if self.nvml else None

    def as_extra_info(self) -> dict:
        info = {"gpu_sm_util_pct": self.sm_util_pct, "gpu_membw_util_pct": self.membw_util_pct,
                "gpu_energy_j": self.energy_j, "gpu_mem_used_max_bytes": self.nvml.mem_used_max_bytes if self.nvml else None,
                "wire_payload_bytes": self.wire.payload_bytes if self.wire else None,
                "wire_bytes": self.wire.wire_bytes if self.wire else None,
                "wire_kernel_drops": self.wire.kernel_drops if self.wire else None}
        if self.nvml_reason:
            info["nvml_unavailable"] = self.nvml_reason
        if self.wire_reason:
            info["wire_capture_unavailable"] = self.wire_reason
        return info


class Collectors:
    def __init__(self, gpu_index: int | None, port: int | None, interface: str = "lo"):
        self.gpu_index = gpu_index
        self.port = port
        self.interface = interface
        ok, reason = nvml_available(gpu_index or 0) if gpu_index is not None else (False, "the run is on the CPU")
        self.nvml_reason = None if ok else reason
        ok, reason = capture_available(interface) if port is not None else (False, "no server port to watch")
        self.wire_reason = None if ok else reason

    @contextmanager
    def region(self, watch_wire: bool = True):
        telemetry = RegionTelemetry(nvml_reason=self.nvml_reason,
                                    wire_reason=self.wire_reason if watch_wire else "local baseline: no wire")
        with ExitStack() as stack:
            sampler = stack.enter_context(NvmlSampler(self.gpu_index, NVML_INTERVAL_S)) if not self.nvml_reason else None
            capture = (stack.enter_context(WireCapture(self.port, self.interface))
                       if watch_wire and not self.wire_reason else None)
            yield telemetry
        telemetry.nvml = sampler.summary if sampler else None
        telemetry.wire = capture.result if capture else None
