"""Deterministic kernels: the setting under which two runs of a model compare bit for bit.

PyTorch's default attention kernel for a one-token query (every HF decode step) is not
run-to-run deterministic on a GPU: on an H100, greedy `generate` of the 13B shape, fully
resident, gives different second-step logits from one call to the next, while the same
calls with deterministic algorithms agree bit for bit (and a model streamed through the
ring buffer then equals the resident one). Bit-identity claims on a GPU are therefore
made under this setting; on a CPU it changes nothing we use.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

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


def deterministic_kernels() -> bool:
    return torch.are_deterministic_algorithms_enabled()


@contextmanager
def deterministic_region() -> Iterator[None]:
    """Deterministic kernels inside the block, the previous settings after it."""
    enabled, warn_only = deterministic_kernels(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    use_deterministic_kernels()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


__all__ = ["CUBLAS_WORKSPACE_CONFIG", "deterministic_kernels", "deterministic_region", "use_deterministic_kernels"]
