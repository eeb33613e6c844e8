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
import time
from dataclasses import dataclass
from typing import Callable

import torch
import zmq

from djinn import kv
from djinn.errors import BadRequest, DjinnError
from djinn.decoding import greedy
from djinn.modes import SHIPPED_WEIGHT_PREFIX
from djinn.reproducibility import deterministic_kernels
from djinn.server.executor import Executor
from djinn.server.graphs import GraphSlots
from djinn.server.session_store import SessionStore
from djinn.server.weight_cache import TensorEntry, WeightCache
from djinn.transport import Codec, CodecPolicy, Incoming, Limits, Message, OutgoingTensor, ServerSocket, TensorKind
from djinn.transport.tuning import is_tuned
from djinn.transport.wire import DTYPES

log = logging.getLogger("djinn.server")

SERVER_VERSION = "0.1.0"
POLL_MS = 200  # how often the loop wakes to expire sessions and check for shutdown
# Test-only: a planted slowdown of every session step (prefill, decode), in ms, read once at
# import. It exists to show that djinn-compare catches a regression (benchmarks/compare.py);
# unset, it costs one comparison per step.
TEST_STEP_SLEEP_S = float(os.environ.get("DJINN_TEST_STEP_SLEEP_MS", "0")) / 1e3


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
    limits: Limits = Limits()


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
    if name not in DTYPES:
        raise BadRequest(f"unknown dtype {name!r}")
    return DTYPES[name]


