"""The client side: `connect`, `Client.load`, and `RemoteModel.generate`.

`generate` runs one greedy loop for every mode; a mode only changes the step
driver underneath (local forward, stateless forward with shipped KV, or a session
whose KV stays on the server). Each step records its bytes and the server's
timings, summarised in `RemoteModel.last_stats`. `RemoteModel.session()` drives a
server-side session one step at a time instead: breakpoints, steering, then decoding.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from djinn import kv, models
from djinn.decoding import forward_last, greedy
from djinn.modes import SHIPPED_WEIGHT_PREFIX, Mode, resolve
from djinn.transport import DEFAULT_TIMEOUT_S, ByteCounters, ClientConnection, Codec, OutgoingTensor, TensorKind
from djinn.transport.security import ClientSecurity
from djinn.transport.sockets import HELLO_TIMEOUT_S
from djinn.transport.wire import DTYPE_NAMES

SERVER_ENV = "DJINN_SERVER"
SERVER_ENV_ALIASES = ("GENIE_SERVER_ADDRESS",)  # the prototype's name
# A chunk is one message: bounded memory on both sides, resumable per chunk. The server
# copies and digests a chunk between other clients' requests, at ~3.5 ms/MiB on the
# shared 2-core CI host: 32 MiB stalls a bystander's step ~120 ms (256 MiB had ~1 s; a
# 652 MB upload 4.5 s). A tensor larger than a chunk goes in slices of its rows.
UPLOAD_CHUNK_BYTES = 32 << 20


def server_address(address: str | None = None) -> str:
    for value in (address, os.environ.get(SERVER_ENV), *(os.environ.get(a) for a in SERVER_ENV_ALIASES)):
        if value:
            return value
    raise ValueError(f"no server address: pass one or set {SERVER_ENV}=host:port")


def connect(address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            auth_token_file: str | Path | None = None, curve_server_key_file: str | Path | None = None,
            curve_client_key_file: str | Path | None = None, hello_timeout_s: float = HELLO_TIMEOUT_S) -> "Client":
    """A client of the server at `address`, confirmed by a ZeroMQ handshake within
    `hello_timeout_s` and then a `hello`.

    `timeout_s` is each request's; a server that is not there (or refuses these
    credentials) fails here, fast, naming the address. CURVE (`--curve-secret-key-file`
    on the server) needs the server's public key file and this client's secret key file.
    """
    token = Path(auth_token_file).read_text().strip() if auth_token_file else None
    security = ClientSecurity.from_files(token, curve_server_key_file, curve_client_key_file)
    connection = ClientConnection(server_address(address), timeout_s=timeout_s, auth_token=token, security=security)
    try:
        connection.confirm(hello_timeout_s)
    except BaseException:
        connection.close()
        raise
    return Client(connection)


def load_local(model: torch.nn.Module) -> "RemoteModel":
    """native_pytorch: the same generate loop, run on the model's own device."""
    return RemoteModel(model, resolve("native_pytorch"), None, None)


@dataclass(frozen=True)
class StepRecord:
    """One request of a generation: what it cost on the wire and on the server."""
    wall_ms: float
    bytes: ByteCounters
    queue_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass(frozen=True)
class GenerationStats:
    mode: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    total_ms: float
    prefill_ms: float
    per_token_ms: float  # mean decode step, prefill excluded
    bytes_sent: int  # payload + framing, whole generation
    bytes_received: int
    decode_bytes_sent_per_token: float
    decode_bytes_received_per_token: float
    decode_payload_sent_per_token: float
    decode_payload_received_per_token: float
    queue_ms: float
    compute_ms: float
    transfer_ms: float  # wall time neither queued nor computing on the server: the wire and (de)serialisation
    steps: tuple[StepRecord, ...] = field(repr=False, default=())

    @classmethod
    def from_steps(cls, mode: str, batch: int, prompt_tokens: int, steps: list[StepRecord]) -> "GenerationStats":
        decode = steps[1:]
        n = max(len(decode), 1)
        total = sum(s.wall_ms for s in steps)
        queue = sum(s.queue_ms for s in steps)
        compute = sum(s.compute_ms for s in steps)
        return cls(
            mode=mode, batch=batch, prompt_tokens=prompt_tokens, new_tokens=len(steps), total_ms=total,
            prefill_ms=steps[0].wall_ms, per_token_ms=sum(s.wall_ms for s in decode) / n,
            bytes_sent=sum(s.bytes.sent_total for s in steps), bytes_received=sum(s.bytes.received_total for s in steps),
            decode_bytes_sent_per_token=sum(s.bytes.sent_total for s in decode) / n,
            decode_bytes_received_per_token=sum(s.bytes.received_total for s in decode) / n,
            decode_payload_sent_per_token=sum(s.bytes.sent_payload for s in decode) / n,
            decode_payload_received_per_token=sum(s.bytes.received_payload for s in decode) / n,
            queue_ms=queue, compute_ms=compute,
            transfer_ms=max(0.0, total - queue - compute) if mode != "native_pytorch" else 0.0,
            steps=tuple(steps))


