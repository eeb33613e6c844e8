"""The client side: `connect`, `Client.load`, and `RemoteModel.generate`.

`generate` takes HF's arguments and runs one decoding loop for every mode (eos,
padding of finished rows and the stop as HF's `_sample` does them); a mode only
changes the step driver underneath (local forward, stateless forward with shipped KV,
or a session whose KV stays on the server). Where the logits reach the client the
client's `Sampler` picks the token; in a session the server's does, and only the token
comes back. Each step records its bytes and the server's timings, summarised in
`RemoteModel.last_stats`. `RemoteModel.session()` drives a server-side session one
step at a time instead: breakpoints, steering, then greedy decoding.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import GenerationConfig
from transformers.generation import GenerateDecoderOnlyOutput

from djinn import generation, interventions, kv, models
from djinn.decoding import Padding, forward_last, forward_logits, greedy
from djinn.errors import ModelNotFound
from djinn.models import config_dict
from djinn.modes import DECODE_CHOICES, SHIPPED_WEIGHT_PREFIX, Mode, resolve
from djinn.pool import PlacementPolicy, PoolConnection, directory_for
from djinn.sampling import Sampler, SamplingParams
from djinn.server.interventions import SAVED_PREFIX, InterventionRun
from djinn.transport import DEFAULT_TIMEOUT_S, ByteCounters, ClientConnection, Codec, OutgoingTensor, TensorKind
from djinn.transport.security import ClientSecurity
from djinn.transport.sockets import HELLO_TIMEOUT_S
from djinn.transport.wire import DTYPE_NAMES, DTYPES

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


def connect(address: str | Sequence[str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            auth_token_file: str | Path | None = None, curve_server_key_file: str | Path | None = None,
            curve_client_key_file: str | Path | None = None, hello_timeout_s: float = HELLO_TIMEOUT_S,
            placement: PlacementPolicy = PlacementPolicy()) -> "Client":
    """A client of the server at `address`, confirmed by a ZeroMQ handshake within
    `hello_timeout_s` and then a `hello`.

    `address` may name a pool instead (`djinn.pool.directory`): a list of addresses, a string
    of them separated by commas, or `ray:NAME`; the client is the same, its requests go to the
    server holding their model or session, and `placement` says how many servers hold each
    uploaded model (every one by default).
    `timeout_s` is each request's; a server that is not there (or refuses these
    credentials) fails here, fast, naming the address. CURVE (`--curve-secret-key-file`
    on the server) needs the server's public key file and this client's secret key file.
    """
    token = Path(auth_token_file).read_text().strip() if auth_token_file else None
    security = ClientSecurity.from_files(token, curve_server_key_file, curve_client_key_file)
    address = address if address is not None and not isinstance(address, str) else server_address(address)
    pool = directory_for(address)
    if pool is not None:
        connection = PoolConnection(pool, timeout_s=timeout_s, auth_token=token, security=security,
                                    placement=placement)
    else:
        connection = ClientConnection(address, timeout_s=timeout_s, auth_token=token, security=security)
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
    gc_ms: float = 0.0  # the server's garbage-collection pauses since its previous reply to this session

    @classmethod
    def of(cls, wall_ms: float, counted: ByteCounters, server: dict) -> "StepRecord":
        """A request's record from its wall time, its bytes and the timings its reply carried."""
        return cls(wall_ms, counted, server.get("queue_ms", 0.0), server.get("compute_ms", 0.0),
                   server.get("gc_ms", 0.0))


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
    stop_reason: str = "max_new_tokens"  # or "eos" (every row finished), "context_limit" (the model's context)
    steps: tuple[StepRecord, ...] = field(repr=False, default=())

    @classmethod
    def from_steps(cls, mode: str, batch: int, prompt_tokens: int, steps: list[StepRecord],
                   stop_reason: str = "max_new_tokens") -> "GenerationStats":
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
            stop_reason=stop_reason, steps=tuple(steps))


@dataclass(frozen=True)
class Step:
    token: torch.Tensor  # [batch, 1], on the CPU
    logits: torch.Tensor | None  # [batch, vocab], raw
    scores: torch.Tensor | None  # [batch, vocab], after the logits processors
    server: dict


@dataclass(frozen=True)
class TraceResult:
    """What a traced forward or generate brought back: only what was asked for."""
    logits: torch.Tensor | None  # [batch, vocab] (last position), [batch, tokens, vocab] (logits="all"),
    # or a generate's [batch, steps, vocab] when asked
    saved: dict[str, torch.Tensor]  # each save's key -> its value (steps concatenated along the positions)
    tokens: torch.Tensor | None = None  # a generate's new tokens, [batch, steps]
    per_step: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # per_step=True: key -> step -> value


