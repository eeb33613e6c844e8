"""Sessions: opaque handles to KV caches that live on the server, paged to host under pressure.

A session belongs to one cached model. Its KV cache never leaves the server; the
client holds only the handle. Under the device budget the KV of idle sessions is paged
to host memory (pinned on a GPU), least recently used first and one layer at a time,
and paged back before the session's next request runs: that request waits in IO_WAIT,
then runs, and a session whose KV is partly resident restores only its missing layers.
A paged-out layer leaves a storage-less `meta` tensor of its shape in the cache, so
lengths and shapes read the same either way. Page-outs and page-ins are counted and
timed per session and for the whole store. Host memory has its own limit: past it,
paging stops with `OutOfMemory` instead of the OS killing the server.

On a CPU device the same code runs: the "device" is whatever the budget accounts, a
page-out copies each layer into a separate host tensor and drops the device copy.

A session may also hold a forward parked at a breakpoint; closing or expiring the
session cancels it and rolls back the KV that the paused step had added. Sessions idle
for longer than the TTL (a client that vanished) are closed by `expire`, which the
request loop calls between requests.

A session's lifecycle lives here, the executor only checks inputs and runs forwards:
`step` is one request's forward as a transaction. It admits the step (room for its new
KV and the session's paged-out layers under the device budget, paging other sessions
out, least recently used first, then the session's own pages in), runs it, and on any
failure rolls the session back to where it started. An allocation failure inside the
forward (`torch.OutOfMemoryError`: the budget's accounting and the device disagree)
is retried after paging out more idle sessions and releasing the allocator's cached
blocks; only when nothing more can be freed does the request fail with `OutOfMemory`,
and then too every session, the failing one included, keeps its KV.
"""
from __future__ import annotations

import heapq
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Callable, Sequence, TypeVar

import torch
from transformers import DynamicCache

from djinn import host_memory, kv
from djinn.decoding import Padding
from djinn.errors import BadRequest, LimitExceeded, OutOfMemory, SessionNotFound
from djinn.sampling import Sampler
from djinn.server.breakpoints import ParkedForward
from djinn.server.device_budget import DeviceBudget
from djinn.server.fast_decode import FastPath, FastSlot
from djinn.server.step_latency import StepLatency
from djinn.server.weight_cache import CachedModel
from djinn.units import gib, human

log = logging.getLogger("djinn.server.sessions")

T = TypeVar("T")
# Retries of a step whose forward ran out of device memory; each frees twice what the
# last one did, so a handful covers any shortfall up to every idle session's KV.
MAX_OOM_RETRIES = 6
# Host memory that paging leaves to everything else (the process, receive buffers, the
# client on the same host): below it a page-out is refused with `OutOfMemory` rather
# than letting the kernel's OOM killer end the server.
HOST_FLOOR_FRACTION = 0.05
HOST_FLOOR_MIN_BYTES = 1 << 30
EXPIRY_SLACK = 64  # stale heap entries tolerated beside the live ones before a rebuild


class SessionState(str, Enum):
    IDLE = "idle"  # between requests; its KV resident, paged out, or partly both
    IO_WAIT = "io_wait"  # a request waits for the session's KV pages to come back
    RUNNING = "running"
    PARKED = "parked"  # a forward paused at a breakpoint, awaiting resume or cancel


@dataclass
class PagingCounters:
    page_outs: int = 0  # layer pages moved device -> host
    page_ins: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    page_out_ms: float = 0.0
    page_in_ms: float = 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "page_in_gbps": self.bytes_in / self.page_in_ms / 1e6 if self.page_in_ms else None,
                "page_out_gbps": self.bytes_out / self.page_out_ms / 1e6 if self.page_out_ms else None}


@dataclass
class Breakpoint:
    forward: ParkedForward
    layer: int
    start_length: int  # tokens in the cache before the paused step
    ids: torch.Tensor  # the paused step's token ids, on the device: a retried resume runs layers 0..N again
    edits: object | None = None  # its interventions' hooks (a StepHooks), installed again by such a retry

    @property
    def step_tokens(self) -> int:  # tokens the paused step adds (per batch row)
        return self.ids.shape[1]

    @property
    def batch(self) -> int:
        return self.ids.shape[0]


