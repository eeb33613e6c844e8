"""A pool of Djinn servers behind the interface of one server's connection.

`PoolConnection` holds one `ClientConnection` per server and sends each request where it
belongs, so `Client`, `RemoteModel` and `RemoteSession` drive a pool exactly as they drive one
server: a model's register and upload go to the servers that hold it (`placement`), a session
opens on the least-loaded of those and every later request of it goes to that server (its KV
cache lives there alone), `hello` and `stats` ask every server and add up. The tensors travel
from this process straight to the server that computes on them.

A server that goes away (it exited, was killed, restarted) fails its own sessions with
`SessionLost`, naming the session and the server, at once for every later request of theirs;
the other servers and their sessions go on, and new sessions are placed on the live servers.
The pool looks for a lost server again at most every `REPROBE_S` when placing: a static
member answering again (restarted: none of its sessions or uploaded models) takes new
sessions; a Ray pool's restarted server, at a new address, joins the pool.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from djinn.errors import (BadRequest, DjinnError, DjinnTimeout, ModelNotFound, ServerLost, ServerRestarted,
                          SessionLost, SessionNotFound, Unauthenticated, quote)
from djinn.pool.directory import Directory
from djinn.pool.placement import PlacementPolicy, least_loaded, model_holders
from djinn.transport import REPLY_OP, ByteCounters, ClientConnection, Header, Message
from djinn.transport.security import ClientSecurity

log = logging.getLogger("djinn.pool")

# The requests of a session: they go to the server that opened it, and to no other.
SESSION_OPS = frozenset({"prefill", "decode", "run_to_layer", "resume", "cancel", "offload", "session_stats",
                         "close_session"})
REPROBE_S = 2.0  # how often placement looks for lost servers again (each look costs a hello each)
PROBE_TIMEOUT_S = 0.5  # a lost server's hello: a dead address costs a placement this much
# `stats` figures added up over the servers (dicts key by key); each server's own are under "servers"
ADDED_STATS = ("sessions", "sessions_expired", "sessions_open", "requests_served", "memory", "paging", "cache")


@dataclass
class Member:
    """One server of the pool and this client's connection to it."""
    address: str
    connection: ClientConnection
    instance: str | None  # the server process that answered `hello`; None while lost
    lost: DjinnError | None = None  # why it was last seen gone
    retired: bool = False  # no longer in the pool's directory: never probed again

    @property
    def live(self) -> bool:
        return self.instance is not None


@dataclass
class Holding:
    """A model on one server, as this client registered or attached it there."""
    instance: str  # the server process it was registered with: a restarted one holds nothing
    missing: set[str] = field(default_factory=set)  # tensors still to upload there


@dataclass(frozen=True)
class SessionHome:
    address: str
    instance: str


def _reply(args: Mapping[str, Any]) -> Message:
    """A reply the pool makes itself from its servers' replies (no tensors)."""
    return Message(Header(REPLY_OP, 0, args=dict(args)), {}, 0, 0)


