"""Iteration-level scheduling: which waiting requests the request loop serves in its next turn.

Orca's idea (OSDI '22) as vLLM's scheduler runs it: the unit of scheduling is one model
iteration, not one request. Each turn of the loop takes every request that has arrived,
then runs
  1. one batched decode step: the decodes waiting for distinct sessions of one model, at
     most `max_batch` sessions and `step_token_budget` tokens (`djinn.server.batching`);
     a session that must run alone (`batching.unbatched_reason`) is served as any other op;
  2. the prompts of new sessions of one model that arrived together, as one forward (padded
     to the longest, within what the batch left of `step_token_budget`; one alone runs solo);
  3. one chunk of a long prefill, in the tokens the batch left of the budget, while other
     sessions are decoding (a session decoded within DECODING_WINDOW_S; alone, a prefill runs
     whole, bit for bit what it was);
  4. other requests (uploads, registers, opens, solo steps, stats) in arrival order, for
     as long as the decode step took (at least one): an upload is interleaved with the
     steps, one chunk per turn, instead of holding every session until it is whole.
Sessions join a batch with their next decode and leave it by not sending one: there is no
membership to keep. Order is kept per client connection (a request waits while an earlier
one of its peer does) and per session (one step of a session per turn).

A batch of synchronous clients comes back staggered: each client reads its reply and sends
its next step. When a decode is waiting, the loop waits for the other sessions that decoded
within DECODING_WINDOW_S before it plans (up to `batch_wait_ms`, or STRAGGLER_WAIT_FRACTION of
the last turn's model time when that is longer), so that one straggler does not split the next
batch in two, and two clients that fell into turns (each sending while the other's step runs)
meet in one batch instead of alternating for ever. A straggler that misses the batch waits for
its whole forward, unseen by its queue time, in the socket. Likewise, when a
prompt is waiting, for the prompts of the clients that opened a session within the window and
have sent nothing since: tenants that open their sessions together send their prompts a reply
apart, and a prompt served alone before the others arrive would make its session's first
decode wait behind their prefill (on the 2-core CPU the first decodes of 3 of 4 tenants were
the p99, 91-109 ms of wall against 23-32 ms of compute and under 1 ms queued; in the next run,
with this wait, none of them was).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from djinn.server.session_store import Session
from djinn.transport import Incoming

# How many arrivals one turn reads from the sockets beyond its batch: bounds the memory a
# burst can hold in the queue (the rest waits in libzmq's buffers and the peers' HWM).
QUEUE_PER_BATCH_SLOT = 4

# A session whose last decode ran this recently still counts as decoding (until its client
# sends it anything but a decode, a close for one): between two steps the client reads the
# reply, samples and sends, and on a loaded host that round trip can outlast a turn or an
# idle poll (POLL_MS). A long prefill arriving meanwhile is chunked so the decoder's next step
# does not wait behind it; with no session decoding, a prefill runs whole.
DECODING_WINDOW_S = 1.0

# The step token budget when the server is not given one, by device type. A prefill runs as a
# forward of its own beside the decode batch, so a decoding session waits for up to one
# budget's worth of prompt tokens per turn; the prompts of tenants joining together are batched
# within it. On a CPU a chunk of 512 prompt tokens already costs a few decode steps of a small
# model. On a GPU 2048, vLLM's default max_num_batched_tokens for its API server on devices
# under 70 GiB (vllm/engine/arg_utils.py, EngineArgs.get_batch_defaults): 16 tenants' 72-token
# prompts then fit one forward, where 512 holds 7 of them. Measured on the H200 (llama-2-7b,
# results/multitenant/): at 512, N=16 gave 9.8x N=1's tokens/s with a p99 of 167.5 ms against a
# p50 of 88.7 (20261201T171639-h200); at 2048, 11.2x (20261201T224959-h200).
DEFAULT_STEP_TOKEN_BUDGET = {"cpu": 512, "cuda": 2048}

# How long the loop waits for a batch's stragglers, as a share of the last turn's model time
# (when that is longer than `batch_wait_ms`): a straggler that misses the batch waits a whole
# forward, the others wait at most this share of one. Measured on the H200 (llama-2-7b, a
# batched forward of 80-130 ms, 20261202T003205-h200): with a fixed 2 ms wait, every p99 step at
# N=2 to N=16 was one that had missed its batch, 63-136 ms past its queue plus compute time (at
# N=16 round 0, 9 of 16 tenants at once); the clients' round trip on that 16-core host, with
# 16 tenant processes beside the server, can outlast 2 ms. A session that is not coming back
# (its client stopped between steps without closing) costs each turn this share of a forward
# until DECODING_WINDOW_S passes.
STRAGGLER_WAIT_FRACTION = 0.1
# A session the loop waited for this many turns in a row without its decode arriving is not
# waited for again until it decodes in a batch: one client stepping two sessions in turn (the
# link sweep's lockstep: one sends only once the other is answered) would otherwise make every
# step of each wait for the other in vain.
MAX_MISSED_WAITS = 2


def default_step_token_budget(device_type: str) -> int:
    """The budget of a server on this kind of device (`torch.device.type`) that was not given one."""
    return DEFAULT_STEP_TOKEN_BUDGET.get(device_type, DEFAULT_STEP_TOKEN_BUDGET["cpu"])


@dataclass(frozen=True)
class BatchPolicy:
    """The scheduler's limits; the server's `ServerConfig` fields of the same names set them."""
    max_batch: int
    step_token_budget: int
    batch_wait_ms: float

    def __post_init__(self):
        if self.max_batch < 1 or self.step_token_budget < 1 or self.batch_wait_ms < 0:
            raise ValueError(f"batching needs max_batch >= 1, step_token_budget >= 1 and batch_wait_ms >= 0, "
                             f"got {self.max_batch}, {self.step_token_budget}, {self.batch_wait_ms}")


@dataclass(eq=False)  # compared by identity: the queue removes the very arrival it served
class Queued:
    """An arrival waiting for its turn: where to answer it and, for session ops, which session."""
    sock: object  # the ServerSocket it came on (and is answered on)
    incoming: Incoming
    handle: str | None  # the 'session' argument, when it names one

    @property
    def peer(self) -> bytes:
        return self.incoming.peer

    @property
    def op(self) -> str:
        return self.incoming.message.op


@dataclass
class PrefillJob:
    """A prefill that runs in chunks between batched steps; the server's `begin_prefill` builds it."""
    queued: Queued
    session: Session
    rows: int
    total_tokens: int  # per row
    state: object  # the server's parsed step (options, ids, padding)
    done_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    compute_s: float = 0.0


