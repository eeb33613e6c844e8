"""The Djinn server: one ROUTER socket, one request loop, one handler per op.

Each turn of the loop reads every request that has arrived and lets the scheduler
(`djinn.server.scheduler`) pick what runs: the waiting decodes of several sessions as one
batched forward, a chunk of a long prefill, then the other requests one at a time. A handler
raises `DjinnError` for anything the client got wrong; the loop turns it into an
error reply and serves the next request, so one client's bad request never touches
another's session. Every reply carries the server's timings and the request's
byte counts so the client can split queue / compute / transfer.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import secrets
import time
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
import zmq

import djinn
from djinn import host_memory, kv, models
from djinn.decoding import Padding
from djinn.errors import BadRequest, DjinnError, LimitExceeded, TooLarge, quote, without_tracebacks
from djinn.modes import DECODE_CHOICES, SHIPPED_WEIGHT_PREFIX
from djinn.reproducibility import deterministic_kernels
from djinn.sampling import Sampler
from djinn.server.batching import BatchedStep, unbatched_reason
from djinn.server.breakpoints import limit_parked, parked_room
from djinn.server.device_budget import DeviceBudget
from djinn.server.executor import Executor
from djinn.server.fast_decode import FastPath
from djinn.server.fault_injection import install_from_env
from djinn.server.gc_pauses import GcPauses
from djinn.server.interventions import InterventionRun, TraceOptions, before_breakpoint
from djinn.server.limits import ServerLimits, host_limits
from djinn.server.scheduler import (STRAGGLER_WAIT_FRACTION, BatchPolicy, PrefillJob, Queued, Scheduler,
                                    default_step_token_budget)
from djinn.server.session_store import Session, SessionStore
from djinn.server.step_options import StepOptions, stateless_padding
from djinn.server.weight_cache import TensorEntry, WeightCache
from djinn.transport import CodecPolicy, Incoming, Limits, Message, OutgoingTensor, ServerSocket, TensorKind
from djinn.transport.security import ServerSecurity
from djinn.transport.tuning import is_tuned
from djinn.transport.wire import DTYPE_NAMES, DTYPES
from djinn.units import GIB

log = logging.getLogger("djinn.server")

POLL_MS = 200  # how often the loop wakes to expire sessions and check for shutdown
MAX_LOGGED_CHARS = 500  # of a failed request's error, in the log
FINGERPRINT = re.compile(r"[0-9a-f]{32}")  # models.fingerprint: a 16-byte blake2b, hex
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STEP_OPS = ("prefill", "decode")  # the ops whose queue and compute time each session keeps


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _option(default, help: str, **cli):
    """A field that is also a `djinn-server` option: `help` for --help, `cli` for argparse (flag, metavar, ...)."""
    return field(default=default, metadata={"help": help, **cli})


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


# Test-only: a planted slowdown of every session step (prefill, decode), in ms, read once at
# import. It exists to show that djinn-compare catches a regression (benchmarks/compare.py);
# unset, it costs one comparison per step.
TEST_STEP_SLEEP_S = float(os.environ.get("DJINN_TEST_STEP_SLEEP_MS", "0")) / 1e3


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
    vram_budget_gb: float | None = _option(None, "device memory the server may use for weights, KV, fast-path slots "
                                                 "and the ring, in GiB (default: what the device has free at start; "
                                                 "on a CPU, half the host memory the process may use)")
    ring_buffer_gb: float | None = _option(None, "ring through which a model larger than the budget streams its "
                                                 "layers, counted in the budget, in GiB (default: sized by the "
                                                 "model's residency plan, two or three layers; every layer that "
                                                 "fits beside it stays resident)")
    stream_kv_tokens: int | None = _option(None, "KV tokens (all its sessions together) a streamed model's "
                                                 "residency plan keeps device room for; KV past it pages to host "
                                                 "(default: the model's context length)")
    disable_kv_swap: bool = _option(False, "never page KV caches to host memory (isolates weight streaming from "
                                           "KV paging)")
    host_swap_gb: float | None = _option(None, "cap on host memory for KV paged out of the budget, in GiB; past "
                                               "it, or past what the host (its cgroup included) can still give "
                                               "less a floor, a request fails with out_of_memory (default: no cap "
                                               "beyond the host's own)")
    auth_token_file: str | None = _option(None, "file holding a shared token that every request must carry",
                                          metavar="PATH")
    curve_secret_key_file: str | None = _option(None, "encrypt with ZeroMQ CURVE: this server's certificate with "
                                                      "its secret key (zmq.auth.create_certificates); needs "
                                                      "--curve-client-keys", metavar="PATH")
    curve_client_keys: str | None = _option(None, "CURVE: directory of the public key files of the clients "
                                                  "allowed to connect", metavar="DIR")
    # Caps: None takes `djinn.server.limits.ServerLimits`' default (see `caps`).
    max_sessions: int | None = _option(None, "open sessions in all; past it open_session fails with "
                                             "limit_exceeded (default: 4096)")
    max_sessions_per_client: int | None = _option(None, "open sessions of one client connection (default: 1024)")
    max_parked: int | None = _option(None, "forwards parked at breakpoints at once, each a thread (default: a "
                                           "quarter of the process limit, at most 256)")
    max_uploads: int | None = _option(None, "models whose upload is in progress at once (default: 8)")
    upload_ttl_s: float | None = _option(None, "idle seconds after which a partial upload is abandoned and freed "
                                               "(default: 300)")
    session_ttl_s: float = _option(600.0, "idle seconds after which a session of a vanished client is closed")
    ipc_path: str | None = _option(None, "also listen on ipc://PATH (same host)", flag="--ipc", metavar="PATH")
    exact: bool = _option(False, "decode with HF's eager forward, bit-identical to HF, on CUDA too (by default "
                                 "Llama and Mistral decode on CUDA through the fast path: a compact forward over a "
                                 "static KV cache replayed as one CUDA graph, logits equal to HF's within fp16 "
                                 "rounding); a load's decode option chooses per model")
    fast_max_len: int = _option(1024, "tokens one fast-path slot holds (prompt + generated); a longer session "
                                      "goes on with HF's forward")
    deterministic: bool = _option(False, "deterministic kernels only (djinn.reproducibility): runs repeat bit for "
                                         "bit; the default decode attention kernel of a GPU does not")
    malloc_tuning: bool = _option(True, "keep glibc's default allocator settings (large receives then page-fault "
                                        "fresh buffers: ~5x slower on a VM)", flag="--no-malloc-tuning")
    gc_freeze: bool = _option(True, "let full garbage collections walk the start-up heap too (imports, preloaded "
                                    "models; by default it is frozen once the server has started, so a full "
                                    "collection, which stops every session's step, walks only what serving made)",
                              flag="--no-gc-freeze")
    # Continuous batching (djinn.server.scheduler): 32 sessions is the multitenant experiment's largest N.
    max_batch: int = _option(32, "sessions whose decode steps run as one batched forward, at most")
    # Its default depends on the device (scheduler.default_step_token_budget).
    step_token_budget: int | None = _option(None, "tokens one turn of the loop feeds the model, at most: a batch's "
                                                  "decode tokens plus the prompts batched beside it or a chunk of a "
                                                  "long prefill (default: 512 on a CPU, 2048 on a GPU)")
    # Long enough for a client process to read its reply and send its next step on a loaded
    # host; a batch waits only for the peers of the last one, and only until they are back.
    batch_wait_ms: float = _option(2.0, "how long a turn waits for the clients of the last batch to send their "
                                        f"next step before it plans the next batch, in ms; "
                                        f"{STRAGGLER_WAIT_FRACTION:.0%}% of the last turn's model time when that "
                                        f"is longer (0: never waits)")
    log_level: str = _option("INFO", "log level", choices=LOG_LEVELS)
    # Not options: set by code that builds a server in-process.
    auth_token: str | None = None  # the token itself (the CLI reads it from auth_token_file)
    limits: Limits | None = None  # what one message may hold (None: `host_limits` of the host memory at start)

    @property
    def caps(self) -> ServerLimits:
        """Sessions, parked forwards and uploads: the options given, ServerLimits' defaults for the rest."""
        given = {"max_sessions": self.max_sessions, "max_sessions_per_peer": self.max_sessions_per_client,
                 "max_parked": self.max_parked, "max_uploads": self.max_uploads, "upload_ttl_s": self.upload_ttl_s}
        return ServerLimits(**{name: value for name, value in given.items() if value is not None})

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
                meta["type"] = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
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


