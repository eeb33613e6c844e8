"""Deterministic kernels: the setting under which two runs of a model compare bit for bit.

PyTorch's fused attention kernels (flash, memory-efficient, cuDNN) are not run-to-run
deterministic for a one-token query, every HF decode step, on a GPU: on an H100 the
13B shape, fully resident, decodes different logits from one call to the next, and
`torch.use_deterministic_algorithms` alone does not flag or fix it (measured). The
math backend (GEMMs and a softmax) with cuBLAS's fixed workspace repeats bit for bit.
Bit-identity claims on a GPU are made under this setting. On a CPU, whose kernels
repeat anyway, attention also takes the math path (the switches are shared).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

_FUSED_ATTENTION = ("flash", "mem_efficient", "cudnn")  # torch.backends.cuda.{enable_,}<name>_sdp
# cuBLAS needs a fixed workspace per handle to reproduce its reductions (NVIDIA's
# documented value); read when a handle is first made, so set before CUDA work.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def use_deterministic_kernels() -> None:
    """Make every later kernel choice deterministic, process-wide."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    # warn_only: an op without a deterministic kernel warns rather than failing a request;
    # the bit-identity checks then show the difference.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every new tensor with NaN is for finding reads of uninitialised memory,
    # not for reproducibility, and would add a write of every allocation to each step.
    torch.utils.deterministic.fill_uninitialized_memory = False
    for backend in _FUSED_ATTENTION:
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)


def deterministic_kernels() -> bool:
    return torch.are_deterministic_algorithms_enabled()


@contextmanager
def deterministic_region() -> Iterator[None]:
    """Deterministic kernels inside the block, the previous settings after it."""
    enabled, warn_only = deterministic_kernels(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    attention = {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in _FUSED_ATTENTION}
    use_deterministic_kernels()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        for backend, on in attention.items():
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(on)


__all__ = ["CUBLAS_WORKSPACE_CONFIG", "deterministic_kernels", "deterministic_region", "use_deterministic_kernels"]
