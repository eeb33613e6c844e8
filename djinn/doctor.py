"""Is this machine ready to run Djinn's benchmarks, and if not, why not.

``python -m djinn.doctor [--require-gpu]`` prints one line per check,
``PASS|FAIL|SKIP name: detail``, and exits 0 when every required check
passed.  A check that is not required and does not pass prints SKIP with its
reason.  ``run_checks`` returns the same list, so a pytest fixture can skip a
GPU test with the reason of the check that failed rather than a bare "no GPU".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from djinn import host_memory
from djinn.telemetry import (
    CudaUnavailable,
    capture_available,
    cuda_unavailable_reason,
    measure_pcie_peak,
    nvml_available,
)

__all__ = ["Check", "main", "run_checks"]

GIB = 1 << 30
# Below this the loaders and the PCIe probe's 1 GiB buffers fail in ways that
# read like Djinn bugs.
MIN_HOST_AVAILABLE_BYTES = 2 * GIB


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    @property
    def status(self) -> str:
        return "PASS" if self.ok else "FAIL" if self.required else "SKIP"

    def __str__(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _guarded(name: str, required: bool, probe: Callable[[], tuple[bool, str]]) -> Check:
    # One broken probe must not hide the others' answers.
    try:
        ok, detail = probe()
    except Exception as exc:  # noqa: BLE001 - the reason is the point
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Check(name, ok, detail, required)


def run_checks(
    require_gpu: bool,
    *,
    require_capture: bool = False,
    require_link: bool = False,
    measure_pcie: bool = True,
    pcie_size_mb: int = 1024,
    pcie_repeats: int = 5,
    interface: str = "lo",
    device_index: int = 0,
) -> list[Check]:
    """Run every check; GPU checks are required only when ``require_gpu``."""
    checks: list[Check] = []
    no_cuda = cuda_unavailable_reason()
    checks.append(Check("cuda", no_cuda is None, no_cuda or _cuda_detail(), require_gpu))

    def needs_cuda(name: str, probe: Callable[[], tuple[bool, str]]) -> Check:
        if no_cuda is not None:
            return Check(name, False, f"needs CUDA: {no_cuda}", require_gpu)
        return _guarded(name, require_gpu, probe)

    checks.append(needs_cuda("gpu", lambda: _gpu(device_index)))
    checks.append(needs_cuda("pinned_memory", _pinned_1gib))
    if measure_pcie:
        checks.append(needs_cuda("pcie_bandwidth", lambda: _pcie(pcie_size_mb, pcie_repeats, device_index)))
    checks.append(_guarded("host_memory", True, _host_memory))
    checks.append(_guarded("nvml", require_gpu, lambda: nvml_available(device_index)))
    checks.append(_guarded("wire_capture", require_capture, lambda: capture_available(interface)))
    checks.append(_guarded("network_link", require_link, _network_link))
    return checks


def _network_link() -> tuple[bool, str]:
    """Whether an emulated link (djinn.link: --djinn-link, the link sweep) can be built here."""
    from djinn.link.emulated import describe_support, link_unavailable_reason

    reason = link_unavailable_reason()
    return (False, reason) if reason else (True, describe_support())


def _cuda_detail() -> str:
    import torch

    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"


def _gpu(device_index: int) -> tuple[bool, str]:
    import torch

    props = torch.cuda.get_device_properties(device_index)
    free, total = torch.cuda.mem_get_info(device_index)
    return True, (
        f"cuda:{device_index} {props.name}, sm_{props.major}{props.minor}, "
        f"{total / GIB:.1f} GiB total, {free / GIB:.1f} GiB free"
    )


def _pinned_1gib() -> tuple[bool, str]:
    import torch

    buf = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    ok = buf.is_pinned()
    del buf
    return ok, "1 GiB page-locked host buffer allocated" if ok else "allocated 1 GiB but it is not page-locked"


def _pcie(size_mb: int, repeats: int, device_index: int) -> tuple[bool, str]:
    try:
        bw = measure_pcie_peak(size_mb=size_mb, repeats=repeats, device=f"cuda:{device_index}")
    except CudaUnavailable as exc:
        return False, str(exc)
    link = (f"; link Gen{bw.link_generation} x{bw.link_width}, nominal {bw.nominal_gbps:.0f} GB/s"
            if bw.nominal_gbps else "")
    return True, (
        f"H2D pinned {bw.h2d_pinned_gbps:.1f} GB/s ({bw.best_h2d}), H2D pageable {bw.h2d_pageable_gbps:.1f} GB/s, "
        f"D2H pinned {bw.d2h_pinned_gbps:.1f} GB/s ({bw.best_d2h}), HBM copy {bw.hbm_copy_gbps:.0f} GB/s{link} "
        f"(best method's median of {bw.repeats} x {bw.size_bytes >> 20} MiB)"
    )


def _host_memory() -> tuple[bool, str]:
    memory = host_memory.read()  # its cgroup's limit included, as the server's own defaults read it
    ok = memory.available_bytes >= MIN_HOST_AVAILABLE_BYTES
    detail = memory.describe()
    if not ok:
        detail += f" (below {MIN_HOST_AVAILABLE_BYTES / GIB:.0f} GiB)"
    return ok, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m djinn.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--require-gpu", action="store_true", help="fail when CUDA, the GPU or NVML is unusable")
    parser.add_argument("--require-capture", action="store_true", help="fail when wire capture is not permitted")
    parser.add_argument("--require-link", action="store_true",
                        help="fail when an emulated network link (namespaces, veth, tc) cannot be built")
    parser.add_argument("--no-pcie", action="store_true", help="skip the PCIe bandwidth measurement")
    parser.add_argument("--pcie-size-mb", type=int, default=1024)
    parser.add_argument("--pcie-repeats", type=int, default=5)
    parser.add_argument("--interface", default="lo", help="interface the wire-capture check opens")
    parser.add_argument("--device", type=int, default=0, help="CUDA / NVML device index")
    args = parser.parse_args(argv)
    checks = run_checks(
        args.require_gpu,
        require_capture=args.require_capture,
        require_link=args.require_link,
        measure_pcie=not args.no_pcie,
        pcie_size_mb=args.pcie_size_mb,
        pcie_repeats=args.pcie_repeats,
        interface=args.interface,
        device_index=args.device,
    )
    for check in checks:
        print(check)
    return 0 if all(c.ok for c in checks if c.required) else 1


if __name__ == "__main__":
    sys.exit(main())