@dataclass(frozen=True)
class _Step:
    """A prefill or decode as `_begin_step` checked it."""
    session: Session
    options: StepOptions
    ids: object  # the request's input_ids (the executor checks them)
    padding: Padding | None
    starts: bool
    trace: TraceOptions = field(default_factory=TraceOptions)
    run: InterventionRun | None = None  # the request's interventions (a batched step carries none)


def _traced(queued: Queued) -> bool:
    """Whether a step asks for hooks or every position's logits: it runs alone, whole."""
    args = queued.incoming.message.args
    return bool(args.get("interventions")) or args.get("logits", "last") != "last"


def _latency_of(sessions) -> dict:
    """The queue and compute time of a client's open sessions' steps, summed."""
    steps = batched = 0
    queue_ms = compute_ms = 0.0
    for session in sessions:
        steps += session.latency.steps
        batched += session.latency.batched_steps
        queue_ms += session.latency.queue_ms
        compute_ms += session.latency.compute_ms
    return {"steps": steps, "batched_steps": batched, "queue_ms": queue_ms, "compute_ms": compute_ms}


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
            # its text, not the error: a handler that keeps records (pytest's) would keep it alive
            log.warning("rejected a request before it ran (%s): %s", error.code, str(error))
        else:
            self._suppressed += 1


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.gc_pauses = GcPauses()
        budget = config.step_token_budget
        policy = BatchPolicy(config.max_batch, default_step_token_budget(self.device.type) if budget is None else budget,
                             config.batch_wait_ms)  # before any socket
        auth_token = config.auth_token
        if auth_token is None and config.auth_token_file is not None:
            auth_token = Path(config.auth_token_file).read_text().strip()
            if not auth_token:
                raise ValueError(f"auth token file {config.auth_token_file} is empty")
        # The one owner of the device's memory: the weight cache, the sessions' KV and the
        # fast path's slots register with it as holders.
        self.budget = DeviceBudget(self.device, None if config.vram_budget_gb is None
                                   else int(config.vram_budget_gb * GIB))
        host_swap = None if config.host_swap_gb is None else int(config.host_swap_gb * GIB)
        ring = int(config.ring_buffer_gb * GIB) if config.ring_buffer_gb is not None else None
        self.weights = WeightCache(self.budget, ring_bytes=ring, stream_kv_tokens=config.stream_kv_tokens)
        # Fast by default where it pays, on CUDA; a CPU decodes exactly unless a load asks.
        self.fast = FastPath(self.budget, self.weights, config.fast_max_len,
                             default_on=self.device.type == "cuda" and not config.exact)
        self.sessions = SessionStore(config.session_ttl_s, f"{config.host}:{config.port}", self.budget,
                                     swap=not config.disable_kv_swap, host_limit_bytes=host_swap, fast=self.fast)
        self.executor = Executor(self.budget, self.weights, self.sessions)
        self.injected_oom = install_from_env(self.budget)  # test-only, None unless DJINN_TEST_INJECT_OOM is set
        caps = config.caps
        self.weights.limits = caps
        self.sessions.max_sessions, self.sessions.max_sessions_per_peer = caps.max_sessions, caps.max_sessions_per_peer
        limit_parked(caps.parked)
        # Told apart by `hello`: a client that reconnected knows when the server is another process.
        self.instance = secrets.token_hex(8)
        limits = config.limits if config.limits is not None else host_limits(host_memory.available_bytes())
        security = ServerSecurity(auth_token, _path(config.curve_secret_key_file),
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
            "offload": self.offload, "session_stats": self.session_stats, "attach": self.attach,
            "generate": self.generate,
        }
        for name in config.model:  # before the socket binds: a client never finds it half-loaded
            self.weights.preload(name, models.build(name, device=self.device))
        # Received frames are pageable; on a GPU, activations land in pinned memory instead.
        landing = self.executor.landing if self.device.type == "cuda" else None
        addresses = [f"tcp://{config.host}:{config.port}", *([f"ipc://{config.ipc_path}"] if config.ipc_path else [])]
        self.sockets = [ServerSocket(address, self.handlers, limits=limits, auth_token=auth_token,
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
        self.scheduler = Scheduler(policy, self)

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
        self.gc_pauses.close()
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
        try:
            self.scheduler.iterate(timeout_ms)
        except Exception as exc:  # a scheduler bug: what it held is answered, the loop goes on
            log.exception("a turn of the scheduler failed")
            for job in self.scheduler.prefills:  # a prompt half in the cache would decode silently wrong
                self.sessions.rollback(job.session, 0)
            for queued in self.scheduler.abandon():
                self._failed(queued.sock, queued.incoming, exc)

    # -- the scheduler's engine (djinn.server.scheduler.Engine) ---------------------------
    def receive(self, timeout_ms: float, limit: int) -> list[Queued]:
        """Every request that has arrived, up to `limit`, after waiting up to `timeout_ms` for the first;
        those refused before they ran are answered here."""
        # Whole milliseconds, rounded up: a sub-millisecond wait (the batch's stragglers) must block,
        # not spin on the cores the clients need to send their next step.
        if len(self.sockets) == 1:  # the receive waits itself: no poll call per request
            ready, wait_ms = self.sockets, math.ceil(timeout_ms)
        else:
            polled = dict(self._poller.poll(math.ceil(timeout_ms)))
            ready, wait_ms = [s for s in self.sockets if s.zmq_socket in polled], 0
        arrived: list[Queued] = []
        received = 0  # refused ones count too: a flood of them must not hold the turn
        for sock in ready:
            while received < limit:
                incoming = sock.receive(wait_ms)
                wait_ms = 0
                if incoming is None:
                    break
                received += 1
                if incoming.error is not None:
                    self._rejections.warn(incoming.error)
                    sock.reply_error(incoming.peer, incoming.request_id, incoming.error)
                    continue
                handle = incoming.message.args.get("session")
                arrived.append(Queued(sock, incoming, handle if isinstance(handle, str) else None))
        return arrived

    def batchable(self, queued: Queued) -> tuple[Session, int] | None:
        """The session and rows of a decode that may join a batch; None for anything else."""
        if queued.op != "decode" or queued.handle is None or _traced(queued):
            return None  # a traced step runs alone: its hooks act on the whole forward
        session = self.sessions.sessions.get(queued.handle)
        if session is None or unbatched_reason(session) is not None:
            return None
        return session, session.batch

    def prefill_tokens(self, queued: Queued) -> int | None:
        """The tokens of a prefill that may run in chunks; None for anything else."""
        found = self._plain_prefill(queued)
        return None if found is None else found[1].numel()

    def batchable_prefill(self, queued: Queued) -> tuple[Session, int, int] | None:
        """(session, rows, tokens) of a prefill that may join a batched prefill; None for anything else."""
        found = self._plain_prefill(queued)
        if found is None or "attention_mask" in queued.incoming.message.tensors:
            return None  # a padded prompt runs alone (or in chunks): its own mask is its step's
        session, ids = found
        return session, ids.shape[0], ids.shape[1]

    def _plain_prefill(self, queued: Queued) -> tuple[Session, torch.Tensor] | None:
        """A prefill that HF's eager forward runs as it is: no hooks, the last logits, no slot, no ring."""
        ids = queued.incoming.message.tensors.get("input_ids")
        session = self.sessions.sessions.get(queued.handle) if queued.handle is not None else None
        if (queued.op != "prefill" or session is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2
                or _traced(queued) or session.model.streamed
                or self.sessions.fast is not None and self.sessions.fast.wanted(session.decode)):
            return None  # a traced step runs whole with its hooks; a fast-path slot or the ring takes a prompt whole
        return session, ids

    def serve(self, queued: Queued) -> None:
        self._handle(queued.sock, queued.incoming)

    def decode_batch(self, batch: list[Queued]) -> None:
        """The decodes of several sessions as one forward; each answered (or failed) on its own."""
        self._run_batch(batch, self.executor.batched_step)

    def prefill_batch(self, batch: list[Queued]) -> None:
        """The prompts of several new sessions as one forward; each answered (or failed) on its own."""
        self._run_batch(batch, self.executor.batched_prefill)

    def _run_batch(self, batch: list[Queued], forward: Callable[[list[BatchedStep]], list[torch.Tensor]]) -> None:
        started = time.perf_counter()
        members: list[tuple[Queued, _Step, BatchedStep]] = []
        for queued in batch:
            try:
                step = self._begin_step(queued.incoming.message)
                ids = self.executor.step_ids(step.session, step.ids)
                members.append((queued, step, BatchedStep(step.session, ids, step.padding)))
            except Exception as exc:
                self._failed(queued.sock, queued.incoming, exc)
        if len(members) < 2:  # alone after all: the solo step, bit for bit
            for queued, _step, _member in members:
                self._handle(queued.sock, queued.incoming)
            return
        try:
            logits = forward([member for _queued, _step, member in members])
            if TEST_STEP_SLEEP_S:
                time.sleep(TEST_STEP_SLEEP_S)
            self.executor.synchronize()
        except Exception as exc:  # torch.OutOfMemoryError included
            # Every session is as it was: each runs alone, with the store's retries and its own error.
            log.log(logging.INFO if isinstance(exc, (DjinnError, torch.OutOfMemoryError)) else logging.ERROR,
                    "a batch of %d sessions failed (%s): stepping them one by one", len(members),
                    str(exc)[:MAX_LOGGED_CHARS])
            for queued, _step, _member in members:
                self._handle(queued.sock, queued.incoming)
            return
        finished = time.perf_counter()
        for (queued, step, _member), rows in zip(members, logits):
            try:
                reply = self._finish_step(step, rows)
            except Exception as exc:
                self._failed(queued.sock, queued.incoming, exc)
                continue
            self._answer(queued.sock, queued.incoming, reply, started, finished, batch=len(members))

    def begin_prefill(self, queued: Queued) -> PrefillJob | None:
        """A long prefill, checked whole, to run in chunks; None when it failed (and was answered)."""
        try:
            step = self._begin_step(queued.incoming.message)
            if not step.starts:
                raise BadRequest(f"'prefill' on session {step.session.handle} holding {step.session.length} tokens")
            cached = step.session.model
            ids = self.executor.token_ids(step.ids, "input_ids", cached.vocab_size, 0, cached.max_positions)
        except Exception as exc:
            self._failed(queued.sock, queued.incoming, exc)
            return None
        return PrefillJob(queued, step.session, ids.shape[0], ids.shape[1], _Step(step.session, step.options, ids,
                                                                                    step.padding, True))

    def prefill_chunk(self, job: PrefillJob, tokens: int) -> bool:
        """The next `tokens` of the prompt (each row); the reply once the last chunk ran."""
        step: _Step = job.state
        session, start = step.session, job.done_tokens
        end = min(start + tokens, job.total_tokens)
        padding = step.padding
        chunk_padding = None if padding is None else Padding(padding.mask[:, :end], padding.positions[:, start:end])
        began = time.perf_counter()
        try:
            if self.sessions.sessions.get(session.handle) is not session:
                raise BadRequest(f"session {session.handle} was closed during its prefill")
            logits = self.executor.session_step(session, step.ids[:, start:end], chunk_padding)
            self.executor.synchronize()
            job.compute_s += time.perf_counter() - began
            job.done_tokens = end
            if end < job.total_tokens:
                return False
            reply = self._finish_step(step, logits)
        except Exception as exc:
            self.sessions.rollback(session, 0)  # the chunks before it are undone: the session is empty again
            self._failed(job.queued.sock, job.queued.incoming, exc)
            return True
        self._answer(job.queued.sock, job.queued.incoming, reply, job.started, job.started + job.compute_s, batch=1)
        return True

    # -- answering ------------------------------------------------------------------------
    def _handle(self, sock: ServerSocket, incoming: Incoming) -> None:
        message = incoming.message
        started = time.perf_counter()
        try:
            reply = self.handlers[message.op](incoming)
            self.executor.synchronize()
        except Exception as exc:
            self._failed(sock, incoming, exc)
            return
        self._answer(sock, incoming, reply, started, time.perf_counter(), batch=1)

    def _answer(self, sock: ServerSocket, incoming: Incoming, reply: Reply, started: float, finished: float,
                batch: int) -> None:
        """Send a reply with the server's timings; a step's are kept in its session's latency too."""
        message = incoming.message
        queue_ms, compute_ms = (started - incoming.received_at) * 1e3, (finished - started) * 1e3
        timings = {"queue_ms": queue_ms, "compute_ms": compute_ms, "batch": batch,
                   "request_payload_bytes": message.payload_bytes, "request_framing_bytes": message.framing_bytes}
        session = self.sessions.sessions.get(message.args.get("session")) if message.op in STEP_OPS else None
        if session is not None:
            # Since its last reply, not since this request was read: a pause between two turns holds
            # the request in the socket, where its queue time does not see it.
            since = session.latency.answered_at
            timings["gc_ms"] = self.gc_pauses.paused_ms(incoming.received_at if since is None else since)
        try:
            sock.reply(incoming.peer, incoming.request_id, {**reply.args, "server": timings}, reply.tensors,
                       reply.policy)
        except Exception as exc:
            self._failed(sock, incoming, exc)
            return
        if session is not None:
            session.latency.record(queue_ms, compute_ms, batch, answered_at=time.perf_counter())
        self.requests_served += 1

    def _failed(self, sock: ServerSocket, incoming: Incoming, exc: Exception) -> None:
        op = incoming.message.op
        if isinstance(exc, DjinnError):
            log.info("%s failed: %s", op, str(exc)[:MAX_LOGGED_CHARS])
            sock.reply_error(incoming.peer, incoming.request_id, exc)
        else:
            log.exception("%s raised", op, exc_info=exc)  # a bug must not take the server down
            sock.reply_error(incoming.peer, incoming.request_id,
                             DjinnError(f"{op} failed on the server: {type(exc).__name__} {quote(str(exc), 300)}"))
        without_tracebacks(exc)  # a frame below may hold it: a cycle holding the request's tensors

    # -- ops -----------------------------------------------------------------------
    def hello(self, incoming: Incoming) -> Reply:
        return Reply({"version": djinn.__version__, "instance": self.instance, "device": str(self.device),
                      "malloc_tuned": is_tuned(os.environ), "deterministic_kernels": deterministic_kernels(),
                      "decode_default": "fast" if self.fast.default_on else "exact",
                      "budget_bytes": self.budget.limit_bytes, "ops": sorted(self.handlers),
                      "models": [{"name": name, "fingerprint": fp} for name, fp in self.weights.names.items()]}, {})

    def attach(self, incoming: Incoming) -> Reply:
        """A model the server loaded itself, by name: what a client needs to drive it, never its weights."""
        cached = self.weights.named(_arg(incoming.message, "name", str))
        cached.peers.add(incoming.peer)  # its `stats` show the model it attached to
        model = cached.model
        return Reply({"model": cached.fingerprint, "config": models.config_dict(model),
                      "dtype": DTYPE_NAMES[cached.dtype], "generation_config": model.generation_config.to_dict()}, {})

    def stats(self, incoming: Incoming) -> Reply:
        counters = self.weights.counters
        memory = {**self.budget.summary(), "kv_host_bytes": self.sessions.host_bytes}
        # A client sees the models it registered and its own sessions; memory, cache and paging
        # figures are the server's totals (no fingerprint or handle of another client).
        peer = incoming.peer
        return Reply({
            "memory": memory,
            "sessions": self.sessions.owned_by(peer), "sessions_expired": self.sessions.expired,
            # The server's own count, no handle: a pool places a new session on its least-loaded server.
            "sessions_open": len(self.sessions.sessions),
            "models": [{"fingerprint": m.fingerprint, "bytes": m.weight_bytes, "complete": m.complete,
                        "sessions": m.users - (not m.complete), "streamed": m.streamed,
                        "device_bytes": m.device_bytes, "ring_bytes": m.ring_bytes, "stream": m.stream_stats(),
                        "residency": m.plan.as_dict() if m.plan is not None else None}
                       for m in self.weights.models.values() if peer in m.peers],
            "cache": {"hits": counters.hits, "misses": counters.misses, "evictions": counters.evictions,
                      "uploaded_bytes": counters.uploaded_bytes},
            "paging": self.sessions.summary(),
            "decode_paths": self.fast.summary(),
            "scheduler": {**self.scheduler.summary(), "stacks_reused": self.executor.stacks.reused,
                          "stacks_restacked": self.executor.stacks.restacked},
            "latency": _latency_of(self.sessions.sessions[h] for h in self.sessions.owned_handles(peer)),
            "gc": self.gc_pauses.summary(),
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
        padding = stateless_padding(message, pairs[0][0].shape[-2] if pairs else 0, models.max_positions(config))
        trace = TraceOptions.parse(message)
        returns_kv = message.args.get("kv", True)
        if not isinstance(returns_kv, bool):
            raise BadRequest(f"'kv' must be true or false, got {quote(returns_kv)}")
        run = InterventionRun.parse(model, message, 1, self.device)
        if run is not None and weights and any(iv.lens for iv in run.interventions):
            raise BadRequest("the logit lens needs the model's weights on the server: load it in a cached mode")
        logits, pairs = self.executor.stateless_step(model, weights, config, message.tensors.get("input_ids"), pairs,
                                                     padding, run.at(0) if run else None, trace.all_logits)
        tensors = {"logits": OutgoingTensor(logits, TensorKind.LOGITS)} if trace.logits != "none" else {}
        for (kname, vname), (k, v) in zip(kv.wire_names(len(pairs) if returns_kv else 0), pairs):
            tensors[kname] = OutgoingTensor(k, TensorKind.KV)
            tensors[vname] = OutgoingTensor(v, TensorKind.KV)
        return self._with_saves(Reply({}, tensors), run, trace)

    def open_session(self, incoming: Incoming) -> Reply:
        message = incoming.message
        decode = message.args.get("decode", "auto")
        if decode not in DECODE_CHOICES:
            raise BadRequest(f"'decode' must be one of {list(DECODE_CHOICES)}, got {quote(decode)}")
        cached = self.weights.get(_fingerprint(message))
        session = self.sessions.open(cached, incoming.peer)
        session.decode = decode
        return Reply({"session": session.handle}, {})

    def step(self, incoming: Incoming) -> Reply:
        """prefill and decode: the KV, padding and sampler stay in the session; the token (or logits) come back."""
        step = self._begin_step(incoming.message)
        logits = self.executor.session_step(step.session, step.ids, step.padding,
                                            step.run.at(0) if step.run else None, step.trace.all_logits)
        if TEST_STEP_SLEEP_S:
            time.sleep(TEST_STEP_SLEEP_S)
        return self._finish_step(step, logits)

    def _begin_step(self, message: Message) -> "_Step":
        """A step's session, options, interventions, ids and padding, checked; nothing about the session changes."""
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        self.executor.not_parked(session)
        starts = message.op == "prefill"
        if starts != (session.length == 0):
            raise BadRequest(f"'{message.op}' on session {session.handle} holding {session.length} tokens: "
                             f"prefill starts a session, decode continues it")
        options = StepOptions.parse(message, starts_session=starts)  # before anything runs
        trace = TraceOptions.parse(message)
        run = InterventionRun.parse(session.model.model, message, 1, self.device)
        ids = message.tensors.get("input_ids")
        return _Step(session, options, ids, self._step_padding(session, ids, starts, options), starts, trace, run)

    def _step_padding(self, session: Session, ids, starts: bool, options: StepOptions) -> Padding | None:
        if starts:
            mask = options.attention_mask
            return Padding.of_prompt(mask.to(self.device)) if mask is not None else None  # grows on the device
        padding = session.padding
        if padding is not None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
            padding = padding.next(ids.shape[1])  # other ids: the executor says what is wrong with them
        return padding

    def _finish_step(self, step: "_Step", logits: torch.Tensor) -> Reply:
        """After the step's forward: the session's sampler and padding move on; its reply (with the saves)."""
        session, options = step.session, step.options
        token, scores = self._pick(session, step.ids, step.starts, options, step.padding, logits,
                                   step.trace.all_logits)
        reply = self._logits_reply(options, token, logits, scores,
                                   {"length": session.length, "io_wait_ms": session.last_io_wait_ms})
        return self._with_saves(reply, step.run, step.trace)

    def _pick(self, session: Session, ids, starts: bool, options: StepOptions, padding: Padding | None,
              logits: torch.Tensor, all_logits: bool):
        """The sampler (built at a prefill) and the padding move on; the next token and its scores."""
        if starts:
            session.sampler = Sampler.build(session.model.model, options.sampling, ids, options.attention_mask,
                                            self.device)
        session.padding = padding
        return self._sampler(session).pick(ids, logits[:, -1] if all_logits else logits)

    def _advance(self, session: Session, ids, starts: bool, options: StepOptions, edits, all_logits: bool):
        """One step of a server-side generate: its forward (with this step's intervention hooks), the
        padding and the sampler moved on, the next token picked; (token, logits, scores)."""
        padding = self._step_padding(session, ids, starts, options)
        logits = self.executor.session_step(session, ids, padding, edits, all_logits)
        if TEST_STEP_SLEEP_S:
            time.sleep(TEST_STEP_SLEEP_S)
        token, scores = self._pick(session, ids, starts, options, padding, logits, all_logits)
        return token, logits, scores

    def generate(self, incoming: Incoming) -> Reply:
        """Many steps in one request: the fed ids, then a decode step per further token, each with its
        interventions, the tokens picked by the session's sampler; the tokens (and what was asked) come back
        once. A step that fails takes the whole request back: the session holds what it held before."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        self.executor.not_parked(session)
        steps = _arg(message, "max_new_tokens", int)
        starts = session.length == 0
        options = StepOptions.parse(message, starts_session=starts)
        options = replace(options, returns=options.returns | {"token"})  # the tokens always come back
        trace = TraceOptions.parse(message)
        if trace.all_logits:
            raise BadRequest("'logits': 'all' is for one forward (prefill, decode, forward); generate returns "
                             "each step's last-position logits")
        ids = message.tensors.get("input_ids")
        fed = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 0
        if steps < 1 or session.length + fed + steps - 1 > session.model.max_positions:
            raise BadRequest(f"'max_new_tokens' must be at least 1 and fit the model's context: {session.length} "
                             f"cached + {fed} fed + {steps} new tokens, the context is {session.model.max_positions}")
        eos = message.args.get("eos_token_id", [])
        pad = message.args.get("pad_token_id", 0)
        vocab = session.model.vocab_size
        if (not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                 for t in [*eos, pad])):
            raise BadRequest(f"'eos_token_id' must be a list of token ids and 'pad_token_id' a token id, each in "
                             f"[0, {vocab}), got {quote(eos)} and {quote(pad)}")
        run = InterventionRun.parse(session.model.model, message, steps, self.device)
        before = session.length, session.padding, session.sampler
        sampler_state = session.sampler.state() if session.sampler is not None else None
        tokens, logits, scores = [], [], []
        unfinished = None
        try:
            for step in range(steps):
                token, step_logits, step_scores = self._advance(session, ids, starts and step == 0, options,
                                                                run.at(step) if run else None, False)
                if eos:  # as HF's _sample (and the client's loop): a finished row is fed, and padded with, pad
                    if unfinished is None:
                        unfinished = torch.ones(token.shape[0], dtype=torch.bool, device=token.device)
                    token = torch.where(unfinished[:, None], token, pad)
                    unfinished &= ~torch.isin(token[:, 0], torch.tensor(eos, device=token.device))
                tokens.append(token)
                logits.append(step_logits)
                scores.append(step_scores)
                if unfinished is not None and not unfinished.any():
                    break
                ids = token
        except BaseException:
            self.sessions.rollback(session, before[0])
            session.padding, session.sampler = before[1], before[2]
            if session.sampler is not None:
                session.sampler.restore(sampler_state)
            raise
        reply = self._logits_reply(options, torch.cat(tokens, dim=1), torch.stack(logits, dim=1),
                                   torch.stack(scores, dim=1) if "scores" in options.returns else None,
                                   {"length": session.length, "steps": len(tokens),
                                    "stop_reason": "eos" if len(tokens) < steps else "max_new_tokens",
                                    "io_wait_ms": session.last_io_wait_ms})
        return self._with_saves(reply, run, trace)

    @staticmethod
    def _with_saves(reply: Reply, run: InterventionRun | None, trace: TraceOptions) -> Reply:
        """The reply with the run's saved tensors, compressed as activations (`saves_codec`)."""
        if run is None:
            return reply
        saved = {name: OutgoingTensor(value, TensorKind.ACTIVATION) for name, value in run.results(trace.per_step).items()}
        policy = CodecPolicy({**reply.policy.by_kind, TensorKind.ACTIVATION: trace.saves_codec})
        return Reply(reply.args, {**reply.tensors, **saved}, policy)

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
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        layer = _arg(message, "layer", int)
        if parked_room() == 0:  # refused before the step touches the session
            raise LimitExceeded(f"{self.config.caps.parked} forwards are parked at breakpoints, the cap: "
                                f"resume or cancel one first")
        trace = TraceOptions.parse(message)
        run = InterventionRun.parse(session.model.model, message, 1, self.device)
        if run is not None:
            run.check_layers(before_breakpoint(layer), f"runs after decoder layer {layer}, where this step parks: "
                                                       f"give it to resume")
        activation = self.executor.run_to_layer(session, message.tensors.get("input_ids"), layer,
                                                run.at(0) if run else None)
        return self._with_saves(Reply({"layer": layer, "io_wait_ms": session.last_io_wait_ms},
                                      {"activation": OutgoingTensor(activation, TensorKind.ACTIVATION)}), run, trace)

    def resume(self, incoming: Incoming) -> Reply:
        """The parked step continues from layer N+1 with the client's activation; the logits come back."""
        message = incoming.message
        session = self.sessions.get(message.args.get("session"), _fingerprint(message))
        options = StepOptions.parse(message, starts_session=False)  # before the parked step goes on
        sampler = self._sampler(session)
        if sampler.history is not None and options.returns & {"token", "scores"}:
            # The parked step's tokens never reached the sampler, whose processors read every token.
            raise BadRequest(f"session {session.handle} samples with logits processors: a resumed step can "
                             f"return only its logits")
        trace = TraceOptions.parse(message)
        run = InterventionRun.parse(session.model.model, message, 1, self.device)
        if run is not None and session.breakpoint is not None:
            parked = session.breakpoint.layer
            run.check_layers(lambda iv: not before_breakpoint(parked)(iv),
                             f"ran before decoder layer {parked}'s breakpoint: give it to run_to_layer")
        logits = self.executor.resume(session, message.tensors.get("activation"), run.at(0) if run else None)
        token, scores = (sampler.pick(None, logits) if sampler.history is None
                         else (None, None))
        reply = self._logits_reply(options, token, logits, scores,
                                   {"length": session.length, "io_wait_ms": session.last_io_wait_ms})
        return self._with_saves(reply, run, trace)

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