@dataclass(frozen=True)
class Step:
    token: torch.Tensor  # [batch, 1], on the CPU
    logits: torch.Tensor | None  # [batch, vocab]
    server: dict


class Client:
    def __init__(self, connection: ClientConnection):
        self.connection = connection

    @property
    def counters(self) -> ByteCounters:
        return self.connection.counters

    def hello(self) -> dict:
        return self.connection.hello(self.connection.timeout_s)

    def reconnect(self) -> bool:
        """Confirm the server again after it stopped answering (`ServerLost`, `DjinnTimeout`);
        whether it is another process than before (restarted: sessions and models are gone,
        `load` registers and uploads them again)."""
        before = self.connection.server_instance
        return self.connection.reconnect(HELLO_TIMEOUT_S).get("instance") != before

    def stats(self) -> dict:
        return dict(self.connection.request("stats").args)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, model: torch.nn.Module, mode: str = "full_djinn", *, logits_codec: Codec = Codec.ZSTD,
             upload_chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> "RemoteModel":
        """A handle that generates with `model` in `mode`; cached weights are uploaded at most once."""
        resolved = resolve(mode)
        fingerprint = None
        if resolved.weights == "cached":
            fingerprint = self.upload(model, chunk_bytes=upload_chunk_bytes)
        return RemoteModel(model, resolved, self, fingerprint, logits_codec)

    def upload(self, model: torch.nn.Module, *, chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> str:
        """Register the model's weights by fingerprint and send the tensors the server lacks.

        After a broken upload, calling this again sends only what is still missing.
        """
        state = model.state_dict()
        fingerprint = models.fingerprint(state)
        reply = self.connection.request("register_model", {
            "model": fingerprint, "config": config_dict(model), "dtype": DTYPE_NAMES[_weights_dtype(model)],
            "tensors": [[n, DTYPE_NAMES[t.dtype], list(t.shape)] for n, t in state.items()]})
        missing = list(reply.args["missing"])
        for tensors, slices in _chunks(missing, state, chunk_bytes):
            self.connection.request("upload_weights", {"model": fingerprint, **({"slices": slices} if slices else {})},
                                    {n: OutgoingTensor(t, TensorKind.WEIGHT) for n, t in tensors.items()})
        return fingerprint


def config_dict(model: torch.nn.Module) -> dict:
    # The JSON form is the one transformers itself writes to disk: plain types only.
    return json.loads(model.config.to_json_string(use_diff=False))


def _weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _chunks(names: list[str], state: dict[str, torch.Tensor], chunk_bytes: int):
    """The tensors in messages of at most `chunk_bytes` (each: tensors, and the first row of
    those that are row slices); a tensor larger than a chunk goes in slices of its rows."""
    chunk, size = {}, 0
    for name in names:
        tensor = state[name]
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > chunk_bytes and tensor.dim() and tensor.shape[0] > 1:
            if chunk:
                yield chunk, {}
                chunk, size = {}, 0
            rows = max(1, chunk_bytes // (nbytes // tensor.shape[0]))
            for start in range(0, tensor.shape[0], rows):
                yield {name: tensor[start:start + rows]}, {name: start}
            continue
        if chunk and size + nbytes > chunk_bytes:
            yield chunk, {}
            chunk, size = {}, 0
        chunk[name] = tensor
        size += nbytes
    if chunk:
        yield chunk, {}


class RemoteModel:
    """A model bound to an execution mode; `generate` matches HF greedy `generate`."""

    def __init__(self, model: torch.nn.Module, mode: Mode, client: Client | None, fingerprint: str | None,
                 logits_codec: Codec = Codec.ZSTD):
        self.model = model
        self.mode = mode
        self.client = client
        self.fingerprint = fingerprint
        self.logits_codec = logits_codec
        self.last_stats: GenerationStats | None = None
        self.last_logits: torch.Tensor | None = None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 50, *, return_logits: bool = False) -> torch.Tensor:
        """Prompt followed by `max_new_tokens` greedy tokens, [batch, prompt + new]."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        driver = self._driver(return_logits)
        steps, tokens, logits = [], [], []
        try:
            step_input = input_ids
            for _ in range(max_new_tokens):
                before = self._counters()
                started = time.perf_counter()
                step = driver.step(step_input)
                wall = (time.perf_counter() - started) * 1e3
                server = step.server
                steps.append(StepRecord(wall, self._counters().since(before),
                                        server.get("queue_ms", 0.0), server.get("compute_ms", 0.0)))
                tokens.append(step.token)
                if step.logits is not None:
                    logits.append(step.logits)
                step_input = step.token
        finally:
            driver.close()
        self.last_stats = GenerationStats.from_steps(self.mode.name, input_ids.shape[0], input_ids.shape[1], steps)
        self.last_logits = torch.stack(logits, dim=1) if return_logits else None
        return torch.cat([input_ids.cpu(), *tokens], dim=1)

    def session(self) -> "RemoteSession":
        """A session on the server driven step by step: breakpoints, steering, then decoding."""
        return RemoteSession(self)

    def _counters(self) -> ByteCounters:
        return self.client.counters.snapshot() if self.client is not None else ByteCounters()

    def _driver(self, return_logits: bool):
        if self.mode.weights == "local":
            return LocalSteps(self.model)
        if self.mode.kv == "shipped":
            return StatelessSteps(self.client.connection, self.model, self.fingerprint)
        return SessionSteps(self.client.connection, self.fingerprint, self.mode.returns, return_logits,
                            self.logits_codec)


class LocalSteps:
    """native_pytorch: the model on its own device; nothing crosses the wire."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = kv.from_pairs([])

    def step(self, ids: torch.Tensor) -> Step:
        logits = forward_last(self.model, ids.to(self.device), self.cache)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Step(greedy(logits).cpu(), logits.cpu(), {})

    def close(self) -> None:
        self.cache = None


class StatelessSteps:
    """semantic_blind (weights shipped) and partially_aware (weights cached): KV both ways."""

    def __init__(self, connection: ClientConnection, model: torch.nn.Module, fingerprint: str | None):
        self.connection = connection
        self.pairs: kv.KVPairs = []
        if fingerprint is None:
            self.args = {"config": config_dict(model), "dtype": DTYPE_NAMES[_weights_dtype(model)]}
            self.weights = {SHIPPED_WEIGHT_PREFIX + n: OutgoingTensor(t, TensorKind.WEIGHT)
                            for n, t in model.state_dict().items()}
        else:
            self.args = {"model": fingerprint}
            self.weights = {}

    def step(self, ids: torch.Tensor) -> Step:
        tensors = {"input_ids": OutgoingTensor(ids, TensorKind.TOKEN_IDS), **self.weights}
        for (kname, vname), (k, v) in zip(kv.wire_names(len(self.pairs)), self.pairs):
            tensors[kname] = OutgoingTensor(k, TensorKind.KV)
            tensors[vname] = OutgoingTensor(v, TensorKind.KV)
        reply = self.connection.request("forward", self.args, tensors)
        names = kv.wire_names(sum(1 for n in reply.tensors if n.endswith(".k")))
        self.pairs = [(reply.tensors[k], reply.tensors[v]) for k, v in names]
        logits = reply.tensors["logits"]
        return Step(greedy(logits), logits, dict(reply.args.get("server", {})))

    def close(self) -> None:
        self.pairs = []


class SessionSteps:
    """remote_cache (full logits back) and full_djinn (the token back): KV stays on the server."""

    def __init__(self, connection: ClientConnection, fingerprint: str, returns: str, return_logits: bool,
                 logits_codec: Codec):
        self.connection = connection
        self.fingerprint = fingerprint
        self.args = {"model": fingerprint, "returns": returns}
        if returns == "token" and return_logits:
            self.args.update(with_logits=True, logits_codec=logits_codec.value)
        self.session = connection.request("open_session", {"model": fingerprint}).args["session"]
        self.started = False

    def step(self, ids: torch.Tensor) -> Step:
        op = "decode" if self.started else "prefill"
        reply = self.connection.request(op, {**self.args, "session": self.session},
                                        {"input_ids": OutgoingTensor(ids, TensorKind.TOKEN_IDS)})
        self.started = True
        logits = reply.tensors.get("logits")
        token = reply.tensors["token"] if "token" in reply.tensors else greedy(logits)
        return Step(token, logits, dict(reply.args.get("server", {})))

    def close(self) -> None:
        self.connection.request("close_session", {"session": self.session})


class RemoteSession:
    """A session whose KV cache stays on the server, driven one step at a time.

        with remote.session() as s:
            act = s.run_to_layer(input_ids, layer=6)  # parked after decoder layer 6; its output comes back
            logits = s.resume(act * 0.9)              # layers 7.. run on the (modified) activation
            tokens = s.generate(max_new_tokens=20)    # greedy decoding goes on from the session's KV

    Only activations, logits and tokens cross the wire. Leaving the `with` block closes
    the session, which also cancels a parked step.
    """

    def __init__(self, remote: RemoteModel):
        if remote.client is None or remote.mode.kv != "resident":
            raise ValueError(f"sessions need a mode whose KV stays on the server (remote_cache, full_djinn), "
                             f"not {remote.mode.name}")
        self.connection = remote.client.connection
        self.returns = remote.mode.returns
        self.logits_codec = remote.logits_codec
        self.args = {"model": remote.fingerprint}
        self.handle = self.connection.request("open_session", self.args).args["session"]
        self.last_reply: dict = {}  # the last reply's arguments: length, io_wait_ms, the server's timings
        self.parked_layer: int | None = None
        self._pending: torch.Tensor | None = None  # the next token, picked from the last logits, not yet returned
        self._unfed: torch.Tensor | None = None  # the last token returned, not yet fed to the model

    def _request(self, op: str, args: dict | None = None, tensors: dict | None = None):
        reply = self.connection.request(op, {**self.args, "session": self.handle, **(args or {})}, tensors)
        self.last_reply = dict(reply.args)
        return reply

    def _logits_args(self) -> dict:
        return {"returns": "logits", "logits_codec": self.logits_codec.value}

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt; its last position's logits, [batch, vocab]."""
        reply = self._request("prefill", self._logits_args(),
                              {"input_ids": OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)})
        return self._took_step(reply.tensors["logits"])

    def run_to_layer(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Run a step (the prompt, or tokens after it) up to decoder layer `layer` and park it there.

        Returns that layer's output hidden state, [batch, tokens, hidden]; the KV stays on the server.
        """
        reply = self._request("run_to_layer", {"layer": layer},
                              {"input_ids": OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)})
        self.parked_layer = layer
        self._pending = self._unfed = None
        return reply.tensors["activation"]

    def resume(self, activation: torch.Tensor) -> torch.Tensor:
        """Continue the parked step from layer N+1 with `activation`; the last position's logits."""
        reply = self._request("resume", self._logits_args(),
                              {"activation": OutgoingTensor(activation, TensorKind.ACTIVATION)})
        self.parked_layer = None
        return self._took_step(reply.tensors["logits"])

    def cancel(self) -> None:
        """Drop the parked step; the session holds what it held before it."""
        self._request("cancel")
        self.parked_layer = None

    def generate(self, max_new_tokens: int = 50) -> torch.Tensor:
        """The next `max_new_tokens` greedy tokens, [batch, max_new_tokens], on from the last step."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        tokens = []
        if self._pending is not None:
            tokens.append(self._pending)
            self._pending = None
        elif self._unfed is None:
            raise ValueError("nothing to continue from: prefill(), or run_to_layer() then resume(), first")
        while len(tokens) < max_new_tokens:
            feed = tokens[-1] if tokens else self._unfed
            args = {"returns": self.returns}
            reply = self._request("decode", args, {"input_ids": OutgoingTensor(feed, TensorKind.TOKEN_IDS)})
            tokens.append(reply.tensors["token"] if "token" in reply.tensors else greedy(reply.tensors["logits"]))
        self._unfed = tokens[-1]
        return torch.cat(tokens, dim=1)

    def offload(self) -> int:
        """Page this session's KV to the server's host memory now; the bytes moved. It comes back on use."""
        return int(self._request("offload").args["bytes"])

    def stats(self) -> dict:
        """State, length, resident and paged bytes, page-in/out counts and times of this session."""
        return dict(self.connection.request("session_stats", {**self.args, "session": self.handle}).args)

    def close(self) -> None:
        if self.handle is not None:
            self.connection.request("close_session", {"session": self.handle})
            self.handle = None

    def _took_step(self, logits: torch.Tensor) -> torch.Tensor:
        self._pending, self._unfed = greedy(logits), None
        return logits

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
