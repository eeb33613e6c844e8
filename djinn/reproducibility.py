"""Deterministic kernels: the setting under which two runs of a model compare bit for bit.

PyTorch's fused attention kernels (flash, memory-efficient, cuDNN) are not run-to-run
deterministic for a one-token query, every HF decode step, on a GPU: on an H100 the
13B shape, fully resident, decodes different logits from one call to the next, and
`torch.use_deterministic_algorithms` alone does not flag or fix it (measured). The
math backend (GEMMs and a softmax) with cuBLAS's fixed workspace repeats bit for bit.
Bit-identity claims on a GPU are made under this setting. On a CPU, whose kernels
repeat anyway, attention also takes the math path (the switches are shared).

The setting changes speed too (the fixed workspace alone doubled an eager 7B decode step
on an H200: 23.2 -> 41.3 ms/token), so both sides of a timing comparison must run under
the same one: `KernelConfig` says which a process runs, and `child_environment` gives a
child process exactly the variables of the configuration it is started in, whatever this
process's environment holds.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping

import torch

_FUSED_ATTENTION = ("flash", "mem_efficient", "cudnn")  # torch.backends.cuda.{enable_,}<name>_sdp
CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"


@dataclass(frozen=True)
class DeterministicKernels:
    """What `--deterministic` (and `deterministic_region`) sets."""
    # cuBLAS needs a fixed workspace per handle to reproduce its reductions; read once, when a
    # process makes its first cuBLAS handle, so a region entered after the first GEMM on a GPU
    # does not change it (KernelConfig says so).
    cublas_workspace_config: str
    algorithms: bool  # torch.use_deterministic_algorithms (warn-only)
    fused_attention: tuple[str, ...]  # SDPA backends left enabled; () is the math path only


# What --deterministic means, chosen by benchmarks/probes/decode_determinism.py: the fastest
# configuration whose decode logits repeat bit for bit within and across processes on the GPU
# the suite measures on (results/determinism/, the probe's JSON; its `recommended.constant` is
# this line). Until an H200 measurement is committed it is the configuration the H100
# determinism check backed (results/ring_buffer/determinism_h100.jsonl): NVIDIA's documented
# workspace, deterministic algorithms, attention on the math path.
DETERMINISTIC = DeterministicKernels(cublas_workspace_config=":4096:8", algorithms=True, fused_attention=())
CUBLAS_WORKSPACE_CONFIG = DETERMINISTIC.cublas_workspace_config


@dataclass(frozen=True)
class KernelConfig:
    """The kernel configuration a process decodes under, as recorded beside its timings."""
    deterministic: bool
    cublas_workspace_config: str | None  # the variable as the process's cuBLAS would read it
    fused_attention: tuple[str, ...]  # fused SDPA backends enabled; () means the math path only
    cuda_initialized_before: bool | None = None  # a region entered after CUDA work: cuBLAS may keep its old workspace

    def as_dict(self) -> dict:
        return asdict(self)


def current_kernel_config() -> KernelConfig:
    return KernelConfig(
        deterministic=deterministic_kernels(),
        cublas_workspace_config=os.environ.get(CUBLAS_VARIABLE),
        fused_attention=tuple(b for b in _FUSED_ATTENTION if getattr(torch.backends.cuda, f"{b}_sdp_enabled")()))


def child_environment(base: Mapping[str, str], deterministic: bool) -> dict[str, str]:
    """`base` with the kernel variables of the configuration a child runs in: cuBLAS's fixed
    workspace when it is deterministic (a value the user set kept), none otherwise, so a
    setting made for one side of a comparison never reaches the other."""
    env = dict(base)
    if deterministic:
        env.setdefault(CUBLAS_VARIABLE, DETERMINISTIC.cublas_workspace_config)
    else:
        env.pop(CUBLAS_VARIABLE, None)
    return env


def use_deterministic_kernels(kernels: DeterministicKernels = DETERMINISTIC) -> None:
    """Make every later kernel choice deterministic, process-wide (a server's --deterministic)."""
    os.environ.setdefault(CUBLAS_VARIABLE, kernels.cublas_workspace_config)
    if kernels.algorithms:
        # warn_only: an op without a deterministic kernel warns rather than failing a request;
        # the bit-identity checks then show the difference.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN is for finding reads of uninitialised memory,
        # not for reproducibility, and would add a write of every allocation to each step.
        torch.utils.deterministic.fill_uninitialized_memory = False
    for backend in _FUSED_ATTENTION:
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend in kernels.fused_attention)


def deterministic_kernels() -> bool:
    """Whether this process decodes on `DETERMINISTIC`'s kernels: a fixed cuBLAS workspace, its
    algorithms flag if it sets one, and no fused attention backend beyond those it keeps."""
    fused = {b for b in _FUSED_ATTENTION if getattr(torch.backends.cuda, f"{b}_sdp_enabled")()}
    return (os.environ.get(CUBLAS_VARIABLE) is not None and fused <= set(DETERMINISTIC.fused_attention)
            and (torch.are_deterministic_algorithms_enabled() or not DETERMINISTIC.algorithms))


@contextmanager
def deterministic_region() -> Iterator[KernelConfig]:
    """Deterministic kernels inside the block, and every setting it changed (the cuBLAS
    variable included) as it was after it. Yields the configuration in force inside."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    attention = {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in _FUSED_ATTENTION}
    cublas = os.environ.get(CUBLAS_VARIABLE)
    cuda_initialized = torch.cuda.is_initialized()
    use_deterministic_kernels()
    try:
        yield KernelConfig(**{**current_kernel_config().as_dict(), "cuda_initialized_before": cuda_initialized})
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        for backend, on in attention.items():
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(on)
        if cublas is None:
            os.environ.pop(CUBLAS_VARIABLE, None)
        else:
            os.environ[CUBLAS_VARIABLE] = cublas


__all__ = ["CUBLAS_WORKSPACE_CONFIG", "DETERMINISTIC", "DeterministicKernels", "KernelConfig", "child_environment",
           "current_kernel_config", "deterministic_kernels", "deterministic_region", "use_deterministic_kernels"]