@dataclass
class Session:
    handle: str
    model: CachedModel
    owner: bytes
    cache: DynamicCache | None = None
    host: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # paged-out layers
    state: SessionState = SessionState.IDLE
    breakpoint: Breakpoint | None = None
    paging: PagingCounters = field(default_factory=PagingCounters)
    last_io_wait_ms: float = 0.0
    oom_retries: int = 0  # steps of this session retried after an allocation failure
    last_used: float = field(default_factory=time.monotonic)
    decoder: FastSlot | None = None  # a fast-path slot holds the KV instead of `cache`
    decode: str = "auto"  # the load's choice: auto, fast or exact (djinn.modes.DECODE_CHOICES)
    path: str | None = None  # the path its last step took (fast_compiled, ..., hf_eager)
    # KV bytes resident on the device, kept current by paging (per layer moved) and by
    # `recount` after a forward or a rollback: every request's admission sums it over all
    # sessions, and walking every layer of 50 sessions' caches took ~1 ms of its IO wait.
    kv_bytes: int = 0
    # Set by the step that made them current (the server's, after its forward succeeded):
    padding: Padding | None = None  # a padded batch's mask and positions as of the last step
    sampler: Sampler | None = None  # picks each next token: HF's processors and the seeded generator
    latency: StepLatency = field(default_factory=StepLatency)  # its steps' queue and compute time

    @property
    def length(self) -> int:
        if self.decoder is not None:
            return self.decoder.length
        return self.cache.get_seq_length() if self.cache is not None else 0

    @property
    def batch(self) -> int | None:
        if self.decoder is not None:
            return self.decoder.batch
        return kv.to_pairs(self.cache)[0][0].shape[0] if self.length else None

    def _layers(self):
        return [] if self.cache is None else [(i, k, v) for i, (k, v) in enumerate(kv.to_pairs(self.cache))
                                              if k is not None]

    def count_kv_bytes(self) -> int:
        """KV bytes resident on the device, counted over the cache's tensors."""
        return sum(k.nbytes + v.nbytes for i, k, v in self._layers() if i not in self.host)

    def recount(self) -> None:
        """Refresh `kv_bytes` after the cache changed other than by paging."""
        self.kv_bytes = self.count_kv_bytes()

    @property
    def host_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.host.values())

    def summary(self) -> dict:
        return {"state": self.state.value, "length": self.length, "kv_bytes": self.kv_bytes,
                "host_bytes": self.host_bytes, "layers_paged": len(self.host),
                "parked_layer": self.breakpoint.layer if self.breakpoint else None, "decode_path": self.path,
                "last_io_wait_ms": self.last_io_wait_ms, "oom_retries": self.oom_retries, **self.paging.as_dict(),
                "latency": self.latency.as_dict()}


