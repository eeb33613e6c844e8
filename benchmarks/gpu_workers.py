"""The benchmark suite spread over a host's GPUs with pytest-xdist: worker gwN sees GPU N alone.

The controller checks that there is a GPU for every worker and hands the list to the workers
(`DJINN_XDIST_GPUS`, inherited when xdist starts them); each worker sets its own
`CUDA_VISIBLE_DEVICES` before anything touches CUDA, so its `cuda:0`, and every server it
starts (the launcher passes the environment on), is its GPU. Independent experiments then run
side by side, one per GPU: `pytest benchmarks -m "exp3 or ring_buffer" -n 4 --dist loadfile`.
pytest-benchmark turns its own timing off under xdist, so the figures that count are those the
experiments write themselves (their JSON under --djinn-results and their verdicts); on a CPU
host, where every experiment would share the same cores, `-n` stays refused.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

XDIST_GPUS_VARIABLE = "DJINN_XDIST_GPUS"
WORKER_VARIABLE = "PYTEST_XDIST_WORKER"  # xdist's name for each worker: gw0, gw1, ...


def gpu_ids(count: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ids of the first `count` GPUs this process may use (its CUDA_VISIBLE_DEVICES, else 0..count-1)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def xdist_refusal(workers: int, gpus: int) -> str | None:
    """Why `-n workers` cannot run the benchmarks on a host with `gpus` GPUs; None when it can."""
    if gpus == 0:
        return ("the benchmarks share one device and must run serially: drop -n for benchmarks/ (run the "
                "correctness tests in tests/ with -n auto instead; on a GPU host, -n up to the GPU count gives "
                "each worker a GPU of its own)")
    if workers > gpus:
        return f"-n {workers}: the benchmarks run one GPU per worker, and this host has {gpus}"
    return None


def worker_gpu(worker: str, gpus: str) -> str:
    """The GPU of xdist worker `worker` (gwN) out of the controller's comma list."""
    match = re.fullmatch(r"gw(\d+)", worker)
    ids = [g for g in gpus.split(",") if g]
    if match is None or int(match.group(1)) >= len(ids):
        raise RuntimeError(f"xdist worker {worker!r} has no GPU among {XDIST_GPUS_VARIABLE}={gpus!r}")
    return ids[int(match.group(1))]


def pin_worker(environ: dict = os.environ) -> str | None:
    """In an xdist worker started for GPUs, its CUDA_VISIBLE_DEVICES; the GPU, or None elsewhere."""
    worker, gpus = environ.get(WORKER_VARIABLE), environ.get(XDIST_GPUS_VARIABLE)
    if not worker or gpus is None:
        return None
    environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(worker, gpus)
    return environ["CUDA_VISIBLE_DEVICES"]
