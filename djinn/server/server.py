"""The Djinn server: one ROUTER socket, one request loop, one handler per op.

Requests are served one at a time (the device is one queue anyway). A handler
raises `DjinnError` for anything the client got wrong; the loop turns it into an
error reply and serves the next request, so one client's bad request never touches
another's session. Every reply carries the server's timings and the request's
byte counts so the client can split queue / compute / transfer.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import zmq

from djinn import host_memory, kv
from djinn.errors import BadRequest, DjinnError, LimitExceeded, TooLarge, quote
from djinn.decoding import greedy
from djinn.modes import SHIPPED_WEIGHT_PREFIX
from djinn.reproducibility import deterministic_kernels
from djinn.server.breakpoints import limit_parked, parked_room
from djinn.server.executor import Executor
from djinn.server.graphs import GraphSlots
from djinn.server.limits import ServerLimits, host_limits
from djinn.server.session_store import SessionStore
from djinn.server.weight_cache import TensorEntry, WeightCache
from djinn.transport import Codec, CodecPolicy, Incoming, Limits, Message, OutgoingTensor, ServerSocket, TensorKind
from djinn.transport.security import ServerSecurity
from djinn.transport.tuning import is_tuned
from djinn.transport.wire import DTYPES

log = logging.getLogger("djinn.server")

SERVER_VERSION = "0.1.0"
POLL_MS = 200  # how often the loop wakes to expire sessions and check for shutdown
MAX_LOGGED_CHARS = 500  # of a failed request's error, in the log
FINGERPRINT = re.compile(r"[0-9a-f]{32}")  # models.fingerprint: a 16-byte blake2b, hex


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5556
    device: str = "cpu"
    vram_budget_gb: float | None = None
    ring_buffer_gb: float | None = None  # ring of models too large for the budget (default: default_ring_bytes)
    disable_kv_swap: bool = False  # keep KV caches on the device: isolates weight streaming from KV paging
    host_swap_gb: float | None = None  # host memory for paged-out KV (default: default_host_swap_bytes)
    auth_token: str | None = None
    session_ttl_s: float = 600.0
    ipc_path: str | None = None
    decode_graphs: bool = False  # decode through CUDA-graph slots: faster, logits no longer bit-identical to eager
    graph_max_len: int = 1024  # tokens a graph slot holds (prompt + generated)
    limits: Limits | None = None  # what one message may hold (None: `host_limits` of the host memory at start)
    caps: ServerLimits = ServerLimits()  # sessions, parked forwards, uploads, config sizes
    curve_secret_key_file: str | None = None  # CURVE: the server's certificate with its secret key
    curve_client_keys: str | None = None  # CURVE: directory of the allowed clients' public keys


@dataclass(frozen=True)
class Reply:
    args: dict
    tensors: dict
    policy: CodecPolicy = CodecPolicy()


def default_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def default_host_swap_bytes() -> int:
    """Half the host memory available at start: paged KV never starves the process of RAM."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024 // 2


def default_ring_bytes(device: torch.device) -> int:
    """2 GiB on a GPU: a few 13B/70B layers in flight; 16 MiB on a CPU, a few tiny-model layers."""
    return 2 << 30 if device.type == "cuda" else 16 << 20


def _dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise BadRequest(f"unknown dtype {quote(name)}")
    return DTYPES[name]


def _arg(message: Message, name: str, kind: type | tuple):
    value = message.args.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{message.op}' needs argument '{name}' ({getattr(kind, '__name__', kind)})")
    return value


def _fingerprint(message: Message) -> str:
    """The 'model' argument: a weight fingerprint (`models.fingerprint`, 32 hex digits)."""
    value = message.args.get("model")
    if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
        raise BadRequest(f"'{message.op}' needs argument 'model', a fingerprint of 32 hex digits, got {quote(value)}")
    return value


def _registered_tensors(message: Message, limits: Limits) -> list[TensorEntry]:
    entries = _arg(message, "tensors", list)
    if len(entries) > limits.max_tensors:
        raise TooLarge(f"{len(entries)} registered tensors exceed the limit of {limits.max_tensors}")
    parsed = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[2], list) and len(entry[2]) <= limits.max_dims
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= limits.max_tensor_bytes
                        for d in entry[2])):
            raise BadRequest(f"each registered tensor must be [name, dtype, shape], got {quote(entry)}")
        parsed.append(TensorEntry(entry[0], _dtype(entry[1]), tuple(entry[2])))
    return parsed


