"""GPU utilisation, memory and power over a measured region, sampled via NVML.

This module owns the GPU side of a benchmark's telemetry: ``NvmlSampler`` is a
context manager whose background thread reads NVML every ``interval_s`` and,
on exit, leaves an :class:`NvmlSummary` (means, maxima, energy, and the raw
samples for "memory over time" plots) in ``sampler.summary``.

What NVML's numbers are: ``nvmlDeviceGetUtilizationRates`` gives the percent
of time over the driver's last sample period (1/6 s to 1 s depending on the
GPU) in which a kernel ran (``gpu``, reported here as SM utilisation) or device
memory was read or written (``memory``, reported as memory-bandwidth
utilisation).  Neither is an occupancy or a fraction of peak bandwidth, and
sampling faster than the driver's period repeats values; the 20 ms default is
for memory and power, which the driver updates more often.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from djinn.errors import DjinnError

try:
    import pynvml  # nvidia-ml-py
except ImportError:  # the summary below names the missing package
    pynvml = None  # type: ignore[assignment]

__all__ = ["NvmlSample", "NvmlSampler", "NvmlSummary", "NvmlUnavailable", "nvml_available"]

MAX_INTERVAL_S = 0.05  # coarser sampling misses the short decode-step regions


class NvmlUnavailable(DjinnError):
    """NVML cannot be used here: no package, no driver, or no such GPU."""


@dataclass(frozen=True)
class NvmlSample:
    """One reading; ``t_s`` is seconds since the sampler started."""

    t_s: float
    sm_util_pct: float
    membw_util_pct: float
    mem_used_bytes: int
    power_w: float  # NaN where the board does not report power


@dataclass(frozen=True)
class NvmlSummary:
    device_index: int
    device_name: str
    n_samples: int
    duration_s: float
    sm_util_mean_pct: float
    sm_util_max_pct: float
    membw_util_mean_pct: float
    membw_util_max_pct: float
    mem_used_max_bytes: int
    mem_total_bytes: int  # NVML's total, what mem_used is out of (more than cudaMemGetInfo's total)
    power_mean_w: float
    energy_j: float
    energy_source: str  # "counter" (nvmlDeviceGetTotalEnergyConsumption) or "trapezoid"
    samples: tuple[NvmlSample, ...]


def _reason(exc: BaseException) -> str:
    if pynvml is not None and isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "libnvidia-ml.so.1 not found: no NVIDIA driver on this machine"
    if pynvml is not None and isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver installed but not loaded"
    return f"NVML error: {exc}"


def _init(device_index: int) -> Any:
    """nvmlInit and a handle for ``device_index``, or NvmlUnavailable with why."""
    if pynvml is None:
        raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(_reason(exc)) from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= device_index < count:
            raise NvmlUnavailable(f"GPU index {device_index} requested, NVML sees {count} GPU(s)")
        return pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except BaseException as exc:
        pynvml.nvmlShutdown()
        if isinstance(exc, pynvml.NVMLError):
            raise NvmlUnavailable(_reason(exc)) from exc
        raise


def nvml_available(device_index: int = 0) -> tuple[bool, str]:
    """Whether NVML can sample GPU ``device_index``, and why not if it cannot."""
    try:
        handle = _init(device_index)
    except NvmlUnavailable as exc:
        return False, str(exc)
    try:
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    return True, f"GPU {device_index} {_text(name)}, driver {_text(driver)}"


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


class NvmlSampler:
    """Sample GPU ``device_index`` every ``interval_s`` while the block runs.

    >>> with NvmlSampler() as gpu:
    ...     run_the_workload()
    >>> gpu.summary.energy_j
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.02) -> None:
        if not 0 < interval_s <= MAX_INTERVAL_S:
            raise ValueError(f"interval_s must be in (0, {MAX_INTERVAL_S}] s, got {interval_s}")
        self.device_index = device_index
        self.interval_s = interval_s
        self.summary: NvmlSummary | None = None
        self._samples: list[NvmlSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "NvmlSampler":
        self._handle = _init(self.device_index)
        try:
            self._name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self._energy_start_mj = self._energy_mj()
            self._t0 = time.perf_counter()
            self._samples.append(self._sample())
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self._thread = threading.Thread(target=self._loop, name=f"nvml-sampler:{self.device_index}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        try:
            # A closing sample, so the integral and duration cover the whole block.
            self._samples.append(self._sample())
            energy_end_mj = self._energy_mj() if self._energy_start_mj is not None else None
        finally:
            pynvml.nvmlShutdown()
        if self._error is not None:
            raise RuntimeError(f"NVML sampling of GPU {self.device_index} failed") from self._error
        self.summary = self._summarise(energy_end_mj)

    def _energy_mj(self) -> int | None:
        # The counter (Volta and newer) integrates at the driver's own rate,
        # which beats integrating our 20 ms samples; older boards lack it.
        try:
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except pynvml.NVMLError:
            return None

    def _sample(self) -> NvmlSample:
        util = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        self.mem_total_bytes = int(mem.total)
        try:
            power_w = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # mW
        except pynvml.NVMLError:
            power_w = math.nan
        return NvmlSample(
            t_s=time.perf_counter() - self._t0,
            sm_util_pct=float(util.gpu),
            membw_util_pct=float(util.memory),
            mem_used_bytes=int(mem.used),
            power_w=power_w,
        )

    def _loop(self) -> None:
        # Deadlines, not sleeps of interval_s, so NVML's own call time does not
        # stretch the period.
        next_t = time.perf_counter() + self.interval_s
        try:
            while not self._stop.wait(max(0.0, next_t - time.perf_counter())):
                self._samples.append(self._sample())
                next_t += self.interval_s
        except BaseException as exc:  # surfaced by __exit__
            self._error = exc

    def _summarise(self, energy_end_mj: int | None) -> NvmlSummary:
        samples = tuple(self._samples)
        duration = samples[-1].t_s - samples[0].t_s
        powers = [s.power_w for s in samples if not math.isnan(s.power_w)]
        if self._energy_start_mj is not None and energy_end_mj is not None:
            energy_j, source = (energy_end_mj - self._energy_start_mj) / 1000.0, "counter"
        else:
            timed = [s for s in samples if not math.isnan(s.power_w)]
            energy_j = sum((b.t_s - a.t_s) * (a.power_w + b.power_w) / 2 for a, b in zip(timed, timed[1:]))
            source = "trapezoid" if len(timed) > 1 else "none"
            if source == "none":
                energy_j = math.nan
        return NvmlSummary(
            device_index=self.device_index,
            device_name=self._name,
            n_samples=len(samples),
            duration_s=duration,
            sm_util_mean_pct=sum(s.sm_util_pct for s in samples) / len(samples),
            sm_util_max_pct=max(s.sm_util_pct for s in samples),
            membw_util_mean_pct=sum(s.membw_util_pct for s in samples) / len(samples),
            membw_util_max_pct=max(s.membw_util_pct for s in samples),
            mem_used_max_bytes=max(s.mem_used_bytes for s in samples),
            mem_total_bytes=self.mem_total_bytes,
            power_mean_w=sum(powers) / len(powers) if powers else math.nan,
            energy_j=energy_j,
            energy_source=source,
            samples=samples,
        )