def _intervention_request(given, logits: str = "last", saves_codec: Codec = Codec.RAW,
                          per_step: bool = False) -> tuple[dict, dict]:
    """The args and tensors that carry `given` interventions (and the trace's options) in a request."""
    wire, tensors = interventions.to_wire(list(given))
    args = {"interventions": wire, "logits": logits, "saves_codec": saves_codec.value, "per_step": per_step}
    return args, {name: OutgoingTensor(t, TensorKind.ACTIVATION) for name, t in tensors.items()}


def _saves(tensors: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, torch.Tensor]]]:
    """A reply's saved tensors: `saved.<key>`, or `saved.<step>.<key>` when sent per step."""
    saved, per_step = {}, {}
    for name, value in tensors.items():
        if not name.startswith(SAVED_PREFIX):
            continue
        rest = name.removeprefix(SAVED_PREFIX)
        head, _, key = rest.partition(".")
        if head.isdigit() and key:
            per_step.setdefault(key, {})[int(head)] = value
        else:
            saved[rest] = value
    return saved, per_step


@dataclass(frozen=True)
class ServedModel:
    """A model the server loaded itself (`djinn-server --model NAME`), as `attach` describes it."""
    name: str
    fingerprint: str
    config: dict
    dtype: str
    generation_config: dict

    def skeleton(self) -> torch.nn.Module:
        """The architecture on the meta device, weightless: its config and HF's generation helpers."""
        model = models.build_skeleton(models.config_from_dict(self.config), DTYPES[self.dtype], "meta")
        model.generation_config = GenerationConfig.from_dict(self.generation_config)
        return model


