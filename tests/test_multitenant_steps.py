"""The multitenant experiment's per-step records (benchmarks.multitenant): which steps a round's
replies hold, and which of them make its tail."""
from __future__ import annotations

from benchmarks.multitenant import DecodeStep, decode_steps, tail_steps


def _reply(walls: list[float]) -> dict:
    return {"wall_ms": walls, "queue_ms": [w / 10 for w in walls], "compute_ms": [w / 2 for w in walls],
            "gc_ms": [w / 5 for w in walls]}


def test_decode_steps_leave_out_each_generations_prefill_and_keep_who_and_when():
    steps = decode_steps(3, [_reply([50.0, 10.0, 11.0]), _reply([60.0, 12.0, 90.0])])
    assert [(s.round, s.tenant, s.step, s.wall_ms) for s in steps] == \
        [(3, 0, 1, 10.0), (3, 0, 2, 11.0), (3, 1, 1, 12.0), (3, 1, 2, 90.0)]
    assert (steps[-1].queue_ms, steps[-1].compute_ms, steps[-1].gc_ms) == (9.0, 45.0, 18.0)


def test_the_tail_is_the_steps_at_or_over_the_percentile_slowest_first():
    walls = [10.0] * 97 + [30.0, 50.0, 40.0]
    steps = [DecodeStep(0, i % 4, i, w, 0.0, w, 0.0) for i, w in enumerate(walls)]
    tail = tail_steps(steps, 98)
    assert [s.wall_ms for s in tail] == [50.0, 40.0]
    assert [s.step for s in tail] == [98, 99]
    assert tail_steps([], 99) == []
