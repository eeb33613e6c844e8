"""Where a session's steps spent their time on the server: queued behind other work, or computing.

Under continuous batching a step waits in the scheduler's queue for the next batch (and
for other clients' uploads and prefill chunks between batches), then computes as part of
that batch: the two are what a tenant needs to tell a busy server from a slow one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StepLatency:
    steps: int = 0  # prefill and decode requests answered (a chunked prefill counts once)
    batched_steps: int = 0  # of those, decodes that ran in a batch of several sessions
    queue_ms: float = 0.0  # from the loop's reading the request until its (first) forward began, summed
    compute_ms: float = 0.0  # its forwards' time, summed (a batch's whole forward for each of its sessions)
    last_queue_ms: float = 0.0
    last_compute_ms: float = 0.0
    last_batch: int = 0  # sessions in the forward of its last step
    answered_at: float | None = None  # when its last step's reply was sent (time.perf_counter)

    def record(self, queue_ms: float, compute_ms: float, batch: int, answered_at: float) -> None:
        self.steps += 1
        self.batched_steps += batch > 1
        self.queue_ms += queue_ms
        self.compute_ms += compute_ms
        self.last_queue_ms, self.last_compute_ms, self.last_batch = queue_ms, compute_ms, batch
        self.answered_at = answered_at

    def as_dict(self) -> dict:
        """Its figures; not `answered_at`, a time on the server's clock."""
        return {k: v for k, v in asdict(self).items() if k != "answered_at"}
