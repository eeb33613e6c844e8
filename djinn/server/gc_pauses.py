"""The server process's garbage-collection pauses: each one timed, and full ones kept short.

CPython's full (generation-2) collection walks every object the collector tracks and stops the
process while it does; the server's loop is one thread, so a pause stops every session's step,
and requests that arrive meanwhile wait in the socket, where their queue time does not see them.
A server that imported torch and transformers tracks ~340,000 objects before it serves anything:
a full collection of that heap took 330 ms on the 2-core CPU machine. Decoding makes few
collections (its objects die young: 2 young collections and no full one in a whole CPU
multitenant run); building a model makes many objects that live on, and building a gpt2 shape
right after the imports set off a full collection (314 ms here; with the heap frozen, none).

`freeze_startup_heap` moves what start-up made (imports, the preloaded models) into the
permanent generation, which collections skip (`gc.freeze`, as vLLM's `freeze_gc_heap` does once
its engine has started), so a full collection walks only what serving made. `GcPauses` times
every collection of the process (`gc.callbacks`) for `stats`, and for each step's reply the
pauses since the session's previous one: whether a slow step was a pause is then read, not guessed.
"""
from __future__ import annotations

import gc
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

GENERATIONS = 3
# Recent pauses kept for `paused_ms`: a step's window is a decode step or two, and even young
# collections (one per ~700 allocations) come far fewer than this many times in one.
RECENT_PAUSES = 4096


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is alive (the garbage first: a frozen object is never
    collected); the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class GenerationPauses:
    collections: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0


class GcPauses:
    """Every collection of this process while it is installed: per generation, and the recent ones
    by the time they ended. Collections are process-wide: two servers in one process (tests) each
    see both's."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.generations = [GenerationPauses() for _ in range(GENERATIONS)]
        self._recent: deque[tuple[float, float]] = deque(maxlen=RECENT_PAUSES)  # (ended, ms)
        self._started: float | None = None
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        now = self._clock()
        if phase == "start":
            self._started = now
            return
        if self._started is None:  # installed during a collection
            return
        ms = (now - self._started) * 1e3
        self._started = None
        held = self.generations[info["generation"]]
        held.collections += 1
        held.total_ms += ms
        held.max_ms = max(held.max_ms, ms)
        self._recent.append((now, ms))

    def paused_ms(self, since: float) -> float:
        """The pauses that ended after `since` (this clock), summed."""
        total = 0.0
        for ended, ms in reversed(self._recent):
            if ended <= since:
                break
            total += ms
        return total

    def summary(self) -> dict:
        return {"frozen_objects": gc.get_freeze_count(), "generations": [asdict(g) for g in self.generations]}

    def close(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