class Client:
    def __init__(self, connection: ClientConnection | PoolConnection):
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

    def load(self, model: torch.nn.Module | str | os.PathLike, mode: str = "full_djinn", *,
             logits_codec: Codec = Codec.ZSTD, upload_chunk_bytes: int = UPLOAD_CHUNK_BYTES,
             decode: str = "auto") -> "RemoteModel":
        """A handle that generates with `model` in `mode`; cached weights are uploaded at most once.

        `model` is a module, or a name: one the server loaded itself (`djinn-server --model
        NAME`), which the cached modes attach to without any weights crossing the wire; else a
        catalogue name (seeded weights) or a local checkpoint directory, built here and uploaded.
        A module's fingerprint is taken at every load, so loading it again after its weights
        changed registers (and uploads) the new weights.

        `decode` (the sessions' modes, remote_cache and full_djinn): `exact` decodes with HF's eager
        forward, bit for bit; `fast` with the server's fast path (a compact Llama/Mistral forward
        over a static KV cache, one CUDA graph per step; on a CPU the same forward, eagerly), its
        logits equal to HF's within rounding; `auto` takes the server's default (fast on CUDA unless
        it runs with --exact, exact on a CPU).
        """
        if decode not in DECODE_CHOICES:
            raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_CHOICES)}")
        resolved = resolve(mode)
        if isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            served = self.attach(name) if resolved.weights == "cached" else None
            if served is not None:
                return RemoteModel(served.skeleton(), resolved, self, served.fingerprint, logits_codec, decode)
            model = models.build(name)
        fingerprint = None
        if resolved.weights == "cached":
            fingerprint = self.upload(model, chunk_bytes=upload_chunk_bytes)
        return RemoteModel(model, resolved, self, fingerprint, logits_codec, decode)

    def attach(self, name: str) -> ServedModel | None:
        """The server's own model of that name; None when it has none and the name builds here."""
        try:
            args = self.connection.request("attach", {"name": name}).args
        except ModelNotFound:
            if name in models.CATALOGUE or os.path.isdir(name):
                return None
            raise
        return ServedModel(name, args["model"], dict(args["config"]), args["dtype"], dict(args["generation_config"]))

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
    """A model bound to an execution mode; `generate` is HF's `generate`, run in that mode."""

    def __init__(self, model: torch.nn.Module, mode: Mode, client: Client | None, fingerprint: str | None,
                 logits_codec: Codec = Codec.ZSTD, decode: str = "auto"):
        self.model = model
        self.mode = mode
        self.client = client
        self.fingerprint = fingerprint
        self.logits_codec = logits_codec
        # Sent only when chosen: a server's default stays the default and older servers are spoken to as before.
        self.session_args = {"model": fingerprint, **({"decode": decode} if decode != "auto" else {})}
        self.last_stats: GenerationStats | None = None
        self.last_logits: torch.Tensor | None = None
        self._loaded_version = _weights_version(model)

    def generate(self, input_ids: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, *,
                 attention_mask: torch.Tensor | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, return_logits: bool = False, **kwargs):
        """HF's `generate` (greedy or sampled; `generate(**tokenizer(texts, padding=True, return_tensors="pt"))`).

        Returns the sequences, [batch, prompt + new], padded as HF pads finished rows; with
        `return_dict_in_generate=True` a `GenerateDecoderOnlyOutput` (sequences, and the
        `scores` / `logits` of each step when `output_scores` / `output_logits`). Sampling
        draws from a generator seeded with `seed` (or one drawn from `generator`, else from
        torch's global generator). A generation that reaches the model's context stops there
        and warns (`last_stats.stop_reason == "context_limit"`). `return_logits=True` keeps
        each step's logits as they crossed the wire in `last_logits`, [batch, new, vocab].
        """
        self._warn_if_weights_changed()
        plan = generation.plan(self.model, input_ids if input_ids is not None else kwargs.pop("inputs", None),
                               attention_mask, generation_config, seed, generator, kwargs)
        want_logits = return_logits or (plan.return_dict and plan.output_logits)
        want_scores = plan.return_dict and plan.output_scores
        driver = self._driver(plan, want_logits, want_scores)
        unfinished = torch.ones(plan.input_ids.shape[0], dtype=torch.bool)
        steps, tokens, logits, scores = [], [], [], []
        reason = "context_limit" if plan.context_limited else "max_new_tokens"
        try:
            feed = plan.input_ids
            for _ in range(plan.max_new_tokens):
                before = self._counters()
                started = time.perf_counter()
                step = driver.step(feed)
                wall = (time.perf_counter() - started) * 1e3
                steps.append(StepRecord.of(wall, self._counters().since(before), step.server))
                token = step.token
                if plan.eos is not None:  # as HF's _sample: a finished row is fed, and padded with, its padding
                    token = torch.where(unfinished[:, None], token, plan.pad_token_id)
                    unfinished &= ~torch.isin(token[:, 0], plan.eos)
                tokens.append(token)
                if want_logits:
                    logits.append(step.logits)
                if want_scores:
                    scores.append(step.scores)
                if not unfinished.any():
                    reason = "eos"
                    break
                feed = token
        finally:
            driver.close()
        batch, prompt = plan.input_ids.shape
        self.last_stats = GenerationStats.from_steps(self.mode.name, batch, prompt, steps, reason)
        self.last_logits = torch.stack(logits, dim=1) if return_logits else None
        sequences = torch.cat([plan.input_ids, *tokens], dim=1)
        if not plan.return_dict:
            return sequences
        # HF returns each step's logits and scores in float32, on the prompt's device.
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(s.float().cpu() for s in scores) if plan.output_scores else None,
            logits=tuple(l.float().cpu() for l in logits) if plan.output_logits else None)

    def session(self) -> "RemoteSession":
        """A session on the server driven step by step: breakpoints, steering, then decoding."""
        return RemoteSession(self)

    def trace(self, input_ids: torch.Tensor, given=(), *, logits: str = "last", saves_codec: Codec = Codec.RAW,
              attention_mask: torch.Tensor | None = None) -> TraceResult:
        """One forward over `input_ids` with the `given` interventions (`djinn.interventions`), no KV kept:
        the logits (the last position's, every position's with logits="all", none with "none") and the saves.

        Remote modes run it on the server (a stateless forward; nothing but the ids, the interventions'
        tensors, the logits and the saves crosses the wire); native_pytorch runs the same hooks here."""
        padding = Padding.of_prompt(attention_mask) if attention_mask is not None else None
        if self.mode.weights == "local":
            device = next(self.model.parameters()).device
            interventions.check_all(list(given))
            run = InterventionRun(self.model, tuple(given), 1, device)  # the server's hooks, run in this process
            ids = input_ids.to(device)
            with run.at(0).installed(*ids.shape):
                out = forward_logits(self.model, ids, kv.from_pairs([]), padding=padding.to(device) if padding else None,
                                     all_positions=logits == "all")
            saved, _ = _saves(run.results())
            return TraceResult(None if logits == "none" else out if logits == "all" else out[:, -1], saved)
        args, tensors = _intervention_request(given, logits, saves_codec)
        tensors["input_ids"] = OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)
        if padding is not None:
            tensors["attention_mask"] = OutgoingTensor(padding.mask, TensorKind.TOKEN_IDS)
            tensors["position_ids"] = OutgoingTensor(padding.positions, TensorKind.TOKEN_IDS)
        if self.fingerprint is None:
            args.update(config=config_dict(self.model), dtype=DTYPE_NAMES[_weights_dtype(self.model)])
            tensors.update({SHIPPED_WEIGHT_PREFIX + n: OutgoingTensor(t, TensorKind.WEIGHT)
                            for n, t in models.unique_state(self.model).items()})
        else:
            args["model"] = self.fingerprint
        reply = self.client.connection.request("forward", {**args, "kv": False}, tensors)
        saved, _ = _saves(reply.tensors)
        return TraceResult(reply.tensors.get("logits"), saved)

    def _counters(self) -> ByteCounters:
        return self.client.counters.snapshot() if self.client is not None else ByteCounters()

    def _warn_if_weights_changed(self) -> None:
        # The server holds the weights of the load; an in-place edit since (load_state_dict,
        # an optimiser step) would otherwise go unnoticed.
        if self.fingerprint is not None and _weights_version(self.model) != self._loaded_version:
            warnings.warn(f"the model's weights changed since client.load(); the server still runs the loaded ones "
                          f"(fingerprint {self.fingerprint}): load the model again to upload the new weights",
                          stacklevel=3)

    def _sampler(self, plan: generation.GenerationPlan, device: torch.device) -> Sampler:
        mask = plan.padding.mask if plan.padding is not None else None
        return Sampler.build(self.model, plan.sampling, plan.input_ids, mask, device)

    def _driver(self, plan: generation.GenerationPlan, want_logits: bool, want_scores: bool):
        if self.mode.weights == "local":
            device = next(self.model.parameters()).device
            return LocalSteps(self.model, self._sampler(plan, device), plan.padding)
        if self.mode.kv == "shipped":
            return StatelessSteps(self.client.connection, self.model, self.fingerprint,
                                  self._sampler(plan, torch.device("cpu")), plan.padding)
        # remote_cache sends back the full logits, raw, by definition; full_djinn only what was asked.
        full_logits = self.mode.returns == "logits"
        returns = ["token", *(["logits"] if full_logits or want_logits else []), *(["scores"] if want_scores else [])]
        codec = Codec.RAW if full_logits else self.logits_codec
        return SessionSteps(self.client.connection, self.session_args, returns, codec, plan)


