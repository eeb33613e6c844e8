"""Sessions: opaque handles to KV caches that stay on the server's device.

A session belongs to one cached model. Its KV cache never leaves the server; the
client holds only the handle. Sessions idle for longer than the TTL (a client that
vanished) are closed by `expire`, which the request loop calls between requests.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

from transformers import DynamicCache

from djinn import kv
from djinn.errors import BadRequest, SessionNotFound
from djinn.server.weight_cache import CachedModel

log = logging.getLogger("djinn.server.sessions")


@dataclass
class Session:
    handle: str
    model: CachedModel
    owner: bytes
    cache: DynamicCache | None = None
    kv_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0


class SessionStore:
    def __init__(self, ttl_s: float, where: str):
        self.ttl_s = ttl_s
        self.where = where  # named in errors: "session 3f2a… unknown or expired on 127.0.0.1:5556"
        self.sessions: dict[str, Session] = {}
        self.expired = 0

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.sessions.values())

    def open(self, model: CachedModel, owner: bytes) -> Session:
        session = Session(secrets.token_hex(8), model, owner)
        self.sessions[session.handle] = session
        model.users += 1
        return session

    def get(self, handle: object, fingerprint: object) -> Session:
        if not isinstance(handle, str):
            raise BadRequest("'session' must be a session handle string")
        session = self.sessions.get(handle)
        if session is None:
            raise SessionNotFound(f"session {handle[:16]} unknown or expired on {self.where}")
        if fingerprint != session.model.fingerprint:
            raise BadRequest(f"session {handle} belongs to model {session.model.fingerprint}, "
                             f"not to model {fingerprint}")
        session.last_used = time.monotonic()
        return session

    def store(self, session: Session, cache: DynamicCache) -> None:
        session.cache = cache
        session.kv_bytes = kv.nbytes(kv.to_pairs(cache))

    def close(self, handle: str) -> None:
        session = self.sessions.pop(handle, None)
        if session is None:
            raise SessionNotFound(f"session {handle[:16]} unknown or expired on {self.where}")
        session.model.users -= 1

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        stale = [h for h, s in self.sessions.items() if now - s.last_used > self.ttl_s]
        for handle in stale:
            self.close(handle)
            log.info("session %s expired after %.0f s idle", handle, self.ttl_s)
        self.expired += len(stale)
        return len(stale)

    def close_all(self) -> None:
        for handle in list(self.sessions):
            self.close(handle)