class _RejectionLog:
    """Warnings for requests refused before they ran, at most `per_second` a second: anyone
    who reaches the port chooses how many there are (105 MB of log in 0.68 s had been one
    client's doing)."""

    def __init__(self, per_second: int = 10):
        self.per_second = per_second
        self._window = 0.0
        self._logged = self._suppressed = 0

    def warn(self, error: DjinnError) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._suppressed:
                log.warning("%d more requests rejected before they ran in the last second", self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.per_second:
            self._logged += 1
            log.warning("rejected a request before it ran (%s): %s", error.code, error)
        else:
            self._suppressed += 1


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.device = torch.device(config.device)
        budget = (int(config.vram_budget_gb * (1 << 30)) if config.vram_budget_gb is not None
                  else default_budget_bytes(self.device))
        host_swap = (int(config.host_swap_gb * (1 << 30)) if config.host_swap_gb is not None
                     else default_host_swap_bytes())
        graphs = GraphSlots(self.device, config.graph_max_len) if config.decode_graphs else None
        self.sessions = SessionStore(config.session_ttl_s, f"{config.host}:{config.port}", self.device,
                                     swap=not config.disable_kv_swap, host_limit_bytes=host_swap, graphs=graphs)
        ring = (int(config.ring_buffer_gb * (1 << 30)) if config.ring_buffer_gb is not None
                else default_ring_bytes(self.device))
        self.weights = WeightCache(self.device, budget, reserve_bytes=lambda: self.sessions.kv_bytes, ring_bytes=ring)
        self.executor = Executor(self.device, self.weights, self.sessions, budget)
        caps = config.caps
        self.weights.limits = caps
        self.sessions.max_sessions, self.sessions.max_sessions_per_peer = caps.max_sessions, caps.max_sessions_per_peer
        limit_parked(caps.parked)
        # Told apart by `hello`: a client that reconnected knows when the server is another process.
        self.instance = secrets.token_hex(8)
        limits = config.limits if config.limits is not None else host_limits(host_memory.available_bytes())
        security = ServerSecurity(config.auth_token, _path(config.curve_secret_key_file),
                                  _path(config.curve_client_keys))
        # The ZAP handler serves one context: a context of this server's own, so that two
        # servers in one process (tests) each check their own credentials.
        self._context = zmq.Context()
        self._authenticator = security.authenticator(self._context)
        self.handlers: dict[str, Callable[[Incoming], Reply]] = {
            "hello": self.hello, "stats": self.stats, "register_model": self.register_model,
            "upload_weights": self.upload_weights, "forward": self.forward, "open_session": self.open_session,
            "prefill": self.step, "decode": self.step, "close_session": self.close_session,
            "run_to_layer": self.run_to_layer, "resume": self.resume, "cancel": self.cancel,
            "offload": self.offload, "session_stats": self.session_stats,
        }
        # Received frames are pageable; on a GPU, activations land in pinned memory instead.
        landing = self.executor.landing if self.device.type == "cuda" else None
        addresses = [f"tcp://{config.host}:{config.port}", *([f"ipc://{config.ipc_path}"] if config.ipc_path else [])]
        self.sockets = [ServerSocket(address, self.handlers, limits=limits, auth_token=config.auth_token,
                                     context=self._context, landing=landing, security=security,
                                     queued_replies=caps.queued_replies_per_peer) for address in addresses]
        # With tcp and ipc both open, one poll waits on both: waiting on each in turn would
        # leave a request on one socket until the other's wait ran out.
        self._poller = zmq.Poller()
        for sock in self.sockets:
            self._poller.register(sock.zmq_socket, zmq.POLLIN)
        self.requests_served = 0
        self._stopping = False
        self._rejections = _RejectionLog()

    @property
    def address(self) -> str:
        return self.sockets[0].address

    def stop(self) -> None:
        self._stopping = True

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                self.serve_once(POLL_MS)
        finally:
            self.close()

    def close(self) -> None:
        self.sessions.close_all()
        for sock in self.sockets:
            sock.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def serve_once(self, timeout_ms: int) -> None:
        """One turn of the loop. Nothing a request does ends it: every failure below is
        answered (or, between requests, logged) and the loop goes on."""
        try:
            self.sessions.expire()
            self.weights.expire_uploads()
        except Exception:
            log.exception("expiring idle sessions and uploads failed")
        if len(self.sockets) == 1:  # the receive waits itself: no poll call per request
            ready, wait_ms = self.sockets, timeout_ms
        else:
            polled = dict(self._poller.poll(timeout_ms))
            ready, wait_ms = [s for s in self.sockets if s.zmq_socket in polled], 0
        for sock in ready:
            incoming = sock.receive(wait_ms)
            if incoming is not None:
                self._handle(sock, incoming)

    def _handle(self, sock: ServerSocket, incoming: Incoming) -> None:
        if incoming.error is not None:
            self._rejections.warn(incoming.error)
            sock.reply_error(incoming.peer, incoming.request_id, incoming.error)
            return
        message = incoming.message
        started = time.perf_counter()
        try:
            reply = self.handlers[message.op](incoming)
            self.executor.synchronize()
            finished = time.perf_counter()
            timings = {"queue_ms": (started - incoming.received_at) * 1e3, "compute_ms": (finished - started) * 1e3,
                       "request_payload_bytes": message.payload_bytes,
                       "request_framing_bytes": message.framing_bytes}
            sock.reply(incoming.peer, incoming.request_id, {**reply.args, "server": timings}, reply.tensors,
                       reply.policy)
        except DjinnError as err:
            log.info("%s failed: %s", message.op, str(err)[:MAX_LOGGED_CHARS])
            sock.reply_error(incoming.peer, incoming.request_id, err)
            return
        except Exception as exc:  # a bug must not take the server down
            log.exception("%s raised", message.op)
            sock.reply_error(incoming.peer, incoming.request_id,
                             DjinnError(f"{message.op} failed on the server: {type(exc).__name__} {quote(str(exc), 300)}"))
            return
        self.requests_served += 1

    # -- ops -----------------------------------------------------------------------
    def hello(self, incoming: Incoming) -> Reply:
        return Reply({"version": SERVER_VERSION, "instance": self.instance, "device": str(self.device),
                      "malloc_tuned": is_tuned(os.environ),
                      "deterministic_kernels": deterministic_kernels(),
                      "budget_bytes": self.executor.budget_bytes, "ops": sorted(self.handlers)}, {})

    def stats(self, incoming: Incoming) -> Reply:
        counters = self.weights.counters
        memory = {"weights_bytes": self.weights.resident_bytes, "kv_bytes": self.sessions.kv_bytes,
                  "kv_host_bytes": self.sessions.host_bytes, "budget_bytes": self.executor.budget_bytes}
        if self.device.type == "cuda":
            memory["device_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            memory["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        # A client sees the models it registered and its own sessions; memory, cache and paging
        # figures are the server's totals (no fingerprint or handle of another client).
        peer = incoming.peer
        return Reply({
            "memory": memory,
            "sessions": self.sessions.owned_by(peer), "sessions_expired": self.sessions.expired,
            "models": [{"fingerprint": m.fingerprint, "bytes": m.weight_bytes, "complete": m.complete,
                        "sessions": m.users - (not m.complete), "streamed": m.streamed,
                        "device_bytes": m.device_bytes, "ring_bytes": m.ring_bytes, "stream": m.stream_stats()}
                       for m in self.weights.models.values() if peer in m.peers],
            "cache": {"hits": counters.hits, "misses": counters.misses, "evictions": counters.evictions,
                      "uploaded_bytes": counters.uploaded_bytes},
            "paging": self.sessions.summary(),
            "requests_served": self.requests_served,
        }, {})

    def register_model(self, incoming: Incoming) -> Reply:
        message = incoming.message
        fingerprint = _fingerprint(message)
        entries = _registered_tensors(message, self.sockets[0].limits)
        cached = self.weights.register(fingerprint, _arg(message, "config", dict), _dtype(message.args.get("dtype")),
                                       entries, peer=incoming.peer)
        return Reply({"complete": cached.complete, "missing": cached.missing}, {})

    def upload_weights(self, incoming: Incoming) -> Reply:
        message = incoming.message
        slices = message.args.get("slices", {})
        if not isinstance(slices, dict) or not all(isinstance(n, str) and n in message.tensors for n in slices):
            raise BadRequest("'slices' must map names of this message's tensors to their first row")
        cached = self.weights.receive(_fingerprint(message), message.tensors, slices)
        return Reply({"complete": cached.complete, "missing_count": len(cached.missing)}, {})

    def forward(self, incoming: Incoming) -> Reply:
        """Stateless: KV comes in and goes out; weights are shipped or cached."""
        message = incoming.message
        weights = {n.removeprefix(SHIPPED_WEIGHT_PREFIX): t for n, t in message.tensors.items()
                   if n.startswith(SHIPPED_WEIGHT_PREFIX)}
        if weights:
            model, config = self.executor.skeleton(_arg(message, "config", dict), _dtype(message.args.get("dtype")))
        else:
            cached = self.weights.get(_fingerprint(message))
            model, config = cached.model, cached.config
        pairs = [(message.tensors[k], message.tensors[v]) for k, v in kv.wire_names(config.num_hidden_layers)
                 if k in message.tensors and v in message.tensors]
        self.executor.check_kv(pairs, config)
        logits, pairs = self.executor.stateless_step(model, weights, config, message.tensors.get("input_ids"), pairs)
        tensors = {"logits": OutgoingTensor(logits, TensorKind.LOGITS)}
        for (kname, vname), (k, v) in zip(kv.wire_names(len(pairs)), pairs):
            tensors[kname] = OutgoingTensor(k, TensorKind.KV)
            tensors[vname] = OutgoingTensor(v, TensorKind.KV)
        return Reply({}, tensors)

    def open_session(self, incoming: Incoming) -> Reply:
        cached = self.weights.get(_fingerprint(incoming.message))
        session = self.sessions.open(cached, incoming.peer)
        return Reply({"session": session.handle}, {})

    def step(self, incoming: Incoming) -> Reply:
        """prefill and decode: the KV stays in the session; the token or the logits come back."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        self.executor.not_parked(session)
        if (message.op == "prefill") != (session.length == 0):
            raise BadRequest(f"'{message.op}' on session {session.handle} holding {session.length} tokens: "
                             f"prefill starts a session, decode continues it")
        logits = self.executor.session_step(session, message.tensors.get("input_ids"))
        return self._logits_reply(message, logits, {"length": session.length,
                                                    "io_wait_ms": session.last_io_wait_ms})

    def _logits_reply(self, message: Message, logits: torch.Tensor, args: dict) -> Reply:
        returns = message.args.get("returns", "logits")
        if returns == "token":
            tensors = {"token": OutgoingTensor(greedy(logits), TensorKind.TOKEN_IDS)}
            if message.args.get("with_logits"):
                tensors["logits"] = OutgoingTensor(logits, TensorKind.LOGITS)
        elif returns == "logits":
            tensors = {"logits": OutgoingTensor(logits, TensorKind.LOGITS)}
        else:
            raise BadRequest(f"'returns' must be 'token' or 'logits', got {returns!r}")
        codec = message.args.get("logits_codec", Codec.RAW.value)
        try:
            policy = CodecPolicy({TensorKind.LOGITS: Codec(codec)})
        except ValueError:
            raise BadRequest(f"unknown logits codec {codec!r}") from None
        return Reply(args, tensors, policy)

    # -- breakpoints and paging ------------------------------------------------------
    def run_to_layer(self, incoming: Incoming) -> Reply:
        """A step parked after decoder layer N: only its activation comes back; the KV stays."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        layer = _arg(message, "layer", int)
        if parked_room() == 0:  # refused before the step touches the session
            raise LimitExceeded(f"{self.config.caps.parked} forwards are parked at breakpoints, the cap: "
                                f"resume or cancel one first")
        activation = self.executor.run_to_layer(session, message.tensors.get("input_ids"), layer)
        return Reply({"layer": layer, "io_wait_ms": session.last_io_wait_ms},
                     {"activation": OutgoingTensor(activation, TensorKind.ACTIVATION)})

    def resume(self, incoming: Incoming) -> Reply:
        """The parked step continues from layer N+1 with the client's activation; the logits come back."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        logits = self.executor.resume(session, message.tensors.get("activation"))
        return self._logits_reply(message, logits, {"length": session.length, "io_wait_ms": session.last_io_wait_ms})

    def cancel(self, incoming: Incoming) -> Reply:
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        self.executor.cancel(session)
        return Reply({"length": session.length}, {})

    def offload(self, incoming: Incoming) -> Reply:
        """Page a session's KV to host now (it comes back on its next request)."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        return Reply({"bytes": self.executor.offload(session)}, {})

    def session_stats(self, incoming: Incoming) -> Reply:
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message), touch=False)
        return Reply(session.summary(), {})

    def close_session(self, incoming: Incoming) -> Reply:
        handle = incoming.message.args.get("session")
        if not isinstance(handle, str):
            raise BadRequest("'close_session' needs argument 'session'")
        self.sessions.close(handle)
        return Reply({}, {})