def _weights_version(model: torch.nn.Module) -> int:
    # torch bumps a tensor's version counter on every in-place write.
    return sum(p._version for p in model.parameters())


class ClientPicks:
    """The drivers whose logits come to the client: the padding advances here and the client's sampler picks."""

    def __init__(self, sampler: Sampler, padding: Padding | None):
        self.sampler = sampler
        self.padding = padding  # the prompt's until the first step has run
        self.started = False

    def _padding_for(self, ids: torch.Tensor) -> Padding | None:
        if self.padding is not None and self.started:
            self.padding = self.padding.next(ids.shape[1])
        self.started = True
        return self.padding

    def _picked(self, ids: torch.Tensor, logits: torch.Tensor, server: dict) -> Step:
        token, scores = self.sampler.pick(ids, logits)
        return Step(token.cpu(), logits.cpu(), scores, server)  # scores stay put unless asked for


class LocalSteps(ClientPicks):
    """native_pytorch: the model on its own device; nothing crosses the wire."""

    def __init__(self, model: torch.nn.Module, sampler: Sampler, padding: Padding | None):
        super().__init__(sampler, padding)
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = kv.from_pairs([])

    def step(self, ids: torch.Tensor) -> Step:
        padding = self._padding_for(ids)
        ids = ids.to(self.device)
        logits = forward_last(self.model, ids, self.cache, padding=padding.to(self.device) if padding else None)
        step = self._picked(ids, logits, {})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return step

    def close(self) -> None:
        self.cache = None