def _arg(message: Message, name: str, kind: type | tuple):
    value = message.args.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{message.op}' needs argument '{name}' ({getattr(kind, '__name__', kind)})")
    return value


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
        self.handlers: dict[str, Callable[[Incoming], Reply]] = {
            "hello": self.hello, "stats": self.stats, "register_model": self.register_model,
            "upload_weights": self.upload_weights, "forward": self.forward, "open_session": self.open_session,
            "prefill": self.step, "decode": self.step, "close_session": self.close_session,
            "run_to_layer": self.run_to_layer, "resume": self.resume, "cancel": self.cancel,
            "offload": self.offload, "session_stats": self.session_stats,
        }
        # Received frames are pageable; on a GPU, activations land in pinned memory instead.
        landing = self.executor.landing if self.device.type == "cuda" else None
        self.sockets = [ServerSocket(f"tcp://{config.host}:{config.port}", self.handlers, limits=config.limits,
                                     auth_token=config.auth_token, landing=landing)]
        if config.ipc_path:
            self.sockets.append(ServerSocket(f"ipc://{config.ipc_path}", self.handlers, limits=config.limits,
                                             auth_token=config.auth_token, landing=landing))
        # With tcp and ipc both open, one poll waits on both: waiting on each in turn would
        # leave a request on one socket until the other's wait ran out.
        self._poller = zmq.Poller()
        for sock in self.sockets:
            self._poller.register(sock.zmq_socket, zmq.POLLIN)
        self.requests_served = 0
        self._stopping = False

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
            self.sessions.close_all()
            for sock in self.sockets:
                sock.close()

    def serve_once(self, timeout_ms: int) -> None:
        self.sessions.expire()
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
            log.warning("rejected a request before it ran (%s): %s", incoming.error.code, incoming.error)
            sock.reply_error(incoming.peer, incoming.request_id, incoming.error)
            return
        message = incoming.message
        started = time.perf_counter()
        try:
            reply = self.handlers[message.op](incoming)
            self.executor.synchronize()
        except DjinnError as err:
            log.info("%s failed: %s", message.op, err)
            sock.reply_error(incoming.peer, incoming.request_id, err)
            return
        except Exception as exc:  # a bug must not take the server down
            log.exception("%s raised", message.op)
            sock.reply_error(incoming.peer, incoming.request_id, DjinnError(f"{message.op} failed on the server: {exc!r}"))
            return
        finished = time.perf_counter()
        timings = {"queue_ms": (started - incoming.received_at) * 1e3, "compute_ms": (finished - started) * 1e3,
                   "request_payload_bytes": message.payload_bytes, "request_framing_bytes": message.framing_bytes}
        sock.reply(incoming.peer, incoming.request_id, {**reply.args, "server": timings}, reply.tensors, reply.policy)
        self.requests_served += 1

    # -- ops -----------------------------------------------------------------------
    def hello(self, incoming: Incoming) -> Reply:
        return Reply({"version": SERVER_VERSION, "device": str(self.device), "malloc_tuned": is_tuned(os.environ),
                      "deterministic_kernels": deterministic_kernels(),
                      "budget_bytes": self.executor.budget_bytes, "ops": sorted(self.handlers)}, {})

    def stats(self, incoming: Incoming) -> Reply:
        counters = self.weights.counters
        memory = {"weights_bytes": self.weights.resident_bytes, "kv_bytes": self.sessions.kv_bytes,
                  "kv_host_bytes": self.sessions.host_bytes, "budget_bytes": self.executor.budget_bytes}
        if self.device.type == "cuda":
            memory["device_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            memory["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return Reply({
            "memory": memory,
            "sessions": len(self.sessions.sessions), "sessions_expired": self.sessions.expired,
            "models": [{"fingerprint": m.fingerprint, "bytes": m.weight_bytes, "complete": m.complete,
                        "sessions": m.users, "streamed": m.streamed, "device_bytes": m.device_bytes,
                        "ring_bytes": m.ring_bytes, "stream": m.stream_stats()} for m in self.weights.models.values()],
            "cache": {"hits": counters.hits, "misses": counters.misses, "evictions": counters.evictions,
                      "uploaded_bytes": counters.uploaded_bytes},
            "paging": self.sessions.summary(),
            "requests_served": self.requests_served,
        }, {})

    def register_model(self, incoming: Incoming) -> Reply:
        message = incoming.message
        fingerprint = _arg(message, "model", str)
        entries = []
        for entry in _arg(message, "tensors", list):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[2], list)):
                raise BadRequest("each registered tensor must be [name, dtype, shape]")
            entries.append(TensorEntry(entry[0], _dtype(entry[1]), tuple(entry[2])))
        cached = self.weights.register(fingerprint, _arg(message, "config", dict), _dtype(message.args.get("dtype")),
                                       entries)
        return Reply({"complete": cached.complete, "missing": cached.missing}, {})

    def upload_weights(self, incoming: Incoming) -> Reply:
        message = incoming.message
        cached = self.weights.receive(_arg(message, "model", str), message.tensors)
        return Reply({"complete": cached.complete, "missing_count": len(cached.missing)}, {})

    def forward(self, incoming: Incoming) -> Reply:
        """Stateless: KV comes in and goes out; weights are shipped or cached."""
        message = incoming.message
        weights = {n.removeprefix(SHIPPED_WEIGHT_PREFIX): t for n, t in message.tensors.items()
                   if n.startswith(SHIPPED_WEIGHT_PREFIX)}
        if weights:
            model, config = self.executor.skeleton(_arg(message, "config", dict), _dtype(message.args.get("dtype")))
        else:
            cached = self.weights.get(_arg(message, "model", str))
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
        cached = self.weights.get(_arg(incoming.message, "model", str))
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
        if TEST_STEP_SLEEP_S:
            time.sleep(TEST_STEP_SLEEP_S)
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
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        layer = _arg(message, "layer", int)
        activation = self.executor.run_to_layer(session, message.tensors.get("input_ids"), layer)
        return Reply({"layer": layer, "io_wait_ms": session.last_io_wait_ms},
                     {"activation": OutgoingTensor(activation, TensorKind.ACTIVATION)})

    def resume(self, incoming: Incoming) -> Reply:
        """The parked step continues from layer N+1 with the client's activation; the logits come back."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        logits = self.executor.resume(session, message.tensors.get("activation"))
        return self._logits_reply(message, logits, {"length": session.length, "io_wait_ms": session.last_io_wait_ms})

    def cancel(self, incoming: Incoming) -> Reply:
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        self.executor.cancel(session)
        return Reply({"length": session.length}, {})

    def offload(self, incoming: Incoming) -> Reply:
        """Page a session's KV to host now (it comes back on its next request)."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        return Reply({"bytes": self.executor.offload(session)}, {})

    def session_stats(self, incoming: Incoming) -> Reply:
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"), touch=False)
        return Reply(session.summary(), {})

    def close_session(self, incoming: Incoming) -> Reply:
        handle = incoming.message.args.get("session")
        if not isinstance(handle, str):
            raise BadRequest("'close_session' needs argument 'session'")
        self.sessions.close(handle)
        return Reply({}, {})