class SessionStore:
    # Caps on open sessions; the server sets its own (`ServerLimits`).
    max_sessions: int = 4096
    max_sessions_per_peer: int = 1024

    def __init__(self, ttl_s: float, where: str, budget: DeviceBudget, *, swap: bool,
                 host_limit_bytes: int | None = None, fast: FastPath | None = None):
        self.ttl_s = ttl_s
        self.fast = fast  # the fast decode path, whose slots' static caches hold their sessions' KV
        self.where = where  # named in errors: "session 3f2a… unknown or expired on 127.0.0.1:5556"
        self.budget = budget
        self.device = budget.device
        self.swap = swap
        # A fixed cap on paged-out KV (--host-swap-gb); None: as much as the host has, less a floor.
        self.host_limit_bytes = host_limit_bytes
        self.sessions: dict[str, Session] = {}
        self.expired = 0
        self.paging = PagingCounters()  # every session's, closed ones included
        self._expiry: list[tuple[float, str]] = []  # (deadline, handle) heap of `expire`
        self._by_owner: dict[bytes, set[str]] = {}  # handles each peer opened (closed ones pruned at its next open)
        budget.hold("kv", lambda: self.kv_bytes)

    @property
    def kv_bytes(self) -> int:
        """KV of the sessions' resident layers (fast-path slots' static caches are the fast path's holding)."""
        return sum(s.kv_bytes for s in self.sessions.values())

    @property
    def host_bytes(self) -> int:
        return sum(s.host_bytes for s in self.sessions.values())

    def summary(self) -> dict:
        return {"swap_enabled": self.swap, "host_bytes": self.host_bytes, "host_limit_bytes": self.host_limit_bytes,
                "host_room_bytes": self.host_room(),
                "sessions_paged": sum(1 for s in self.sessions.values() if s.host), **self.paging.as_dict()}

    def open(self, model: CachedModel, owner: bytes) -> Session:
        """A new session of `model` for the peer `owner`, within the caps on sessions."""
        if len(self.sessions) >= self.max_sessions:
            raise LimitExceeded(f"{len(self.sessions)} sessions are open on {self.where}, the cap is "
                                f"{self.max_sessions}: close some (or wait for idle ones to expire)")
        mine = self._by_owner.setdefault(owner, set())
        if len(mine) >= self.max_sessions_per_peer:  # forget the closed ones only now: amortised over the opens
            mine.difference_update([h for h in mine if h not in self.sessions])
        if len(mine) >= self.max_sessions_per_peer:
            raise LimitExceeded(f"this connection holds {len(mine)} sessions on {self.where}, the cap per "
                                f"connection is {self.max_sessions_per_peer}")
        # 128 random bits: the handle is the capability that lets its holder use the session.
        session = Session(secrets.token_hex(16), model, owner)
        self.sessions[session.handle] = session
        mine.add(session.handle)
        heapq.heappush(self._expiry, (session.last_used + self.ttl_s, session.handle))
        model.users += 1
        return session

    def owned_by(self, owner: bytes) -> int:
        """How many open sessions the peer holds."""
        return len(self.owned_handles(owner))

    def owned_handles(self, owner: bytes) -> set[str]:
        """The handles of the peer's open sessions."""
        return self._by_owner.get(owner, set()) & self.sessions.keys()

    def get(self, handle: object, fingerprint: object, touch: bool = True) -> Session:
        """The session behind a handle; `touch` marks it used (for the TTL and the LRU order)."""
        if not isinstance(handle, str):
            raise BadRequest("'session' must be a session handle string")
        session = self.sessions.get(handle)
        if session is None:
            raise SessionNotFound(f"session {handle[:16]} unknown or expired on {self.where}")
        if fingerprint != session.model.fingerprint:
            raise BadRequest(f"session {handle} belongs to model {session.model.fingerprint}, "
                             f"not to model {fingerprint}")
        if touch:
            session.last_used = time.monotonic()
        return session

    def close(self, handle: str) -> None:
        session = self.sessions.pop(handle, None)
        if session is None:
            raise SessionNotFound(f"session {handle[:16]} unknown or expired on {self.where}")
        if session.breakpoint is not None:
            try:
                session.breakpoint.forward.cancel()
            except Exception:  # the session goes either way; a failed unwind must not stop the loop
                log.exception("cancelling the parked forward of session %s failed", handle)
        if session.decoder is not None:
            self.fast.release(session.decoder)
        session.breakpoint = session.cache = session.decoder = None
        session.host.clear()
        session.kv_bytes = 0
        session.model.users -= 1

    def expire(self, now: float | None = None) -> int:
        """Close the sessions idle for longer than the TTL; how many.

        The request loop calls this before every request, so it must not walk every session:
        a heap holds one deadline per session (the last use it knew of + TTL). A deadline
        that passed is checked against the session's real last use, and pushed again if the
        session was used since; closed sessions' entries drop out as they come up, and the
        heap is rebuilt when they outnumber the live ones.
        """
        now = time.monotonic() if now is None else now
        expired = 0
        while self._expiry and self._expiry[0][0] < now:
            _deadline, handle = heapq.heappop(self._expiry)
            session = self.sessions.get(handle)
            if session is None:
                continue
            if now - session.last_used > self.ttl_s:
                self.close(handle)
                expired += 1
                log.info("session %s expired after %.0f s idle", handle[:8], self.ttl_s)
            else:
                heapq.heappush(self._expiry, (session.last_used + self.ttl_s, handle))
        if len(self._expiry) > 2 * len(self.sessions) + EXPIRY_SLACK:  # and the per-peer sets likewise
            self._expiry = [(s.last_used + self.ttl_s, h) for h, s in self.sessions.items()]
            heapq.heapify(self._expiry)
            self._by_owner = {}
            for handle, session in self.sessions.items():
                self._by_owner.setdefault(session.owner, set()).add(handle)
        self.expired += expired
        return expired

    def close_all(self) -> None:
        for handle in list(self.sessions):
            self.close(handle)

    # -- a step, as a transaction --------------------------------------------------
    def step(self, session: Session, new_kv_bytes: int, run: Callable[[int], T], *,
             start_length: int | None = None, retry_kv_bytes: int | None = None,
             while_paging_in: Callable[[], None] | None = None, started: float | None = None) -> T:
        """`run(attempt)`, a forward adding `new_kv_bytes` of KV to the session, with room made for it.

        On success the session is idle (or parked, if `run` parked it: `park` after this);
        on any failure it is back at `start_length` tokens (default: its length now) and
        idle. A forward that runs out of device memory is retried (`attempt` 1, 2, ...)
        after paging out idle sessions and releasing cached blocks, with `retry_kv_bytes`
        of new KV (default: the same); `while_paging_in` and `started`: see `admit`.
        """
        start = session.length if start_length is None else start_length
        need = new_kv_bytes
        for attempt in range(MAX_OOM_RETRIES + 1):
            try:
                self.admit(session, need, while_paging_in, started)
                if session.decoder is None and session.cache is None:
                    session.cache = kv.from_pairs([])
                session.state = SessionState.RUNNING
                with self.budget.measure():
                    result = run(attempt)
            except torch.OutOfMemoryError as exc:
                # Copies and kernels the failed attempt queued finish before its memory is
                # rolled back, paged or released.
                self._synchronize()
                session.oom_retries += 1
                self.rollback(session, start)
                session.state = SessionState.IDLE
                freed = self.relieve(session, self._relief_bytes(session, need) << attempt) \
                    if attempt < MAX_OOM_RETRIES else 0
                # The first retry runs even when nothing was freed: a failure from fragmentation or
                # another process's transient use can pass; a second one with nothing freed would not.
                if not freed and attempt:
                    self.budget.counters.ooms_failed += 1
                    raise OutOfMemory(
                        f"session {session.handle[:8]}: a step adding {human(need)} of KV ran out of device memory "
                        f"after {attempt} {'retry' if attempt == 1 else 'retries'}, with every other session's KV paged out and the allocator's "
                        f"cache released; {self.budget.describe()}: {_first_line(exc)}") from None
                log.info("session %s: step ran out of device memory (%s); freed %s, retrying",
                         session.handle[:8], _first_line(exc), human(freed))
                need = new_kv_bytes if retry_kv_bytes is None else retry_kv_bytes
                continue
            except BaseException:
                self.rollback(session, start)
                session.state = SessionState.IDLE
                raise
            if attempt:
                self.budget.counters.ooms_recovered += 1
            session.state = SessionState.IDLE
            session.recount()
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    def retrying(self, run: Callable[[int], T], want_bytes: int = 0) -> T:
        """A forward outside any session (the stateless `forward`), retried as `step` retries one."""
        for attempt in range(MAX_OOM_RETRIES + 1):
            try:
                with self.budget.measure():
                    return run(attempt)
            except torch.OutOfMemoryError as exc:
                self._synchronize()
                freed = self.relieve(None, self._relief_bytes(None, want_bytes) << attempt) \
                    if attempt < MAX_OOM_RETRIES else 0
                if not freed and attempt:
                    self.budget.counters.ooms_failed += 1
                    raise OutOfMemory(f"forward ran out of device memory with every session's KV paged out; "
                                      f"{self.budget.describe()}: {_first_line(exc)}") from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def step_batch(self, sessions: Sequence[Session], new_kv_bytes: int, run: Callable[[], T]) -> T:
        """`run()`, one forward over several sessions (the scheduler's batched decode) adding
        `new_kv_bytes` of KV in all, as one transaction: room for it and for every session's
        paged-out layers (no session of the batch paged out to make it), their pages in, the
        forward; on any failure every session back where it started, and idle.

        An allocation failure is not retried here: after the rollback it propagates, and the
        caller runs the sessions one by one through `step`, which retries each."""
        starts = [(session, session.length) for session in sessions]
        try:
            self._admit_together(sessions, new_kv_bytes)
            for session in sessions:
                if session.cache is None:
                    session.cache = kv.from_pairs([])
                session.state = SessionState.RUNNING
            with self.budget.measure():
                result = run()
        except BaseException as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                self._synchronize()
            for session, start in starts:
                self.rollback(session, start)
                session.state = SessionState.IDLE
            raise
        for session in sessions:
            session.state = SessionState.IDLE
            session.recount()
        return result

    def _admit_together(self, sessions: Sequence[Session], new_bytes: int) -> None:
        """`admit` for a batch: the shortfall of all of them at once, paged out of sessions outside it."""
        started = time.perf_counter()
        missing = sum(s.host_bytes for s in sessions)
        over = self.budget.shortfall(missing + new_bytes)
        if over > 0:
            if not self.swap:
                raise OutOfMemory(f"a batch of {len(sessions)} sessions needs {human(new_bytes + missing)} more: "
                                  f"{self.budget.describe()}; KV swap is disabled")
            freed = self.page_out_lru(over, keep=tuple(sessions))
            if freed < over:
                freed += self.budget.release_cached()
            if freed < over:
                raise OutOfMemory(f"a batch of {len(sessions)} sessions needs {human(new_bytes + missing)} more, "
                                  f"more than paging out every other session frees: {self.budget.describe()}")
        for session in sessions:
            session.last_io_wait_ms = (self.page_in(session) - started) * 1e3

    def admit(self, session: Session, new_bytes: int, while_paging_in: Callable[[], None] | None = None,
              started: float | None = None) -> None:
        """Room for `new_bytes` of new KV and the session's paged-out layers, then those layers paged in.

        The time from `started` (the request's, else now) until the pages were on the device
        (`page_in`) is the request's IO wait, kept in `session.last_io_wait_ms`;
        `while_paging_in` is host work to overlap with the page-in's copies.
        """
        started = time.perf_counter() if started is None else started
        missing = session.host_bytes
        over = self.budget.shortfall(missing + new_bytes)
        if over > 0:
            what = f"{human(new_bytes)} more KV cache" + (f" and {human(missing)} paged back in" if missing else "")
            if not self.swap:
                raise OutOfMemory(f"{what} do not fit: {self.budget.describe()}; KV swap is disabled")
            freed = self.page_out_lru(over, keep=session)
            if freed < over and self.fast is not None:
                freed += self.fast.drop_idle()
            if freed < over:
                freed += self.budget.release_cached()
            if freed < over:
                raise OutOfMemory(f"{what} do not fit even with the KV of every other session paged to host: "
                                  f"{self.budget.describe()}")
        session.last_io_wait_ms = (self.page_in(session, while_paging_in) - started) * 1e3

    def relieve(self, keep: Session | None, want_bytes: int) -> int:
        """After an allocation failure: page out up to `want_bytes` of idle sessions' KV and release the
        allocator's cached blocks; the bytes freed (0: nothing more can be freed)."""
        freed = 0
        if self.swap:
            try:
                freed = self.page_out_lru(want_bytes, keep=keep)
            except OutOfMemory as exc:  # the host is full: what was freed before it still counts
                log.warning("relieving device memory stopped: %s", exc)
                freed = 0
        if self.fast is not None:
            freed += self.fast.drop_idle()
        return freed + self.budget.release_cached()

    def _relief_bytes(self, keep: Session | None, need: int) -> int:
        """What the first retry after an allocation failure frees: the step's need and the reserve, and at
        least the largest other session's resident KV. The device lacked an unknown amount, so a retry
        that freed a few pages of KV would fail again; each later retry frees twice as much."""
        largest = max((s.kv_bytes for s in self.sessions.values() if s is not keep), default=0)
        return max(need + self.budget.reserve_bytes, largest)

    def park(self, session: Session, breakpoint: Breakpoint) -> None:
        session.breakpoint, session.state = breakpoint, SessionState.PARKED

    def unpark(self, session: Session) -> Breakpoint:
        bp = session.breakpoint
        if bp is None:
            raise BadRequest(f"session {session.handle} is not parked at a breakpoint: run_to_layer first")
        session.breakpoint, session.state = None, SessionState.IDLE
        return bp

    # -- breakpoints -----------------------------------------------------------------
    def cancel_breakpoint(self, session: Session) -> None:
        """Unwind the parked forward and drop the KV its layers 0..N had added."""
        bp = session.breakpoint
        if bp is None:
            raise BadRequest(f"session {session.handle} is not parked at a breakpoint")
        session.breakpoint = None
        bp.forward.cancel()
        self.rollback(session, bp.start_length)
        session.state = SessionState.IDLE

    def leave_fast_path(self, session: Session, *, copy: bool = True) -> None:
        """The session's KV out of its slot into an ordinary cache: before a breakpoint, past the slot's
        length, after its graph failed (a copy, and the slot goes back), or before a page-out (`copy`
        False: views of the slot's tokens, which the page-out moves to host layer by layer).

        A slot whose tokens stay referenced as views is dropped, so no other session writes into them;
        a layer left resident keeps its slot tensor until its next step replaces it. Without room for
        a copy the views are taken too: the session keeps its KV either way."""
        slot = session.decoder
        views = slot.pairs()
        pairs = None
        if copy:
            try:
                pairs = [(k.clone(), v.clone()) for k, v in views]
            except torch.OutOfMemoryError:
                pairs = None
        session.decoder = None
        session.cache = kv.wrap(pairs or views) if slot.length else None
        if pairs is None:
            self.fast.drop(slot)
        else:
            self.fast.release(slot)
        session.recount()

    def rollback(self, session: Session, length: int) -> None:
        """Back to `length` tokens: after a step that failed or was cancelled half-way."""
        if session.decoder is not None:  # the static cache past the slot's length is never read
            session.decoder.length = min(session.decoder.length, length)
            return
        if session.cache is None:
            return
        if length == 0:
            session.cache = None
            session.host.clear()
        else:
            kv.truncate(session.cache, length)
            for index, (k, v) in list(session.host.items()):
                if k.shape[-2] > length:
                    session.host[index] = (k[..., :length, :].clone(), v[..., :length, :].clone())
        session.recount()

    # -- paging ----------------------------------------------------------------------
    def page_out(self, session: Session, want_bytes: int | None = None, host_credit: int = 0) -> int:
        """Move the session's resident layers to host, deepest first, until `want_bytes` are freed
        (all of them when None); the bytes freed on the device.

        `host_credit`: host bytes about to be paged back in by the request making room,
        so an exchange (B out, A back in) works with a full host swap; the limit can then
        be exceeded by that much until A's pages are in.
        """
        if session.decoder is not None:
            self.leave_fast_path(session, copy=False)
        freed = 0
        host_bytes = self.host_bytes - host_credit
        # The host's own limit, asked once per call (a read of /proc and the cgroup's files).
        host_room = self.host_room() + host_credit
        started = time.perf_counter()
        try:
            for index, k, v in reversed(session._layers()):
                if want_bytes is not None and freed >= want_bytes:
                    break
                size = k.nbytes + v.nbytes
                if index in session.host or size == 0:
                    continue
                if self.host_limit_bytes is not None and host_bytes + size > self.host_limit_bytes:
                    raise OutOfMemory(f"host swap is full: {gib(host_bytes)} of the {gib(self.host_limit_bytes)} "
                                      f"limit (--host-swap-gb) in use, {human(size)} more needed to page out "
                                      f"session {session.handle[:8]}")
                if freed + size > host_room:
                    raise OutOfMemory(f"host memory is full: {gib(host_bytes)} of KV paged out, {human(size)} more "
                                      f"needed to page out session {session.handle[:8]} would leave less than "
                                      f"{gib(self.host_floor_bytes())} to the rest of the host "
                                      f"({host_memory.read().describe()})")
                session.host[index] = (self._to_host(k), self._to_host(v))
                kv.set_layer(session.cache, index, torch.empty_like(k, device="meta"),
                             torch.empty_like(v, device="meta"))
                session.kv_bytes -= size
                freed += size
                host_bytes += size
                self._count(session, "out", size)
        finally:
            self._synchronize()
            if freed:
                self._time(session, "out", started)
        if freed:
            log.debug("paged out %s of session %s", human(freed), session.handle[:8])
        return freed

    def page_in(self, session: Session, while_copying: Callable[[], None] | None = None) -> float:
        """Bring every paged-out layer of the session back to the device; when they were there
        (`time.perf_counter()` as the wait for the copies returned, before the bookkeeping).

        `while_copying` runs on the host once the copies are issued, before they are waited
        for; whatever it queues on the device is waited for too.
        """
        if not session.host:
            if while_copying is not None:
                while_copying()
                self._synchronize()
            return time.perf_counter()
        state, session.state = session.state, SessionState.IO_WAIT
        moved = 0
        started = time.perf_counter()
        try:
            for index in sorted(session.host):
                k, v = session.host[index]
                kv.set_layer(session.cache, index, self._to_device(k), self._to_device(v))
                # Dropping the pinned copy now is safe: the host allocator holds a block
                # that an asynchronous copy reads until that copy completes.
                del session.host[index]
                size = k.nbytes + v.nbytes
                session.kv_bytes += size
                moved += size
                self._count(session, "in", size)
            if while_copying is not None:
                while_copying()
            self._synchronize()
            ready_at = time.perf_counter()
        finally:  # an allocation failure leaves each layer either back or still on the host: `step` retries
            session.state = state
            if moved:
                self._time(session, "in", started)
        return ready_at

    def page_out_lru(self, want_bytes: int, keep: Session | tuple[Session, ...] | None) -> int:
        """Free `want_bytes` of device KV from the least recently used other sessions, to make room
        for `keep` (one session, or a batch's; whose own pages come back next); the bytes freed."""
        kept = keep if isinstance(keep, tuple) else (() if keep is None else (keep,))
        credit = sum(s.host_bytes for s in kept)
        freed = 0
        for victim in sorted(self.sessions.values(), key=lambda s: s.last_used):
            if freed >= want_bytes:
                break
            if all(victim is not k for k in kept) and (victim.kv_bytes or victim.decoder is not None):
                freed += self.page_out(victim, want_bytes - freed, host_credit=credit)
        return freed

    @staticmethod
    def host_floor_bytes() -> int:
        return max(HOST_FLOOR_MIN_BYTES, int(HOST_FLOOR_FRACTION * host_memory.read().mem_available_bytes))

    def host_room(self) -> int:
        """Bytes of KV the host can still take: what this process may allocate (the cgroup's limit
        included), plus pinned blocks the host allocator caches for reuse, less a floor."""
        cached_pinned = 0
        if self.device.type == "cuda":
            stats = torch.cuda.host_memory_stats()
            cached_pinned = max(0, stats.get("reserved_bytes.current", 0) - stats.get("allocated_bytes.current", 0))
        return host_memory.available_bytes() + cached_pinned - self.host_floor_bytes()

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor.clone()  # a CPU "device": a separate copy, the device one is dropped
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError as exc:
            raise OutOfMemory(f"cannot allocate {human(tensor.nbytes)} of pinned host memory: {exc}") from None
        # Stream-ordered after the kernels that wrote the KV; synchronised before the
        # device copy's memory can be reused by anything off this stream.
        return host.copy_(tensor, non_blocking=True)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tensor.clone()
        return tensor.to(self.device, non_blocking=True)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _count(self, session: Session, direction: str, size: int) -> None:
        for counters in (session.paging, self.paging):
            if direction == "out":
                counters.page_outs += 1
                counters.bytes_out += size
            else:
                counters.page_ins += 1
                counters.bytes_in += size

    def _time(self, session: Session, direction: str, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        for counters in (session.paging, self.paging):
            if direction == "out":
                counters.page_out_ms += elapsed_ms
            else:
                counters.page_in_ms += elapsed_ms


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
