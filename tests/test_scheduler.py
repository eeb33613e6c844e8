"""The scheduler's policy (djinn.server.scheduler) against a scripted engine: what runs in each turn.

No model and no sockets: the engine records what the scheduler asked of it and a fake clock
stands for the time each piece of work takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from djinn.server.scheduler import (DECODING_WINDOW_S, MAX_MISSED_WAITS, STRAGGLER_WAIT_FRACTION, BatchPolicy,
                                    PrefillJob, Queued, Scheduler)

MODEL_A, MODEL_B = object(), object()


def request(peer: str, op: str, handle: str | None = None, tokens: int = 1) -> Queued:
    message = SimpleNamespace(op=op, args={}, tensors={})
    return Queued(None, SimpleNamespace(peer=peer.encode(), message=message), handle)


@dataclass
class ScriptedEngine:
    """Sessions are handles mapped to (model, rows); prefills to their prompt tokens."""
    sessions: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)
    whole: dict = field(default_factory=dict)  # prompts that may be batched: handle -> (model, rows, tokens)
    arrivals: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    now: float = 0.0
    batch_s: float = 0.010  # what a batched step takes on the fake clock
    other_s: float = 0.004  # what any other request takes

    def clock(self) -> float:
        return self.now

    def receive(self, timeout_ms, limit):
        taken, self.arrivals = self.arrivals[:limit], self.arrivals[limit:]
        if not taken:  # as a blocking read that nothing ended
            self.now += timeout_ms / 1e3
        return taken

    def batchable(self, queued):
        if queued.op != "decode" or queued.handle not in self.sessions:
            return None
        model, rows = self.sessions[queued.handle]
        return SimpleNamespace(model=model), rows

    def prefill_tokens(self, queued):
        return self.prompts.get(queued.handle) if queued.op == "prefill" else None

    def batchable_prefill(self, queued):
        if queued.op != "prefill" or queued.handle not in self.whole:
            return None
        model, rows, tokens = self.whole[queued.handle]
        return SimpleNamespace(model=model), rows, tokens

    def prefill_batch(self, batch):
        self.now += self.batch_s
        self.calls.append(("prefill_batch", [q.handle for q in batch]))

    def serve(self, queued):
        self.now += self.other_s
        self.calls.append(("serve", queued.op, queued.handle))

    def decode_batch(self, batch):
        self.now += self.batch_s
        self.calls.append(("batch", [q.handle for q in batch]))

    def begin_prefill(self, queued):
        return PrefillJob(queued, SimpleNamespace(batch=1), 1, self.prompts[queued.handle], None)

    def prefill_chunk(self, job, tokens):
        end = min(job.done_tokens + tokens, job.total_tokens)
        self.calls.append(("chunk", job.queued.handle, end - job.done_tokens))
        job.done_tokens = end
        return end == job.total_tokens


def scheduler(engine: ScriptedEngine, max_batch=8, budget=64, wait_ms=0.0) -> Scheduler:
    return Scheduler(BatchPolicy(max_batch, budget, wait_ms), engine, clock=engine.clock)


def test_waiting_decodes_of_distinct_sessions_run_as_one_batch():
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "abc"})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b"), request("p3", "decode", "c")]
    sched = scheduler(engine)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "b", "c"])]
    assert sched.counters.batches == 1 and sched.counters.largest_batch == 3 and not sched.queue


def test_one_step_per_session_per_turn_and_a_peers_order_is_kept():
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"})
    engine.arrivals = [request("p1", "decode", "a"), request("p1", "decode", "a"), request("p1", "session_stats", "a"),
                       request("p2", "decode", "b")]
    sched = scheduler(engine)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "b"])], "a's second decode and its stats wait for the next turn"
    sched.iterate(0)
    assert engine.calls[1:] == [("serve", "decode", "a")]
    sched.iterate(0)
    assert engine.calls[2:] == [("serve", "session_stats", "a")]


def test_the_batch_respects_max_batch_and_the_token_budget():
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1), "b": (MODEL_A, 1), "c": (MODEL_A, 1), "wide": (MODEL_A, 6)})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b"), request("p3", "decode", "c")]
    sched = scheduler(engine, max_batch=2)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "b"])] and sched.counters.deferred == 1
    sched.iterate(0)
    assert engine.calls[1:] == [("serve", "decode", "c")], "the deferred one runs next turn (alone: a batch of one)"
    engine.calls.clear()
    engine.arrivals = [request("p1", "decode", "a"), request("p4", "decode", "wide"), request("p2", "decode", "b")]
    sched = scheduler(engine, max_batch=8, budget=7)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "wide"])], "b's token would pass the budget of 7"


def test_a_batch_holds_one_model_and_the_other_models_decodes_come_next():
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1), "x": (MODEL_B, 1), "b": (MODEL_A, 1), "y": (MODEL_B, 1)})
    engine.arrivals = [request(p, "decode", h) for p, h in (("p1", "a"), ("p2", "x"), ("p3", "b"), ("p4", "y"))]
    sched = scheduler(engine)
    sched.iterate(0)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "b"]), ("batch", ["x", "y"])]


def test_other_requests_get_a_slice_as_long_as_the_step_and_the_rest_wait():
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"}, batch_s=0.010, other_s=0.004)
    uploads = [request("up", "upload_weights") for _ in range(6)]
    engine.arrivals = [request("p1", "decode", "a"), *uploads, request("p2", "decode", "b")]
    sched = scheduler(engine)
    sched.iterate(0)
    served = [c for c in engine.calls if c[0] == "serve"]
    assert engine.calls[0] == ("batch", ["a", "b"])
    assert len(served) == 3, "4 ms uploads after a 10 ms step: three start within the step's time"
    assert len(sched.queue) == 3 and sched.counters.deferred == 3
    sched.iterate(0)  # no decode waits: the rest of the uploads run
    assert not sched.queue


def test_a_long_prefill_runs_in_chunks_beside_the_decoding_sessions():
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"}, prompts={"long": 100, "short": 10})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b"), request("p3", "prefill", "long"),
                       request("p3", "decode", "long")]
    sched = scheduler(engine, budget=34)
    sched.iterate(0)
    assert engine.calls == [("batch", ["a", "b"]), ("chunk", "long", 32)], "the budget less the batch's 2 tokens"
    for _ in range(3):
        engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b")]
        sched.iterate(0)
    chunks = [c[2] for c in engine.calls if c[0] == "chunk"]
    assert chunks == [32, 32, 32, 4] and sum(chunks) == 100
    assert ("serve", "decode", "long") not in engine.calls, "its decode waited for the whole prefill"
    sched.iterate(0)
    assert engine.calls[-1] == ("serve", "decode", "long")


def test_a_prefill_with_nobody_decoding_runs_whole():
    engine = ScriptedEngine(prompts={"long": 100})
    engine.arrivals = [request("p3", "prefill", "long")]
    sched = scheduler(engine, budget=16)
    sched.iterate(0)
    assert engine.calls == [("serve", "prefill", "long")]


def test_a_decoder_between_steps_still_counts_as_decoding_until_the_window_passes():
    # A lone decoder's client round trip can outlast an idle poll: the long prefill that arrives
    # then is still chunked, so the decoder's next step does not wait behind it.
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1)}, prompts={"long": 100, "later": 100})
    engine.arrivals = [request("p1", "decode", "a")]
    sched = scheduler(engine, budget=16)
    sched.iterate(0)
    sched.iterate(0)  # an idle turn: nothing arrived
    engine.now += DECODING_WINDOW_S / 2
    engine.arrivals = [request("p2", "prefill", "long")]
    sched.iterate(0)
    assert engine.calls[-1] == ("chunk", "long", 16) and sched.counters.chunked_prefills == 1
    while sched.prefills:
        sched.iterate(0)
    engine.now += DECODING_WINDOW_S * 1.01
    engine.arrivals = [request("p3", "prefill", "later")]
    sched.iterate(0)
    assert engine.calls[-1] == ("serve", "prefill", "later"), "nobody decoded within the window: it runs whole"
    engine.arrivals = [request("p1", "decode", "a")]
    sched.iterate(0)
    engine.arrivals = [request("p1", "close_session", "a")]
    sched.iterate(0)
    engine.arrivals = [request("p4", "prefill", "long")]
    sched.iterate(0)
    assert engine.calls[-1] == ("serve", "prefill", "long"), "the decoder closed its session: it runs whole"


def test_prompts_that_arrive_together_run_as_one_forward_within_the_budget():
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1)},
                            whole={"p": (MODEL_A, 1, 20), "q": (MODEL_A, 1, 10), "r": (MODEL_A, 1, 30),
                                   "s": (MODEL_B, 1, 5)})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "prefill", "p"), request("p3", "prefill", "q"),
                       request("p4", "prefill", "r"), request("p5", "prefill", "s")]
    sched = scheduler(engine, budget=64)
    sched.iterate(0)
    # 1 decode token + 2 prompts padded to 20 = 41; the third would make 1 + 3 x 30 = 91; s is another model's
    assert engine.calls[:2] == [("serve", "decode", "a"), ("prefill_batch", ["p", "q"])]
    assert sched.counters.prefill_batches == 1 and sched.counters.batched_prefills == 2
    sched.iterate(0)
    sched.iterate(0)
    assert engine.calls[2:] == [("serve", "prefill", "r"), ("serve", "prefill", "s")], "one model per forward"


def test_a_chunk_gets_what_the_batch_and_the_batched_prompts_left_of_the_budget():
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1)}, prompts={"long": 100},
                            whole={"p": (MODEL_A, 1, 20), "q": (MODEL_A, 1, 10)})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "prefill", "long")]
    sched = scheduler(engine, budget=64)
    sched.iterate(0)
    assert engine.calls[-1] == ("chunk", "long", 63)
    engine.arrivals = [request("p1", "decode", "a"), request("p3", "prefill", "p"), request("p4", "prefill", "q")]
    sched.iterate(0)
    assert engine.calls[-2:] == [("prefill_batch", ["p", "q"]), ("chunk", "long", 64 - 1 - 2 * 20)]


def test_a_prompt_alone_runs_solo_and_one_over_the_budget_runs_whole_when_nobody_decodes():
    engine = ScriptedEngine(whole={"big": (MODEL_A, 1, 100), "small": (MODEL_A, 1, 8)})
    engine.arrivals = [request("p1", "prefill", "big"), request("p2", "prefill", "small")]
    sched = scheduler(engine, budget=64)
    sched.iterate(0)
    assert engine.calls[0] == ("serve", "prefill", "big"), "first and alone, over the budget: whole"
    sched.iterate(0)
    assert engine.calls[1:] == [("serve", "prefill", "small")] and sched.counters.prefill_batches == 0


def reads(engine: ScriptedEngine, *batches: list) -> None:
    """Each receive call returns the next of `batches` (then nothing), 1 ms later on the fake clock."""
    pending = list(batches)

    def receive(timeout_ms, limit):
        engine.now += 0.001
        return pending.pop(0) if pending else []
    engine.receive = receive


def test_the_turn_waits_for_the_recent_decoders_stragglers_only_up_to_batch_wait_ms():
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"})
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b")]
    sched = scheduler(engine, wait_ms=5.0)
    sched.iterate(0)
    reads(engine, [request("p1", "decode", "a")], [request("p2", "decode", "b")])  # p2 on the second read
    sched.iterate(0)
    assert engine.calls[-1] == ("batch", ["a", "b"]) and sched.counters.straggler_waits == 1
    reads(engine, [request("p1", "decode", "a")])  # p2 does not come back
    before = engine.now
    sched.iterate(0)
    assert 0.005 <= engine.now - before - engine.other_s <= 0.007, "the wait gives up after 5 ms"
    assert engine.calls[-1] == ("serve", "decode", "a")
    engine.now += DECODING_WINDOW_S
    reads(engine, [request("p1", "decode", "a")])
    before = engine.now
    sched.iterate(0)  # b has not decoded within the window: nobody is waited for
    assert engine.now - before - 0.001 == pytest.approx(engine.other_s) and engine.calls[-1] == ("serve", "decode", "a")


def test_after_a_long_forward_the_wait_for_stragglers_is_a_share_of_it():
    # A straggler that misses the batch waits its whole forward: past a forward of 100 ms the turn
    # waits up to STRAGGLER_WAIT_FRACTION of it (10 ms), not just batch_wait_ms (5).
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"}, batch_s=0.100)
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b")]
    sched = scheduler(engine, wait_ms=5.0)
    sched.iterate(0)
    reads(engine, [request("p1", "decode", "a")], *[[]] * 6, [request("p2", "decode", "b")])  # b 8 ms later
    sched.iterate(0)
    assert engine.calls[-1] == ("batch", ["a", "b"]) and sched.counters.straggler_misses == 0
    reads(engine, [request("p1", "decode", "a")])  # b does not come back
    before = engine.now
    sched.iterate(0)
    waited = engine.now - before - engine.other_s
    assert STRAGGLER_WAIT_FRACTION * engine.batch_s <= waited <= STRAGGLER_WAIT_FRACTION * engine.batch_s + 0.002
    assert engine.calls[-1] == ("serve", "decode", "a") and sched.counters.straggler_misses == 1
    assert sched.counters.straggler_waits == 2


def test_sessions_stepped_in_turn_by_one_client_stop_waiting_for_each_other():
    # The link sweep's lockstep: a's next step is sent only once b's is answered, and b's once a's is.
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"})
    sched = scheduler(engine, wait_ms=5.0)
    waits = []
    for step in range(8):
        engine.arrivals = [request("p1" if step % 2 == 0 else "p2", "decode", "ab"[step % 2])]
        before = engine.now
        sched.iterate(0)
        waits.append(round((engine.now - before - engine.other_s) * 1e3))
    assert waits == [0] + [5] * (2 * MAX_MISSED_WAITS) + [0] * (7 - 2 * MAX_MISSED_WAITS)
    assert sched.counters.straggler_misses == 2 * MAX_MISSED_WAITS
    # Once both decode in one batch again, each is waited for again.
    engine.arrivals = [request("p1", "decode", "a"), request("p2", "decode", "b")]
    sched.iterate(0)
    assert engine.calls[-1] == ("batch", ["a", "b"])
    engine.arrivals = [request("p1", "decode", "a")]
    before = engine.now
    sched.iterate(0)
    assert engine.now - before - engine.other_s >= 0.005


def test_two_decoders_that_fell_into_turns_meet_in_one_batch():
    # Each client sends its next step while the other's runs: without a wait they alternate solo
    # steps for ever (measured: 2 tenants on an H200, 378 steps, none batched).
    engine = ScriptedEngine(sessions={h: (MODEL_A, 1) for h in "ab"})
    sched = scheduler(engine, wait_ms=5.0)
    engine.arrivals = [request("p1", "decode", "a")]
    sched.iterate(0)
    engine.arrivals = [request("p2", "decode", "b")]
    sched.iterate(0)
    reads(engine, [request("p1", "decode", "a")], [request("p2", "decode", "b")])  # b's next is on its way
    sched.iterate(0)
    assert [c[0] for c in engine.calls] == ["serve", "serve", "batch"] and engine.calls[-1] == ("batch", ["a", "b"])


def test_a_lone_decoder_waits_for_nobody():
    engine = ScriptedEngine(sessions={"a": (MODEL_A, 1)})
    sched = scheduler(engine, wait_ms=5.0)
    for _ in range(3):
        engine.arrivals = [request("p1", "decode", "a")]
        before = engine.now
        sched.iterate(0)
        assert engine.now - before == engine.other_s
    assert sched.counters.straggler_waits == 0


def test_a_prompt_waits_for_the_prompts_of_the_clients_that_just_opened_sessions():
    # Tenants open their sessions together and send their prompts a reply apart: served alone, the
    # first prompt's session would decode its first step behind the others' prefill.
    engine = ScriptedEngine(whole={h: (MODEL_A, 1, 10) for h in "abc"})
    engine.arrivals = [request(p, "open_session") for p in ("p1", "p2", "p3")]
    sched = scheduler(engine, wait_ms=5.0)
    sched.iterate(0)
    reads(engine, [request("p1", "prefill", "a")], [request("p2", "prefill", "b")], [request("p3", "prefill", "c")])
    sched.iterate(0)
    assert engine.calls[-1] == ("prefill_batch", ["a", "b", "c"]) and sched.counters.prompt_waits == 1
    # A client that opened and went quiet is waited for up to batch_wait_ms, and only within the window.
    reads(engine, [request("p4", "open_session"), request("p5", "open_session")])
    sched.iterate(0)
    reads(engine, [request("p4", "prefill", "a")])
    before = engine.now
    sched.iterate(0)
    assert 0.005 <= engine.now - before - engine.other_s <= 0.007 and engine.calls[-1] == ("serve", "prefill", "a")
    engine.now += DECODING_WINDOW_S
    reads(engine, [request("p1", "prefill", "b")])
    before = engine.now
    sched.iterate(0)
    assert engine.now - before - 0.001 == pytest.approx(engine.other_s), "p5's open is older than the window"
    assert sched.counters.prompt_waits == 2


def test_a_lone_clients_prompt_waits_for_nobody():
    engine = ScriptedEngine(whole={"a": (MODEL_A, 1, 10)})
    sched = scheduler(engine, wait_ms=5.0)
    engine.arrivals = [request("p1", "open_session")]
    sched.iterate(0)
    engine.arrivals = [request("p1", "prefill", "a")]
    before = engine.now
    sched.iterate(0)
    assert engine.now - before == engine.other_s and sched.counters.straggler_waits == 0


@pytest.mark.parametrize("args", [(0, 64, 0.0), (4, 0, 0.0), (4, 64, -1.0)])
def test_bad_limits_are_refused(args):
    with pytest.raises(ValueError, match="batching needs"):
        BatchPolicy(*args)