class StatelessSteps(ClientPicks):
    """semantic_blind (weights shipped) and partially_aware (weights cached): KV both ways.

    A padded batch sends its mask and positions with every step too: the server keeps nothing.
    """

    def __init__(self, connection: ClientConnection, model: torch.nn.Module, fingerprint: str | None,
                 sampler: Sampler, padding: Padding | None):
        super().__init__(sampler, padding)
        self.connection = connection
        self.pairs: kv.KVPairs = []
        if fingerprint is None:
            self.args = {"config": config_dict(model), "dtype": DTYPE_NAMES[_weights_dtype(model)]}
            # A tied weight (GPT-2's lm_head is its wte) crosses once; the server ties it back.
            self.weights = {SHIPPED_WEIGHT_PREFIX + n: OutgoingTensor(t, TensorKind.WEIGHT)
                            for n, t in models.unique_state(model).items()}
        else:
            self.args = {"model": fingerprint}
            self.weights = {}

    def step(self, ids: torch.Tensor) -> Step:
        tensors = {"input_ids": OutgoingTensor(ids, TensorKind.TOKEN_IDS), **self.weights}
        padding = self._padding_for(ids)
        if padding is not None:
            tensors["attention_mask"] = OutgoingTensor(padding.mask, TensorKind.TOKEN_IDS)
            tensors["position_ids"] = OutgoingTensor(padding.positions, TensorKind.TOKEN_IDS)
        for (kname, vname), (k, v) in zip(kv.wire_names(len(self.pairs)), self.pairs):
            tensors[kname] = OutgoingTensor(k, TensorKind.KV)
            tensors[vname] = OutgoingTensor(v, TensorKind.KV)
        reply = self.connection.request("forward", self.args, tensors)
        names = kv.wire_names(sum(1 for n in reply.tensors if n.endswith(".k")))
        self.pairs = [(reply.tensors[k], reply.tensors[v]) for k, v in names]
        return self._picked(ids, reply.tensors["logits"], dict(reply.args.get("server", {})))

    def close(self) -> None:
        self.pairs = []


