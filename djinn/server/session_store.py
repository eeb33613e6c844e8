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
"""
from __future__ import annotations

import heapq
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Callable

import torch
from transformers import DynamicCache

from djinn import kv
from djinn.server.graphs import GraphDecoder, GraphSlots
from djinn.errors import BadRequest, LimitExceeded, OutOfMemory, SessionNotFound
from djinn.server.breakpoints import ParkedForward
from djinn.server.weight_cache import CachedModel

log = logging.getLogger("djinn.server.sessions")

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
    step_tokens: int  # tokens the paused step adds (per batch row)
    batch: int


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
    last_used: float = field(default_factory=time.monotonic)
    decoder: GraphDecoder | None = None  # a graph slot holds the KV instead of `cache`
    # KV bytes resident on the device, kept current by paging (per layer moved) and by
    # `recount` after a forward or a rollback: every request's admission sums it over all
    # sessions, and walking every layer of 50 sessions' caches took ~1 ms of its IO wait.
    kv_bytes: int = 0

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
                "parked_layer": self.breakpoint.layer if self.breakpoint else None,
                "last_io_wait_ms": self.last_io_wait_ms, **self.paging.as_dict()}


class SessionStore:
    # Caps on open sessions; the server sets its own (`ServerLimits`).
    max_sessions: int = 4096
    max_sessions_per_peer: int = 1024

    def __init__(self, ttl_s: float, where: str, device: torch.device, *, swap: bool, host_limit_bytes: int,
                 graphs: GraphSlots | None = None):
        self.ttl_s = ttl_s
        self.graphs = graphs  # graph-decode slots, whose static caches hold their sessions' KV
        self.where = where  # named in errors: "session 3f2a… unknown or expired on 127.0.0.1:5556"
        self.device = device
        self.swap = swap
        self.host_limit_bytes = host_limit_bytes
        self.sessions: dict[str, Session] = {}
        self.expired = 0
        self.paging = PagingCounters()  # every session's, closed ones included
        self._expiry: list[tuple[float, str]] = []  # (deadline, handle) heap of `expire`
        self._by_owner: dict[bytes, set[str]] = {}  # handles each peer opened (closed ones pruned at its next open)

    @property
    def kv_bytes(self) -> int:
        """KV on the device: resident session layers and the graph slots' static caches."""
        slots = self.graphs.bytes if self.graphs is not None else 0
        return sum(s.kv_bytes for s in self.sessions.values()) + slots

    @property
    def host_bytes(self) -> int:
        return sum(s.host_bytes for s in self.sessions.values())

    def summary(self) -> dict:
        return {"swap_enabled": self.swap, "host_bytes": self.host_bytes, "host_limit_bytes": self.host_limit_bytes,
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
        return len(self._by_owner.get(owner, set()) & self.sessions.keys())

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
            self.graphs.release(session.decoder)
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

    def rollback(self, session: Session, length: int) -> None:
        """Back to `length` tokens: after a step that failed or was cancelled half-way."""
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
        freed = 0
        host_bytes = self.host_bytes - host_credit
        started = time.perf_counter()
        try:
            for index, k, v in reversed(session._layers()):
                if want_bytes is not None and freed >= want_bytes:
                    break
                size = k.nbytes + v.nbytes
                if index in session.host or size == 0:
                    continue
                if host_bytes + size > self.host_limit_bytes:
                    raise OutOfMemory(f"host swap is full: {host_bytes / 1e9:.2f} GB of the "
                                      f"{self.host_limit_bytes / 1e9:.2f} GB limit (--host-swap-gb) in use, "
                                      f"{size / 1e6:.1f} MB more needed to page out session {session.handle[:8]}")
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
            log.debug("paged out %.1f MB of session %s", freed / 1e6, session.handle[:8])
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
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"paging session {session.handle[:8]} back in ran out of device memory: {exc}") from None
        finally:
            session.state = state
            if moved:
                self._time(session, "in", started)
        return ready_at

    def page_out_lru(self, want_bytes: int, keep: Session) -> int:
        """Free `want_bytes` of device KV from the least recently used other sessions, to make room
        for `keep` (whose own pages come back next); the bytes freed."""
        freed = 0
        for victim in sorted(self.sessions.values(), key=lambda s: s.last_used):
            if freed >= want_bytes:
                break
            if victim is not keep and victim.kv_bytes:
                freed += self.page_out(victim, want_bytes - freed, host_credit=keep.host_bytes)
        return freed

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor.clone()  # a CPU "device": a separate copy, the device one is dropped
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError as exc:
            raise OutOfMemory(f"cannot allocate {tensor.nbytes / 1e6:.1f} MB of pinned host memory: {exc}") from None
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