def _added(values: list) -> Any:
    """Numbers added up over the servers (flags: whether all are set), dicts key by key, the rest per server."""
    if all(isinstance(v, bool) for v in values):
        return all(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        return {k: _added([v[k] for v in values if k in v]) for k in dict.fromkeys(k for v in values for k in v)}
    return values if len({repr(v) for v in values}) > 1 else values[0]


class PoolConnection:
    """`ClientConnection`'s interface (`request`, `counters`, `hello`, `reconnect`, ...) over a pool."""

    def __init__(self, directory: Directory, *, timeout_s: float, auth_token: str | None = None,
                 security: ClientSecurity | None = None, placement: PlacementPolicy = PlacementPolicy()):
        self.directory = directory
        self.timeout_s = timeout_s
        self.placement = placement
        self.counters = ByteCounters()  # every member's connection counts into it: the bytes of the pool
        self._auth_token = auth_token
        self._security = security
        self.members: dict[str, Member] = {}
        self._holdings: dict[str, dict[str, Holding]] = {}  # fingerprint -> address -> holding
        self._attached: dict[str, str] = {}  # a server-loaded model's name -> its fingerprint
        self._sessions: dict[str, SessionHome] = {}
        self._rng = random.Random()
        self._turn = itertools.count()  # stateless forwards go round the model's servers
        self._probed_at = time.monotonic()

    # -- the interface of one server's connection ------------------------------------
    @property
    def server_instance(self) -> str | None:
        """The live servers' instances, joined: it changes when any of them restarted."""
        return ",".join(m.instance for m in self.members.values() if m.live) or None

    def confirm(self, hello_timeout_s: float) -> dict:
        """Connect to every server of the pool, each confirmed as `ClientConnection.confirm` does.

        A server that does not answer is lost from the start (logged, listed in `stats()["lost"]`,
        looked for again when placing); only a pool none of whose servers answers fails here, and
        credentials a server refuses fail at once, as they would against every server."""
        addresses = self.directory.addresses()
        if not addresses:
            raise DjinnTimeout(f"{self.directory.describe()} has no server")
        first_error = None
        for address in addresses:
            try:
                self._join(address, hello_timeout_s)
            except Unauthenticated:
                self.close()
                raise
            except DjinnError as exc:
                first_error = first_error or exc
        if not any(m.live for m in self.members.values()):
            self.close()
            raise first_error
        return self.hello(self.timeout_s)

    def hello(self, timeout_s: float) -> dict:
        replies = self._each([m.address for m in self._live()], "hello", {}, None, timeout_s=timeout_s)
        first = next(iter(replies.values())).args
        models = {(m["name"], m["fingerprint"]): m for r in replies.values() for m in r.args.get("models", [])}
        return {**first, "instance": self.server_instance, "models": list(models.values()),
                "budget_bytes": sum(r.args.get("budget_bytes") or 0 for r in replies.values()),
                "pool": [{"address": a, **r.args} for a, r in replies.items()]}

    def reconnect(self, timeout_s: float) -> dict:
        """Every server confirmed again (a lost one that answers is live again); the pool's `hello`."""
        self._probe(timeout_s, force=True)
        return self.hello(timeout_s)

    def request(self, op: str, args: Mapping[str, Any] | None = None, tensors: Mapping[str, Any] | None = None, *,
                timeout_s: float | None = None, policy=None) -> Message:
        args = dict(args or {})
        kwargs = {"timeout_s": timeout_s, "policy": policy}
        if op in SESSION_OPS:
            return self._session_request(op, args, tensors, kwargs)
        route = {"hello": lambda: _reply(self.hello(timeout_s or self.timeout_s)), "stats": self._stats,
                 "register_model": lambda: self._register(args, tensors, kwargs),
                 "upload_weights": lambda: self._upload(args, tensors, kwargs),
                 "attach": lambda: self._attach(args, kwargs), "open_session": lambda: self._open(args, kwargs),
                 "forward": lambda: self._forward(args, tensors, kwargs)}.get(op)
        if route is not None:
            return route()
        # An op the pool does not route: any server answers it (an unknown op, with its error).
        return self._member_request(self._live()[0], op, args, tensors, kwargs)

    def close(self) -> None:
        for member in self.members.values():
            member.connection.close()

    def __enter__(self) -> "PoolConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- where things are --------------------------------------------------------------
    def session_address(self, handle: str) -> str:
        """The server (host:port) that holds a session this connection opened."""
        home = self._sessions.get(handle)
        if home is None:
            raise SessionNotFound(f"session {quote(handle)} was not opened through this connection to "
                                  f"{self.directory.describe()}")
        return home.address

    def model_addresses(self, fingerprint: str) -> list[str]:
        """The live servers that hold a model for this connection."""
        return [a for a, h in self._holdings.get(fingerprint, {}).items() if self._holds(a, h)]

    # -- members -----------------------------------------------------------------------
    def _join(self, address: str, hello_timeout_s: float) -> Member:
        """A member for `address`, live once its server is confirmed (else lost, the error raised)."""
        connection = ClientConnection(address, timeout_s=self.timeout_s, auth_token=self._auth_token,
                                      security=self._security, counters=self.counters)
        member = self.members[address] = Member(address, connection, None)
        try:
            connection.confirm(hello_timeout_s)
        except DjinnError as exc:
            self._lose(member, exc)
            raise
        member.instance = connection.server_instance
        self._attach_named(member)
        return member

    def _live(self) -> list[Member]:
        self._probe(PROBE_TIMEOUT_S)
        live = [m for m in self.members.values() if m.live]
        if not live:
            lost = "; ".join(f"{m.address}: {m.lost}" for m in self.members.values())
            raise ServerLost(f"no server of {self.directory.describe()} answers ({lost})")
        return live

    def _probe(self, timeout_s: float, force: bool = False) -> None:
        """Look for lost servers again (at most every REPROBE_S unless forced), and for new ones."""
        lost = [m for m in self.members.values() if not m.live and not m.retired]
        if not force and (not lost or time.monotonic() - self._probed_at < REPROBE_S):
            return
        self._probed_at = time.monotonic()
        try:
            current = self.directory.addresses()
        except Exception as exc:  # a directory that cannot answer now: keep the members known
            log.warning("the pool's directory did not answer: %s", exc)
            current = list(self.members)
        for member in self.members.values():
            member.retired = member.address not in current
            if member.retired or (member.live and not force):
                continue
            try:
                member.instance = member.connection.reconnect(timeout_s).get("instance")
                member.lost = None
                self._attach_named(member)
            except DjinnError as exc:
                self._lose(member, exc)
        for address in current:
            if address not in self.members:
                try:
                    self._join(address, timeout_s)
                except DjinnError:
                    continue  # a member, lost until it answers (logged)

    def _lose(self, member: Member, error: DjinnError) -> None:
        if member.live or member.lost is None:
            log.warning("server %s of %s is gone: %s", member.address, self.directory.describe(), error)
        member.instance, member.lost = None, error

    def _attach_named(self, member: Member) -> None:
        """Server-loaded models this client attached to, found on a server that joined or restarted."""
        for name in self._attached:
            try:
                self._attach_one(member, name, {})
            except ModelNotFound:
                continue

    def _member_request(self, member: Member, op: str, args: dict, tensors, kwargs: dict) -> Message:
        try:
            return member.connection.request(op, args, tensors, **kwargs)
        except ServerLost as exc:
            self._lose(member, exc)
            raise

    def _each(self, addresses: list[str], op: str, args: dict, tensors, **kwargs) -> dict[str, Message]:
        """The replies of those of `addresses` that answer; the first loss if none does. An error
        reply (a bad argument is bad on every server) is raised as it is."""
        replies, first_loss = {}, None
        for address in addresses:
            try:
                replies[address] = self._member_request(self.members[address], op, args, tensors, kwargs)
            except (ServerLost, DjinnTimeout) as exc:
                if isinstance(exc, DjinnTimeout):
                    self._lose(self.members[address], exc)
                first_loss = first_loss or exc
        if not replies:
            raise first_loss or ServerLost(f"no server of {self.directory.describe()} to send '{op}' to")
        return replies

    def _holds(self, address: str, holding: Holding) -> bool:
        member = self.members.get(address)
        return member is not None and member.instance == holding.instance

    # -- routed ops --------------------------------------------------------------------
    def _stats(self) -> Message:
        replies = self._each([m.address for m in self._live()], "stats", {}, None)
        per_server = [{"address": a, **r.args} for a, r in replies.items()]
        models: dict[str, dict] = {}
        for server in per_server:
            for model in server.get("models", []):
                entry = models.setdefault(model["fingerprint"], {**model, "sessions": 0, "servers": []})
                entry["sessions"] += model.get("sessions", 0)
                entry["servers"].append(server["address"])
        added = {k: _added([s[k] for s in per_server if k in s]) for k in ADDED_STATS}
        return _reply({**added, "models": list(models.values()), "servers": per_server,
                       "lost": [{"address": m.address, "error": str(m.lost)} for m in self.members.values()
                                if not m.live]})

    def _fingerprint(self, op: str, args: dict) -> str:
        fingerprint = args.get("model")
        if not isinstance(fingerprint, str):
            raise BadRequest(f"'{op}' needs argument 'model', a fingerprint, got {quote(fingerprint)}")
        return fingerprint

    def _register(self, args: dict, tensors, kwargs: dict) -> Message:
        fingerprint = self._fingerprint("register_model", args)
        targets = model_holders(fingerprint, [m.address for m in self._live()], self.placement.replicas)
        replies = self._each(targets, "register_model", args, tensors, **kwargs)
        self._holdings[fingerprint] = {
            a: Holding(self.members[a].instance, set(r.args["missing"])) for a, r in replies.items()}
        missing = dict.fromkeys(n for r in replies.values() for n in r.args["missing"])
        return _reply({"complete": all(r.args["complete"] for r in replies.values()), "missing": list(missing)})

    def _upload(self, args: dict, tensors, kwargs: dict) -> Message:
        """A chunk goes to each server that lacks some of its tensors, with those tensors only."""
        fingerprint = self._fingerprint("upload_weights", args)
        holdings = {a: h for a, h in self._holdings.get(fingerprint, {}).items() if self._holds(a, h)}
        if not holdings:
            raise ModelNotFound(f"model {fingerprint} is registered on no live server of "
                                f"{self.directory.describe()}: register it first")
        tensors = dict(tensors or {})
        slices = args.get("slices", {})
        for address, holding in holdings.items():
            mine = {n: t for n, t in tensors.items() if n in holding.missing}
            if not mine:
                continue
            sent = {**args, "slices": {n: s for n, s in slices.items() if n in mine}} if slices else args
            reply = self._member_request(self.members[address], "upload_weights", sent, mine, kwargs)
            if reply.args.get("complete"):
                holding.missing.clear()
        return _reply({"complete": not any(h.missing for h in holdings.values()),
                       "missing_count": len(set().union(*(h.missing for h in holdings.values())))})

    def _attach(self, args: dict, kwargs: dict) -> Message:
        name = args.get("name")
        found = {}
        for member in self._live():
            try:
                found[member.address] = self._attach_one(member, name, kwargs)
            except ModelNotFound:
                continue
            except (ServerLost, DjinnTimeout):
                continue
        if not found:
            raise ModelNotFound(f"no server of {self.directory.describe()} has a model named {quote(name)}")
        by_fingerprint: dict[str, list[str]] = {}
        for address, reply in found.items():
            by_fingerprint.setdefault(reply.args["model"], []).append(address)
        if len(by_fingerprint) > 1:
            raise BadRequest(f"the servers of {self.directory.describe()} hold different weights under the name "
                             f"{quote(name)}: {by_fingerprint}")
        (fingerprint,) = by_fingerprint
        self._attached[name] = fingerprint
        return next(iter(found.values()))

    def _attach_one(self, member: Member, name: object, kwargs: dict) -> Message:
        reply = self._member_request(member, "attach", {"name": name}, None, kwargs)
        fingerprint = reply.args["model"]
        self._holdings.setdefault(fingerprint, {})[member.address] = Holding(member.instance)
        return reply

    def _candidates(self, fingerprint: str) -> list[str]:
        """The live servers holding the model for this client; else those the policy would have put it
        on (a model another client of the pool uploaded, whose fingerprint this one was given)."""
        live = [m.address for m in self._live()]
        held = [a for a in self.model_addresses(fingerprint) if a in live]
        if held:
            return held
        if fingerprint in self._holdings:
            gone = ", ".join(self._holdings[fingerprint])
            raise ModelNotFound(f"model {fingerprint} was on {gone} of {self.directory.describe()}, which are gone "
                                f"or restarted: load the model again to upload it to the live servers")
        return model_holders(fingerprint, live, self.placement.replicas)

    def _open(self, args: dict, kwargs: dict) -> Message:
        """On the least-loaded server holding the model: the one with the fewest open sessions."""
        candidates = self._candidates(self._fingerprint("open_session", args))
        while candidates:
            loads = {a: r.args.get("sessions_open", 0) for a, r in self._each(candidates, "stats", {}, None).items()}
            address = least_loaded(loads, self._rng)
            member = self.members[address]
            try:
                reply = self._member_request(member, "open_session", args, None, kwargs)
            except (ServerLost, DjinnTimeout):
                candidates = [a for a in loads if a != address]
                continue
            self._sessions[reply.args["session"]] = SessionHome(address, member.instance)
            return reply
        raise ServerLost(f"no live server of {self.directory.describe()} could open a session")

    def _forward(self, args: dict, tensors, kwargs: dict) -> Message:
        """Stateless: the KV travels with the request, so any server holding the model serves it, in turn."""
        fingerprint = args.get("model")
        addresses = self._candidates(fingerprint) if isinstance(fingerprint, str) else [m.address for m in self._live()]
        member = self.members[addresses[next(self._turn) % len(addresses)]]
        return self._member_request(member, "forward", args, tensors, kwargs)

    def _session_request(self, op: str, args: dict, tensors, kwargs: dict) -> Message:
        handle = args.get("session")
        if not isinstance(handle, str):
            raise BadRequest(f"'{op}' needs argument 'session', a session handle, got {quote(handle)}")
        home = self._sessions.get(handle)
        if home is None:
            raise SessionNotFound(f"session {quote(handle)} was not opened through this connection to "
                                  f"{self.directory.describe()}")
        member = self.members[home.address]
        if member.instance != home.instance:
            return self._session_gone(op, handle, home, member.lost or "the server restarted since")
        try:
            reply = member.connection.request(op, args, tensors, **kwargs)
        except (ServerLost, ServerRestarted) as exc:
            if isinstance(exc, ServerLost):
                self._lose(member, exc)
            else:
                member.instance = member.connection.server_instance
            return self._session_gone(op, handle, home, exc)
        if op == "close_session":
            del self._sessions[handle]
        return reply

    def _session_gone(self, op: str, handle: str, home: SessionHome, why: object) -> Message:
        """A session whose server is gone fails, every time, saying so; closing it only forgets it (it is
        closed already), so a `with` block's exit does not hide the error that ended it."""
        if op == "close_session":
            del self._sessions[handle]
            return _reply({})
        raise SessionLost(f"session {handle[:16]} lived on server {home.address} of {self.directory.describe()}, "
                          f"which is gone ({why}): its KV cache is lost with it; '{op}' cannot run. The other "
                          f"servers go on; a new session is placed on a live one")