class SessionSteps:
    """remote_cache and full_djinn: KV, padding and sampler stay on the server, which picks the token."""

    def __init__(self, connection: ClientConnection, session_args: dict, returns: list[str], logits_codec: Codec,
                 plan: generation.GenerationPlan):
        self.connection = connection
        self.fingerprint = session_args["model"]
        self.args = {"model": self.fingerprint, "returns": returns, "logits_codec": logits_codec.value}
        self.prefill_args = {"sampling": plan.sampling.as_wire()}
        self.prompt_mask = plan.padding.mask if plan.padding is not None else None
        self.session = connection.request("open_session", session_args).args["session"]
        self.started = False

    def step(self, ids: torch.Tensor) -> Step:
        tensors = {"input_ids": OutgoingTensor(ids, TensorKind.TOKEN_IDS)}
        args = {**self.args, "session": self.session}
        if not self.started:
            args.update(self.prefill_args)
            if self.prompt_mask is not None:
                tensors["attention_mask"] = OutgoingTensor(self.prompt_mask, TensorKind.TOKEN_IDS)
        reply = self.connection.request("decode" if self.started else "prefill", args, tensors)
        self.started = True
        return Step(reply.tensors["token"], reply.tensors.get("logits"), reply.tensors.get("scores"),
                    dict(reply.args.get("server", {})))

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
        self.handle = self.connection.request("open_session", remote.session_args).args["session"]
        self.last_reply: dict = {}  # the last reply's arguments: length, io_wait_ms, the server's timings
        self.last_saved: dict[str, torch.Tensor] = {}  # the saves of the last request that carried interventions
        self.length = 0  # tokens in the session's KV, as the last reply said
        self.parked_layer: int | None = None
        self._pending: torch.Tensor | None = None  # the next token, picked from the last logits, not yet returned
        self._unfed: torch.Tensor | None = None  # the last token returned, not yet fed to the model

    def _request(self, op: str, args: dict | None = None, tensors: dict | None = None):
        reply = self.connection.request(op, {**self.args, "session": self.handle, **(args or {})}, tensors)
        self.last_reply = dict(reply.args)
        self.length = int(reply.args.get("length", self.length))
        return reply

    def _traced(self, op: str, given, tensors: dict, args: dict | None = None, **options):
        """A request carrying interventions; their saves land in `last_saved`."""
        trace_args, trace_tensors = _intervention_request(given, **options)
        reply = self._request(op, {**(args or {}), **trace_args}, {**tensors, **trace_tensors})
        self.last_saved, per_step = _saves(reply.tensors)
        return reply, per_step

    def _logits_args(self) -> dict:
        return {"returns": "logits", "logits_codec": self.logits_codec.value}

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt; its last position's logits, [batch, vocab]."""
        reply = self._request("prefill", self._logits_args(),
                              {"input_ids": OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)})
        return self._took_step(reply.tensors["logits"])

    def run_to_layer(self, input_ids: torch.Tensor, layer: int, given=()) -> torch.Tensor:
        """Run a step (the prompt, or tokens after it) up to decoder layer `layer` and park it there.

        Returns that layer's output hidden state, [batch, tokens, hidden]; the KV stays on the server.
        `given` interventions at sites up to layer N run before the park (their saves: `last_saved`).
        """
        reply, _ = self._traced("run_to_layer", given, {"input_ids": OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)},
                                {"layer": layer})
        self.parked_layer = layer
        self._pending = self._unfed = None
        return reply.tensors["activation"]

    def resume(self, activation: torch.Tensor, given=()) -> torch.Tensor:
        """Continue the parked step from layer N+1 with `activation`; the last position's logits.
        `given` interventions at sites after layer N run on the way (their saves: `last_saved`)."""
        reply, _ = self._traced("resume", given, {"activation": OutgoingTensor(activation, TensorKind.ACTIVATION)},
                                self._logits_args())
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
        if self.parked_layer is not None:
            raise ValueError(f"the session is parked at decoder layer {self.parked_layer}: resume() or cancel() "
                             f"it first")
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

    def trace(self, input_ids: torch.Tensor, given=(), *, logits: str = "last",
              saves_codec: Codec = Codec.RAW) -> TraceResult:
        """One step over `input_ids` (the prompt, or tokens after what the session holds) with the `given`
        interventions: the logits (last position, every position with logits="all"; with "none" only the
        picked token comes back) and the saves. The session's KV keeps what the edited step made, as a
        local hook would leave it."""
        op = "prefill" if self.length == 0 else "decode"
        returns = "token" if logits == "none" else "logits"
        reply, _ = self._traced(op, given, {"input_ids": OutgoingTensor(input_ids, TensorKind.TOKEN_IDS)},
                                {"returns": returns, "logits_codec": self.logits_codec.value}, logits=logits,
                                saves_codec=saves_codec)
        if logits == "none":
            self._pending, self._unfed = reply.tensors["token"], None
            return TraceResult(None, self.last_saved, reply.tensors["token"])
        step_logits = reply.tensors["logits"]
        self._took_step(step_logits[:, -1] if logits == "all" else step_logits)
        return TraceResult(step_logits, self.last_saved)

    def trace_generate(self, input_ids: torch.Tensor | None = None, max_new_tokens: int = 50, given=(), *,
                       return_logits: bool = False, per_step: bool = False, saves_codec: Codec = Codec.RAW,
                       eos_token_id: list[int] | None = None, pad_token_id: int = 0,
                       sampling: SamplingParams | None = None) -> TraceResult:
        """`max_new_tokens` forwards in ONE request, each picking a token, the `given` interventions applied
        at their steps (every step unless they name some), the session's sampler picking (greedy unless a
        prefill set sampling; `sampling`, on an empty session, sets it for the session's life).

        Step 0 is the forward over `input_ids` (the prompt of an empty session, or tokens after what it
        holds); step k the k-th decode step after it. Without `input_ids` the session goes on: step 0
        feeds the token its last step picked. The tokens the steps picked, [batch, steps], the saves once
        at the end (`per_step`: each step's apart), each step's logits on request."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.parked_layer is not None:
            raise ValueError(f"the session is parked at decoder layer {self.parked_layer}: resume() or cancel() it")
        feed = input_ids if input_ids is not None else self._pending if self._pending is not None else self._unfed
        if feed is None:
            raise ValueError("nothing to continue from: pass input_ids, or prefill() first")
        args = {"max_new_tokens": max_new_tokens, "returns": ["token", *(["logits"] if return_logits else [])],
                "logits_codec": self.logits_codec.value, "eos_token_id": list(eos_token_id or []),
                "pad_token_id": pad_token_id, **({"sampling": sampling.as_wire()} if sampling is not None else {})}
        reply, step_saves = self._traced("generate", given, {"input_ids": OutgoingTensor(feed, TensorKind.TOKEN_IDS)},
                                         args, per_step=per_step, saves_codec=saves_codec)
        tokens = reply.tensors["token"]
        self._pending, self._unfed = None, tokens[:, -1:]
        return TraceResult(reply.tensors.get("logits"), self.last_saved, tokens, step_saves)

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
