"""CPU threads of the benchmark's processes: the client (pytest) and the servers it starts.

On a CPU the client and the server share the cores. Each would start one intra-op thread
per core, and OpenMP threads spin for a while after each parallel region, so a client
waiting on a reply still takes the cores its server computes on (the 2-core machine's
exp2.1 ratio moved between 0.76x and 1.97x from run to run). Pinned, the two together use
the machine's cores once: the client gets half, each server the same half. Only one side
computes at a time (native_pytorch in the client, every other mode in the server), and both
sides of a comparison run the same number of threads.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pytest
import torch

# Variables the OpenMP / MKL runtimes read at start: how a server child is pinned, as
# `torch.set_num_threads` cannot reach into another process.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # the CPUs this process may run on (its affinity mask, not the host's count)
    client_threads: int
    server_threads: int

    def server_environment(self) -> dict[str, str]:
        return {name: str(self.server_threads) for name in THREAD_VARIABLES}

    def as_dict(self) -> dict:
        return asdict(self)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_threads(cores: int) -> ThreadPlan:
    """Half the cores each, the same count on both sides: on a CPU a matmul's reduction order
    follows its thread count, so a client and a server pinned differently would not compare bit
    for bit (a streamed model's logits differed from HF's with 1 server thread against 2 here)."""
    threads = max(1, cores // 2)
    return ThreadPlan(cores, threads, threads)


def pin_client(plan: ThreadPlan) -> None:
    """This process's intra-op threads (torch reads the OpenMP variables only at start), and the
    count every child that inherits this environment starts with: a test that starts its server
    with `ServerProcess` directly must compare bit for bit too."""
    torch.set_num_threads(plan.client_threads)
    os.environ.update(plan.server_environment())


# Where pytest keeps the session's plan (conftest.py makes it at configure time).
THREADS = pytest.StashKey[ThreadPlan]()
