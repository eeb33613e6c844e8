"""Allocator settings for a process that receives large messages.

libzmq receives every large frame into a freshly malloc'd buffer, and on a VM each
4 KB page of it first costs a page fault: fresh 256 MB buffers fill at ~1.6 GB/s,
reused ones at ~13 GB/s (measured on the 2-core dev VM). glibc's tunables fix both:
`hugetlb=1` backs large allocations with transparent huge pages (512x fewer faults),
and raised mmap/trim thresholds keep freed buffers in the heap for the next message.
The cost: freed memory is not returned to the OS (a server's RSS stays at its peak).
Tunables are read at process start, so a process adopts them by re-executing itself.
"""
from __future__ import annotations

from typing import Mapping

TUNABLES_ENV = "GLIBC_TUNABLES"
RECEIVE_TUNABLES = ("glibc.malloc.hugetlb=1", f"glibc.malloc.mmap_threshold={1 << 30}",
                    f"glibc.malloc.trim_threshold={1 << 40}")


def is_tuned(env: Mapping[str, str]) -> bool:
    present = set(env.get(TUNABLES_ENV, "").split(":"))
    return all(t in present for t in RECEIVE_TUNABLES)


def tuned_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the receive tunables added to whatever GLIBC_TUNABLES it already has."""
    existing = [t for t in env.get(TUNABLES_ENV, "").split(":") if t]
    names = {t.split("=", 1)[0] for t in RECEIVE_TUNABLES}
    kept = [t for t in existing if t.split("=", 1)[0] not in names]
    return {**env, TUNABLES_ENV: ":".join([*kept, *RECEIVE_TUNABLES])}