@dataclass
class SchedulerCounters:
    iterations: int = 0  # turns that ran anything
    batches: int = 0  # batched forwards of two or more sessions
    batched_sessions: int = 0  # session steps in them, summed
    largest_batch: int = 0
    solo_decodes: int = 0  # decodes that ran alone (one waiting, or `unbatched_reason`)
    prefill_chunks: int = 0
    chunked_prefills: int = 0
    prefill_batches: int = 0  # batched forwards of two or more sessions' prompts
    batched_prefills: int = 0  # prompts in them, summed
    deferred: int = 0  # requests left for a later turn by the time slice or the limits
    straggler_waits: int = 0  # turns that waited for stragglers (decodes or prompts)
    straggler_wait_ms: float = 0.0
    straggler_misses: int = 0  # of them, turns whose wait ran out with stragglers still missing
    prompt_waits: int = 0  # of them, turns that waited for the prompts of sessions just opened

    def as_dict(self) -> dict:
        mean = self.batched_sessions / self.batches if self.batches else None
        return {**asdict(self), "mean_batch": mean}


@dataclass(frozen=True)
class Plan:
    batch: list[Queued]  # decodes of distinct sessions of one model
    batch_tokens: int
    prefills: list[Queued]  # whole prompts of new sessions of one model, one forward
    prefills_tokens: int  # theirs, padded to the longest
    prefill: Queued | None  # a prefill to start in chunks
    others: list[Queued]  # in arrival order


class Engine(Protocol):
    """What the scheduler asks of the server."""

    def receive(self, timeout_ms: float, limit: int) -> list[Queued]: ...

    def batchable(self, queued: Queued) -> tuple[Session, int] | None: ...  # (session, rows) of a batchable decode

    def prefill_tokens(self, queued: Queued) -> int | None: ...  # a chunkable prefill's tokens, all rows

    def batchable_prefill(self, queued: Queued) -> tuple[Session, int, int] | None: ...  # (session, rows, tokens)

    def serve(self, queued: Queued) -> None: ...

    def decode_batch(self, batch: list[Queued]) -> None: ...

    def prefill_batch(self, batch: list[Queued]) -> None: ...

    def begin_prefill(self, queued: Queued) -> PrefillJob | None: ...  # None: answered (an error)

    def prefill_chunk(self, job: PrefillJob, tokens: int) -> bool: ...  # True: finished (answered)


