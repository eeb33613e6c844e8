"""The server's garbage-collection pauses (djinn.server.gc_pauses): timed per generation, charged to
the steps they delayed, and the start-up heap frozen out of full collections."""
from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import djinn
from djinn.server.gc_pauses import GcPauses, freeze_startup_heap
from djinn.server.server import Server, ServerConfig


@pytest.fixture
def only_explicit_collections():
    """No automatic collection during the test: each one it sees is one it made."""
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


@pytest.fixture
def pauses(only_explicit_collections):
    recorder = GcPauses()
    yield recorder
    recorder.close()


def test_a_full_collection_is_timed_in_its_generation(pauses):
    before = time.perf_counter()
    gc.collect(2)
    full = pauses.generations[2]
    assert full.collections == 1 and full.total_ms == full.max_ms > 0
    assert time.perf_counter() - before >= full.total_ms / 1e3
    gc.collect(0)
    assert pauses.generations[0].collections == 1 and pauses.generations[2].collections == 1


def _collect(pauses: GcPauses, generation: int) -> float:
    """One collection of `generation`; its pause as the recorder timed it."""
    before = sum(g.total_ms for g in pauses.generations)
    gc.collect(generation)
    return sum(g.total_ms for g in pauses.generations) - before


def test_the_pauses_after_a_time_are_those_that_ended_after_it(pauses):
    first = _collect(pauses, 2)
    between = time.perf_counter()
    second = _collect(pauses, 1) + _collect(pauses, 2)
    assert first > 0 and second > 0
    assert pauses.paused_ms(between) == pytest.approx(second)
    assert pauses.paused_ms(0.0) == pytest.approx(first + second)
    assert pauses.paused_ms(time.perf_counter()) == 0.0


def test_a_closed_recorder_sees_no_more_collections(only_explicit_collections):
    recorder = GcPauses()
    recorder.close()
    gc.collect()
    assert all(g.collections == 0 for g in recorder.generations)
    recorder.close()  # twice is harmless


def test_the_frozen_start_up_heap_is_left_out_of_collections(only_explicit_collections):
    made_at_start_up = [[] for _ in range(100)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > len(made_at_start_up)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in made_at_start_up)
        made_later = []
        assert id(made_later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()


def test_a_step_reply_carries_the_pauses_since_the_sessions_last_reply(tiny_model, only_explicit_collections):
    """In-process, so a collection this thread makes between two steps is one the server's recorder sees."""
    server = Server(ServerConfig(port=0))
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    try:
        with djinn.connect(server.address, timeout_s=60) as client:
            with client.load(tiny_model).session() as session:
                session.prefill(torch.tensor([[1, 2, 3]]))
                pause_ms = _collect(server.gc_pauses, 2)
                session.generate(2)  # the prefill's token, then one decode
                assert session.last_reply["server"]["gc_ms"] >= pause_ms > 0
                session.generate(1)  # nothing collected since the last reply
                assert session.last_reply["server"]["gc_ms"] == 0.0
            assert client.stats()["gc"]["generations"][2]["collections"] >= 1
    finally:
        server.stop()
        loop.join(timeout=30)


@pytest.mark.parametrize("flag, frozen", [((), True), (("--no-gc-freeze",), False)], ids=["default", "no-gc-freeze"])
def test_the_cli_server_freezes_its_start_up_heap_unless_told_not_to(start_server, flag, frozen):
    server = start_server(*flag)
    with djinn.connect(server.host_port) as client:
        assert (client.stats()["gc"]["frozen_objects"] > 0) is frozen
