"""Decode steps of two full_djinn generations paired step by step, for a difference between the
two ways they reach the server (the link sweep: loopback against the emulated link)."""
from __future__ import annotations

import time

import torch

from djinn.client import RemoteSession, StepRecord
from djinn.transport import ByteCounters


def lockstep_steps(sessions: dict[str, RemoteSession], counters: dict[str, ByteCounters], prompt_ids: torch.Tensor,
                   tokens: int) -> dict[str, list[StepRecord]]:
    """One full_djinn generation per side, driven in lockstep: both prompts prefilled, then decode
    step i of one side right after step i of the other (which side goes first alternating step by
    step), each step one `decode` request and its reply. A pair is two requests a few ms apart, so
    the host's load, which drifts over seconds on a shared machine (a whole generation's
    difference from the next was -5 to +4 ms a step here), is the same for both of its steps.
    Both sides must decode on the same path (`DifferentDecodePaths` otherwise): the fast path has one
    slot per model and batch size, so two concurrent sessions of it are one fast and one HF eager."""
    for session in sessions.values():
        session.prefill(prompt_ids)
        session.generate(1)  # the prefill's own token: no request
    records: dict[str, list[StepRecord]] = {side: [] for side in sessions}
    order = list(sessions)
    for i in range(tokens - 1):
        for side in order if i % 2 == 0 else reversed(order):
            before = counters[side].snapshot()
            started = time.perf_counter()
            sessions[side].generate(1)  # one decode request
            wall_ms = (time.perf_counter() - started) * 1e3
            records[side].append(StepRecord.of(wall_ms, counters[side].since(before),
                                               sessions[side].last_reply.get("server", {})))
    paths = {side: session.stats()["decode_path"] for side, session in sessions.items()}
    if len(set(paths.values())) > 1:
        # Measured on the H200: the fast path's one bs-1 slot per model went to the first side, the
        # other decoded on HF eager, 30 ms a step slower: the pairs compared two kernels, not two ways in.
        raise DifferentDecodePaths(f"the paired sessions decoded on different paths ({paths}): each pair would "
                                   f"compare two forwards, not the two ways to the server")
    return records


class DifferentDecodePaths(RuntimeError):
    """The two sides of a lockstep generation did not decode through the same forward."""