class Scheduler:
    def __init__(self, policy: BatchPolicy, engine: Engine, clock: Callable[[], float] = time.perf_counter):
        self.policy = policy
        self.engine = engine
        self.clock = clock
        self.queue: list[Queued] = []
        self.prefills: list[PrefillJob] = []  # in arrival order; the first one runs
        self.counters = SchedulerCounters()
        self._decoded_at: dict[str, float] = {}  # session handle -> clock of its last decode
        self._opened_at: dict[bytes, float] = {}  # peer -> clock of its open_session, until its next request
        self._model_s = 0.0  # the last turn's model time: its batch, prompts and prefill chunk
        self._missed: dict[str, int] = {}  # session handle -> waits in a row that ran out without it

    @property
    def queue_limit(self) -> int:
        return QUEUE_PER_BATCH_SLOT * self.policy.max_batch

    def iterate(self, timeout_ms: float) -> None:
        """One turn: read what arrived (waiting up to `timeout_ms` when there is nothing to do), then serve."""
        idle = not self.queue and not self.prefills
        self._read(timeout_ms if idle else 0)
        self._wait_for_stragglers()
        if not self.queue and not self.prefills:
            return
        self.counters.iterations += 1
        plan = self._plan()
        batch, prefills, prefill, others = plan.batch, plan.prefills, plan.prefill, plan.others
        step_started = self.clock()
        if len(batch) > 1:
            self.counters.batches += 1
            self.counters.batched_sessions += len(batch)
            self.counters.largest_batch = max(self.counters.largest_batch, len(batch))
            self.engine.decode_batch(batch)
        elif batch:
            self.counters.solo_decodes += 1
            self.engine.serve(batch[0])
        for queued in batch:
            self.queue.remove(queued)
        if len(prefills) > 1:
            self.counters.prefill_batches += 1
            self.counters.batched_prefills += len(prefills)
            self.engine.prefill_batch(prefills)
        elif prefills:
            self.engine.serve(prefills[0])  # alone: the solo prefill, bit for bit
        for queued in prefills:
            self.queue.remove(queued)
        decoding = bool(batch) or self._someone_decoding()
        if prefill is not None:
            self.queue.remove(prefill)
            job = self.engine.begin_prefill(prefill)
            if job is not None:
                self.prefills.append(job)
                self.counters.chunked_prefills += 1
        if self.prefills:
            job = self.prefills[0]
            room = self.policy.step_token_budget - plan.batch_tokens - plan.prefills_tokens
            tokens = max(1, room // job.rows) if decoding else job.total_tokens - job.done_tokens
            self.counters.prefill_chunks += 1
            if self.engine.prefill_chunk(job, tokens):
                self.prefills.pop(0)
        step_s = self.clock() - step_started
        if batch or prefills or self.prefills or prefill:  # a whole prefill (begun and done) is model time too
            self._model_s = step_s
        self._serve_others(others, step_s if (batch or prefills or self.prefills) else None)
        deferred = {id(q) for q in self.queue}
        if len(batch) > 1:
            for queued in batch:
                self._missed.pop(queued.handle, None)
        self._note_served([*batch, *prefills, *([prefill] if prefill else []),
                           *(q for q in others if id(q) not in deferred)])

    def abandon(self) -> list[Queued]:
        """Everything queued or in progress, dropped (after a failure of the scheduler itself) for the
        caller to answer; a prefill in chunks leaves its session as it is, its next request fails."""
        dropped = [*self.queue, *(job.queued for job in self.prefills)]
        self.queue, self.prefills = [], []
        self._decoded_at.clear()
        self._opened_at.clear()
        self._missed.clear()
        return dropped

    def summary(self) -> dict:
        return {**self.counters.as_dict(), "queued": len(self.queue), "prefills_in_progress": len(self.prefills),
                **asdict(self.policy)}

    # -- reading ----------------------------------------------------------------------
    def _read(self, timeout_ms: float) -> None:
        room = self.queue_limit - len(self.queue)
        if room > 0:
            self.queue.extend(self.engine.receive(timeout_ms, room))

    def _wait_for_stragglers(self) -> None:
        """While a decode waits, wait for the other recently decoding sessions'; while a prompt waits,
        for the prompts of the clients that just opened a session: up to `batch_wait_ms`, or
        STRAGGLER_WAIT_FRACTION of the last turn's model time when that is longer."""
        if not self.policy.batch_wait_ms or not self._missing():
            return
        started = self.clock()
        deadline = started + max(self.policy.batch_wait_ms / 1e3, STRAGGLER_WAIT_FRACTION * self._model_s)
        if self._missing_prompts():
            self.counters.prompt_waits += 1
        while self._missing():
            left_ms = (deadline - self.clock()) * 1e3
            if left_ms <= 0:
                self.counters.straggler_misses += 1
                for handle in self._missing_decoders():
                    self._missed[handle] = self._missed.get(handle, 0) + 1
                break
            if len(self.queue) >= self.queue_limit:
                break
            self._read(left_ms)
        self.counters.straggler_waits += 1
        self.counters.straggler_wait_ms += (self.clock() - started) * 1e3

    def _missing(self) -> bool:
        return bool(self._missing_decoders() or self._missing_prompts())

    def _missing_decoders(self) -> set[str]:
        """Sessions that decoded within DECODING_WINDOW_S and have no decode queued, when another has."""
        queued = {q.handle for q in self.queue if q.op == "decode"}
        if not queued or not self._someone_decoding():
            return set()
        return {h for h in self._decoded_at if h not in queued and self._missed.get(h, 0) < MAX_MISSED_WAITS}

    def _missing_prompts(self) -> set[bytes]:
        """Peers that opened a session within DECODING_WINDOW_S and sent nothing since, when a prompt is queued."""
        if not self._opened_at or not any(q.op == "prefill" for q in self.queue):
            return set()
        horizon = self.clock() - DECODING_WINDOW_S
        self._opened_at = {peer: at for peer, at in self._opened_at.items() if at >= horizon}
        return set(self._opened_at) - {q.peer for q in self.queue}

    # -- planning ---------------------------------------------------------------------
    def _note_served(self, served: list[Queued]) -> None:
        now = self.clock()
        for queued in served:
            if queued.op == "open_session":
                self._opened_at[queued.peer] = now
            else:
                self._opened_at.pop(queued.peer, None)
            if queued.handle is None:
                continue
            if queued.op == "decode":
                self._decoded_at[queued.handle] = now
            else:  # a close, a new prompt, a rollback: the session is not between two decodes
                self._decoded_at.pop(queued.handle, None)
                self._missed.pop(queued.handle, None)

    def _someone_decoding(self) -> bool:
        """Whether a session decoded within DECODING_WINDOW_S (forgetting those that did not)."""
        horizon = self.clock() - DECODING_WINDOW_S
        self._decoded_at = {handle: at for handle, at in self._decoded_at.items() if at >= horizon}
        self._missed = {handle: n for handle, n in self._missed.items() if handle in self._decoded_at}
        return bool(self._decoded_at)

    def _plan(self) -> "Plan":
        """This turn's decode batch, its batched prefill, the prefill to start in chunks (if any) and the
        other requests, in order. The step's tokens stay within `step_token_budget`: the batch's, then the
        prompts batched beside it (padded to the longest); a prompt that does not fit waits for a later
        turn, or, the first and alone, runs whole (nobody decoding) or in chunks (somebody is)."""
        blocked = {job.queued.peer for job in self.prefills}  # peers with an earlier request not yet served
        busy = {job.queued.handle for job in self.prefills}  # sessions with a step this turn (or in chunks)
        batch: list[Queued] = []
        prefills: list[Queued] = []
        others: list[Queued] = []
        prefill = None
        model, tokens = None, 0
        prompts_model, rows, longest = None, 0, 0
        decoding = self._someone_decoding() or any(q.op == "decode" for q in self.queue)
        for queued in self.queue:
            if queued.peer in blocked or (queued.handle is not None and queued.handle in busy):
                blocked.add(queued.peer)
                continue
            found = self.engine.batchable(queued)
            if found is not None:
                session, step_rows = found
                if model is None or (session.model is model and len(batch) < self.policy.max_batch
                                     and tokens + step_rows <= self.policy.step_token_budget):
                    model = session.model
                    batch.append(queued)
                    busy.add(queued.handle)
                    tokens += step_rows
                else:
                    self.counters.deferred += 1
                    blocked.add(queued.peer)
                continue
            if queued.handle is not None:
                busy.add(queued.handle)
            chunked = self.engine.prefill_tokens(queued) if decoding else None
            if (prefill is None and not self.prefills and chunked is not None
                    and chunked > self.policy.step_token_budget - tokens):
                prefill = queued
                blocked.add(queued.peer)  # its later requests wait for the whole prefill
                continue
            prompt = self.engine.batchable_prefill(queued)
            if prompt is not None:
                session, prompt_rows, prompt_tokens = prompt
                padded = (rows + prompt_rows) * max(longest, prompt_tokens)
                if not prefills or (session.model is prompts_model and len(prefills) < self.policy.max_batch
                                    and tokens + padded <= self.policy.step_token_budget):
                    prompts_model = session.model
                    prefills.append(queued)
                    rows, longest = rows + prompt_rows, max(longest, prompt_tokens)
                else:
                    self.counters.deferred += 1
                    blocked.add(queued.peer)
                continue
            others.append(queued)
        return Plan(batch, tokens, prefills, rows * longest, prefill, others)

    def _serve_others(self, others: list[Queued], slice_s: float | None) -> None:
        """`others` in order, for up to `slice_s` (at least one); all of them when None."""
        started = self.clock()
        for index, queued in enumerate(others):
            if index and slice_s is not None and self.clock() - started >= slice_s:
                self.counters.deferred += len(others) - index
                return
            self.queue.remove(queued)
            self.engine.serve(queued)
