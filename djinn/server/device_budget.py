"""The device's memory, with one owner: what the server may use, who holds it, and what the device has.

Holders register what they keep on the device (the weight cache: resident models and
the rings of streamed ones; the session store: resident KV; the fast decode path: its
slots' static caches and RoPE tables). Everything that wants device memory asks `shortfall(nbytes)`: the bytes that
must be freed before `nbytes` more can be allocated.

Why not trust a nominal number: on an H200 a budget of total - 6 GiB admitted sessions
the device could not hold (33 of 100 sessions completed, 67 real `OutOfMemoryError`s;
issue 12, measured at ff8c37b): the caching allocator's slack and fragmentation,
another process's CUDA context, the activations of a 1.6k-token prefill. So:

- the default limit is what the device really has free when the server starts;
- a reserve stays free for a forward's transient memory, measured as each forward's
  peak above what it leaves allocated (the largest seen, never below a floor);
- when the accounted room is tight, the device is asked (`mem_get_info`, plus blocks
  the caching allocator holds but no tensor uses) and only what really fits is admitted.

What still slips through (an allocation failure inside a forward) is caught by the
session store's step, which rolls back, frees and retries (`SessionStore.step`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from djinn import host_memory
from djinn.units import GIB, gib

# A forward's transient memory that is never measured below this on a GPU: cuBLAS
# workspaces and the small allocations of a step (a 7B decode step's transient is ~50 MiB).
CUDA_RESERVE_FLOOR_BYTES = 256 << 20
# The device is asked about its real free memory only when the accounted room after an
# admission falls below this fraction of the limit (at least 1 GiB): the query costs a
# driver call and a walk of the allocator's stats, too much for every decode step of a
# server that is nowhere near full.
RECONCILE_FRACTION = 0.05
RECONCILE_MIN_BYTES = 1 << 30
# The default CPU "device" budget: half the host memory this process may use, the other
# half left for the host side (paged KV, receive buffers, the process itself).
CPU_DEFAULT_FRACTION = 0.5


@dataclass
class BudgetCounters:
    reconciles: int = 0  # times the device was asked what it really has free
    reconciled_shortfall_bytes: int = 0  # bytes the device lacked that the accounting did not know of
    ooms_recovered: int = 0  # allocation failures inside a step that a retry survived
    ooms_failed: int = 0  # ... that ended as an `OutOfMemory` reply
    cache_released_bytes: int = 0  # allocator blocks given back to the device under pressure


class DeviceBudget:
    def __init__(self, device: torch.device, limit_bytes: int | None = None,
                 reserve_floor_bytes: int | None = None):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.limit_bytes = self.default_limit(device) if limit_bytes is None else limit_bytes
        self.reserve_floor_bytes = (reserve_floor_bytes if reserve_floor_bytes is not None
                                    else CUDA_RESERVE_FLOOR_BYTES if self.on_cuda else 0)
        self.transient_peak_bytes = 0  # the largest forward transient measured so far
        self.peak_allocated_bytes = 0  # the allocator's peak over every measured forward
        self.reconcile_margin_bytes = max(RECONCILE_MIN_BYTES, int(RECONCILE_FRACTION * self.limit_bytes))
        self._holders: dict[str, Callable[[], int]] = {}
        self.counters = BudgetCounters()

    @staticmethod
    def default_limit(device: torch.device) -> int:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return free
        return int(CPU_DEFAULT_FRACTION * host_memory.available_bytes())

    # -- accounting ----------------------------------------------------------------
    def hold(self, name: str, bytes_held: Callable[[], int]) -> None:
        """Register a holder of device memory, asked for its bytes whenever the budget is checked."""
        self._holders[name] = bytes_held

    def held(self) -> dict[str, int]:
        return {name: held() for name, held in self._holders.items()}

    def in_use(self) -> int:
        return sum(held() for held in self._holders.values())

    @property
    def reserve_bytes(self) -> int:
        return max(self.reserve_floor_bytes, self.transient_peak_bytes)

    def room(self) -> int:
        """Bytes that may still be allocated, by the accounting alone."""
        return self.limit_bytes - self.in_use() - self.reserve_bytes

    def shortfall(self, nbytes: int) -> int:
        """Bytes to free before `nbytes` more fit, by the accounting and, when that is tight, the device."""
        room = self.room()
        over = nbytes - room
        if room - nbytes < self.reconcile_margin_bytes:
            self.counters.reconciles += 1
            real_over = nbytes + self.reserve_bytes - self.device_room(need=nbytes + self.reserve_bytes)
            if real_over > max(over, 0):
                self.counters.reconciled_shortfall_bytes += real_over - max(over, 0)
                over = real_over
        return max(0, over)

    def device_room(self, need: int = 0) -> int:
        """What the device can surely allocate now.

        Blocks the caching allocator holds but no tensor uses are not counted as room: KV
        tensors that grow a token per step leave holes just too small for their successors
        (on the H200, 2.1 GiB of such blocks beside 12 MiB free at a real OOM). When the
        driver's free memory alone is short of `need` and such blocks exist, they go back
        to the driver first (with expandable segments their free pages are unmapped)."""
        if not self.on_cuda:
            return host_memory.available_bytes()
        free, _total = torch.cuda.mem_get_info(self.device)
        if free < need and torch.cuda.memory_reserved(self.device) > torch.cuda.memory_allocated(self.device):
            self.release_cached()
            free, _total = torch.cuda.mem_get_info(self.device)
        return free

    def release_cached(self) -> int:
        """Give the allocator's unused cached blocks back to the device; the bytes released."""
        if not self.on_cuda:
            return 0
        # Whatever is queued on the device finishes first: blocks it still reads or writes
        # are freed to the allocator already, and must not go back to the driver under it.
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        torch.cuda.empty_cache()
        released = max(0, before - torch.cuda.memory_reserved(self.device))
        self.counters.cache_released_bytes += released
        return released

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Around a forward: its transient peak (above what it leaves allocated) raises the reserve."""
        if not self.on_cuda:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_stats_as_nested_dict(self.device)["allocated_bytes"]["all"]["current"]
        yield
        stats = torch.cuda.memory_stats_as_nested_dict(self.device)["allocated_bytes"]["all"]
        transient = stats["peak"] - max(before, stats["current"])
        self.transient_peak_bytes = max(self.transient_peak_bytes, transient)
        # `reset_peak_memory_stats` above restarts torch's own peak: this one spans the server's life.
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, stats["peak"])

    # -- reporting -----------------------------------------------------------------
    def describe(self) -> str:
        held = ", ".join(f"{name} {gib(n)}" for name, n in self.held().items())
        return (f"{gib(self.in_use())} in use of the {gib(self.limit_bytes)} budget ({held}), "
                f"{gib(self.reserve_bytes)} reserved for a forward's transient memory")

    def summary(self) -> dict:
        summary = {"budget_bytes": self.limit_bytes, "in_use_bytes": self.in_use(),
                   "reserve_bytes": self.reserve_bytes, "transient_peak_bytes": self.transient_peak_bytes,
                   **{f"{name}_bytes": n for name, n in self.held().items()}, **vars(self.counters)}
        if self.on_cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            summary.update({"device_total_bytes": total, "device_free_bytes": free,
                            "device_allocated_bytes": torch.cuda.memory_allocated(self.device),
                            "device_reserved_bytes": torch.cuda.memory_reserved(self.device),
                            "device_peak_allocated_bytes": max(self.peak_allocated_bytes,
                                                               torch.cuda.max_memory_allocated(self.device))})
        return summary


__all__ = ["BudgetCounters", "DeviceBudget", "GIB"]
