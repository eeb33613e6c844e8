"""The Djinn server: one ROUTER socket, one request loop, one handler per op.

Requests are served one at a time (the device is one queue anyway). A handler
raises `DjinnError` for anything the client got wrong; the loop turns it into an
error reply and serves the next request, so one client's bad request never touches
another's session. Every reply carries the server's timings and the request's
byte counts so the client can split queue / compute / transfer.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import zmq

import djinn
from djinn import kv, models
from djinn.decoding import Padding
from djinn.errors import BadRequest, DjinnError
from djinn.modes import SHIPPED_WEIGHT_PREFIX
from djinn.reproducibility import deterministic_kernels
from djinn.sampling import Sampler
from djinn.server.executor import Executor
from djinn.server.graphs import GraphSlots
from djinn.server.session_store import Session, SessionStore
from djinn.server.step_options import StepOptions, stateless_padding
from djinn.server.weight_cache import TensorEntry, WeightCache
from djinn.transport import CodecPolicy, Incoming, Limits, Message, OutgoingTensor, ServerSocket, TensorKind
from djinn.transport.tuning import is_tuned
from djinn.transport.wire import DTYPE_NAMES, DTYPES

log = logging.getLogger("djinn.server")

POLL_MS = 200  # how often the loop wakes to expire sessions and check for shutdown
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _option(default, help: str, **cli):
    """A field that is also a `djinn-server` option: `help` for --help, `cli` for argparse (flag, metavar, ...)."""
    return field(default=default, metadata={"help": help, **cli})


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


@dataclass(frozen=True)
class ServerConfig:
    """The server's configuration, and `djinn-server`'s options: each default is written here once.

    `parser()` builds the CLI from these fields and `argv()` writes a config back as the
    command line of a child server (`djinn.server.process.ServerProcess`).
    """
    host: str = _option("127.0.0.1", "address to listen on")
    port: int = _option(5556, "TCP port (0: any free port)")
    device: str = _option("auto", "auto (cuda if this torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    model: tuple[str, ...] = _option((), "load this model at start (catalogue name or local checkpoint directory; "
                                         "repeatable): clients attach by name, no weights cross the wire",
                                     metavar="NAME_OR_PATH")
    vram_budget_gb: float | None = _option(None, "memory the server may use for weights + KV, in GiB "
                                                 "(default: what the device has free)")
    ring_buffer_gb: float | None = _option(None, "ring through which a model larger than the budget streams its "
                                                 "layers, counted in the budget, in GiB (default: 2 GiB on a GPU, "
                                                 "16 MiB on a CPU)")
    disable_kv_swap: bool = _option(False, "never page KV caches to host memory (isolates weight streaming from "
                                           "KV paging)")
    host_swap_gb: float | None = _option(None, "host memory for KV paged out of the budget, in GiB; past it a "
                                               "request fails with out_of_memory (default: half the host memory "
                                               "available at start)")
    auth_token_file: str | None = _option(None, "file holding a shared token that every request must carry",
                                          metavar="PATH")
    session_ttl_s: float = _option(600.0, "idle seconds after which a session of a vanished client is closed")
    ipc_path: str | None = _option(None, "also listen on ipc://PATH (same host)", flag="--ipc", metavar="PATH")
    decode_graphs: bool = _option(False, "decode through CUDA-graph slots over a static KV cache (faster; logits "
                                         "then differ from eager HF in the last bits)")
    graph_max_len: int = _option(1024, "tokens one graph slot holds (prompt + generated)")
    deterministic: bool = _option(False, "deterministic kernels only (djinn.reproducibility): runs repeat bit for "
                                         "bit; the default decode attention kernel of a GPU does not")
    malloc_tuning: bool = _option(True, "keep glibc's default allocator settings (large receives then page-fault "
                                        "fresh buffers: ~5x slower on a VM)", flag="--no-malloc-tuning")
    log_level: str = _option("INFO", "log level", choices=LOG_LEVELS)
    # Not options: set by code that builds a server in-process.
    auth_token: str | None = None  # the token itself (the CLI reads it from auth_token_file)
    limits: Limits = Limits()

    @classmethod
    def parser(cls, **kwargs) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(**kwargs)
        for f in fields(cls):
            if "help" not in f.metadata:
                continue
            meta = {k: v for k, v in f.metadata.items() if k not in ("help", "flag")}
            help_text = f.metadata["help"]
            if f.default not in (None, False, (), MISSING) and f.type != "bool":
                help_text += f" (default: {f.default})"
            if f.type == "bool":
                meta["action"] = "store_false" if f.default else "store_true"
            elif f.type.startswith("tuple"):
                meta.update(action="append", default=[])
            else:
                meta["type"] = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(_flag(f), dest=f.name, help=help_text, **{"default": f.default, **meta})
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata}
        return cls(**{**values, "model": tuple(values["model"])})

    def argv(self) -> list[str]:
        """This config as `djinn-server` options: only what differs from the defaults."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if "help" not in f.metadata or value == f.default:
                continue
            if f.type == "bool":
                args.append(_flag(f))
            elif f.type.startswith("tuple"):
                args.extend(a for item in value for a in (_flag(f), str(item)))
            else:
                args.extend([_flag(f), repr(value) if isinstance(value, float) else str(value)])
        return args


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against this torch and machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


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
        self.device = resolve_device(config.device)
        auth_token = config.auth_token
        if auth_token is None and config.auth_token_file is not None:
            auth_token = Path(config.auth_token_file).read_text().strip()
            if not auth_token:
                raise ValueError(f"auth token file {config.auth_token_file} is empty")
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
            "offload": self.offload, "session_stats": self.session_stats, "attach": self.attach,
        }
        for name in config.model:  # before the socket binds: a client never finds it half-loaded
            self.weights.preload(name, models.build(name, device=self.device))
        # Received frames are pageable; on a GPU, activations land in pinned memory instead.
        landing = self.executor.landing if self.device.type == "cuda" else None
        self.sockets = [ServerSocket(f"tcp://{config.host}:{config.port}", self.handlers, limits=config.limits,
                                     auth_token=auth_token, landing=landing)]
        if config.ipc_path:
            self.sockets.append(ServerSocket(f"ipc://{config.ipc_path}", self.handlers, limits=config.limits,
                                             auth_token=auth_token, landing=landing))
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
        return Reply({"version": djinn.__version__, "device": str(self.device), "malloc_tuned": is_tuned(os.environ),
                      "deterministic_kernels": deterministic_kernels(),
                      "budget_bytes": self.executor.budget_bytes, "ops": sorted(self.handlers),
                      "models": [{"name": name, "fingerprint": fp} for name, fp in self.weights.names.items()]}, {})

    def attach(self, incoming: Incoming) -> Reply:
        """A model the server loaded itself, by name: what a client needs to drive it, never its weights."""
        cached = self.weights.named(_arg(incoming.message, "name", str))
        model = cached.model
        return Reply({"model": cached.fingerprint, "config": models.config_dict(model),
                      "dtype": DTYPE_NAMES[cached.dtype], "generation_config": model.generation_config.to_dict()}, {})

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
        padding = stateless_padding(message, pairs[0][0].shape[-2] if pairs else 0, models.max_positions(config))
        logits, pairs = self.executor.stateless_step(model, weights, config, message.tensors.get("input_ids"), pairs,
                                                     padding)
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
        """prefill and decode: the KV, padding and sampler stay in the session; the token (or logits) come back."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), message.args.get("model"))
        self.executor.not_parked(session)
        starts = message.op == "prefill"
        if starts != (session.length == 0):
            raise BadRequest(f"'{message.op}' on session {session.handle} holding {session.length} tokens: "
                             f"prefill starts a session, decode continues it")
        options = StepOptions.parse(message, starts_session=starts)  # before anything runs
        ids = message.tensors.get("input_ids")
        if starts:
            mask = options.attention_mask
            padding = Padding.of_prompt(mask.to(self.device)) if mask is not None else None  # grows on the device
        else:
            padding = session.padding
            if padding is not None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
                padding = padding.next(ids.shape[1])  # other ids: the executor says what is wrong with them
        logits = self.executor.session_step(session, ids, padding)
        if starts:
            session.sampler = Sampler.build(session.model.model, options.sampling, ids, options.attention_mask,
                                            self.device)
        session.padding = padding
        token, scores = self._sampler(session).pick(ids, logits)
        return self._logits_reply(options, token, logits, scores,
                                  {"length": session.length, "io_wait_ms": session.last_io_wait_ms})

    @staticmethod
    def _sampler(session: Session) -> Sampler:
        if session.sampler is None:  # a session that began with run_to_layer: greedy
            session.sampler = Sampler.greedy()
        return session.sampler

    @staticmethod
    def _logits_reply(options: StepOptions, token: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor,
                      args: dict) -> Reply:
        picked = {"token": (token, TensorKind.TOKEN_IDS), "logits": (logits, TensorKind.LOGITS),
                  "scores": (scores, TensorKind.LOGITS)}
        tensors = {name: OutgoingTensor(*picked[name]) for name in options.returns}
        return Reply(args, tensors, CodecPolicy({TensorKind.LOGITS: options.logits_codec}))

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
        options = StepOptions.parse(message, starts_session=False)  # before the parked step goes on
        sampler = self._sampler(session)
        if sampler.history is not None and options.returns & {"token", "scores"}:
            # The parked step's tokens never reached the sampler, whose processors read every token.
            raise BadRequest(f"session {session.handle} samples with logits processors: a resumed step can "
                             f"return only its logits")
        logits = self.executor.resume(session, message.tensors.get("activation"))
        token, scores = (sampler.pick(None, logits) if sampler.history is None
                         else (None, None))
        return self._logits_reply(options, token, logits, scores,
                                  {"length": session.length, "io_wait_ms": session.last_io_wait_ms})

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
