"""Models resident on the server's device, keyed by the fingerprint of their weights.

A model is registered (config, dtype, tensor list), then its weights arrive in
chunks; each tensor is copied into the on-device model as it lands and digested, so
an upload that breaks can be resumed by sending only the missing tensors. When all
have arrived the digests must combine to the registered fingerprint. Models that no
session uses are evicted, least recently used first, when a new one would overflow
the memory budget.

A model whose weights alone exceed the budget is streamed (seed 003): it is built in
host memory, receives its upload there, and once complete its decoder layers run
through a ring on the device (`streamer.stream_model`) while the embeddings, final
norm, lm_head and as many decoder layers as fit stay resident. Which layers, and the
ring's size, are a residency plan (`djinn.server.residency`) made at register time
against the budget's room, leaving free the KV of `stream_kv_tokens` tokens and the
budget's forward reserve; the resident parts and the ring count against the budget.
The plan is not remade as KV grows: sessions past its reserve page their KV to host
(or fail with out_of_memory) through the same budget as any other session.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable

import torch

from djinn import models
from djinn import host_memory
from djinn.errors import BadRequest, LimitExceeded, ModelNotFound, OutOfMemory, UploadIncomplete, quote
from djinn.server.device_budget import DeviceBudget
from djinn.server.limits import ServerLimits, checked_config, implied_tensors
from djinn.server.residency import ResidencyPlan, plan_residency
from djinn.server.streamer import (RingTooSmall, StreamingHandle, find_decoder_layers, fits_in_budget,
                                   packed_layer_bytes, stream_model)
from djinn.units import gib, human

if TYPE_CHECKING:
    from djinn.server.fast_decode import FastDecode

log = logging.getLogger("djinn.server.weights")

# A decode layer's compute over its copy time on a GPU, for the residency plan's prefetch
# depth: its compute reads the layer from device memory, its copy crosses PCIe. H200: 4.8
# TB/s HBM against ~55 GB/s Gen5 (0.011); the seed's L4: 300 GB/s GDDR6 against ~25 GB/s
# Gen4 (0.08). 0.2 bounds both with room: any value below 0.5 gives the same depth.
GPU_DECODE_COMPUTE_PER_TRANSFER = 0.2


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class CachedModel:
    fingerprint: str
    model: torch.nn.Module
    config: object
    dtype: torch.dtype
    expected: dict[str, TensorEntry]
    weight_bytes: int
    digests: dict[str, bytes] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # open sessions, and one while its upload is in progress
    ring_bytes: int = 0  # capacity of the device ring the streamed layers run through
    plan: ResidencyPlan | None = None  # a streamed model's resident layers and ring
    stream: StreamingHandle | None = None  # installed when a streamed model's upload completes
    config_key: str = ""  # the registered config, canonical: a re-register must match it
    peers: set[bytes] = field(default_factory=set)  # connections that registered it: what `stats` shows them
    name: str | None = None  # a model the server loaded itself (--model NAME): never evicted
    partial: dict[str, "_Partial"] = field(default_factory=dict)  # tensors arriving in row slices
    fast: FastDecode | None = None  # its fast decode path, built at its first use (djinn.server.fast_decode)

    # Read on every session request's admission; a config's attribute lookups cost
    # microseconds each, inside the request's IO wait.
    @cached_property
    def kv_bytes_per_token(self) -> int:
        return models.kv_bytes_per_token(self.config, self.dtype)

    @cached_property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def streamed(self) -> bool:
        return self.ring_bytes > 0

    @property
    def device_bytes(self) -> int:
        """What the model holds of the device budget: its weights, or, streamed, its resident parts and ring."""
        return self.plan.device_bytes if self.plan is not None else self.weight_bytes

    def stream_stats(self) -> dict | None:
        if self.stream is None:
            return None
        stats = self.stream.stats
        return {**asdict(stats), "copy_gbps": stats.copy_gbps}

    def release(self) -> None:
        """Free the ring now rather than whenever the garbage collector breaks the hooks' cycle."""
        if self.stream is not None:
            self.stream.remove()
            self.stream = None

    @property
    def complete(self) -> bool:
        return len(self.digests) == len(self.expected)

    @property
    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.digests]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def max_positions(self) -> int:
        return models.max_positions(self.config)


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uploaded_bytes: int = 0


class WeightCache:
    limits: ServerLimits = ServerLimits()  # the server sets its own

    def __init__(self, budget: DeviceBudget, ring_bytes: int | None = None, stream_kv_tokens: int | None = None):
        self.budget = budget
        self.device = budget.device
        self.ring_bytes = ring_bytes  # ring of each model too large for the budget; None: its plan sizes it
        self.stream_kv_tokens = stream_kv_tokens  # KV a streamed model's plan reserves; None: its context
        self.models: dict[str, CachedModel] = {}
        self.names: dict[str, str] = {}  # name -> fingerprint of the models the server loaded itself
        self.counters = CacheCounters()
        budget.hold("weights", lambda: self.resident_bytes)

    @property
    def resident_bytes(self) -> int:
        return sum(m.device_bytes for m in self.models.values())

    def register(self, fingerprint: str, config_values: dict, dtype: torch.dtype,
                 entries: list[TensorEntry], peer: bytes = b"") -> CachedModel:
        """The cached model, or a new empty one awaiting its weights.

        The declared tensors must be exactly those the config implies (checked on a meta
        skeleton, before anything is allocated), so a model is complete only when all of
        them arrived. A fingerprint already here must come with the config and dtype it was
        registered with: the fingerprint covers the weights, not the config that runs them.
        """
        cached = self.models.get(fingerprint)
        if cached is not None:
            _same_registration(cached, config_values, dtype, entries)
            if cached.complete:
                self.counters.hits += 1
            cached.last_used = time.monotonic()
            cached.peers.add(peer)
            return cached
        what = f"model {fingerprint}"
        config = checked_config(config_values, self.limits, what)
        expected = _expected_entries(config, dtype, entries, what)
        in_progress = sum(1 for m in self.models.values() if not m.complete)
        if in_progress >= self.limits.max_uploads:
            raise LimitExceeded(f"{what}: {in_progress} uploads are in progress, the cap is "
                                f"{self.limits.max_uploads}; retry when one completes or expires "
                                f"({self.limits.upload_ttl_s:.0f} s idle)")
        self.counters.misses += 1
        weight_bytes = sum(math.prod(e.shape) * e.dtype.itemsize for e in expected.values())
        plan = None
        if fits_in_budget(weight_bytes, self.budget.limit_bytes):
            self._make_room(weight_bytes, fingerprint, peer)
            try:
                model = models.build_skeleton(config, dtype, self.device)
            except torch.OutOfMemoryError as exc:
                raise OutOfMemory(f"model {fingerprint} ({gib(weight_bytes)}) does not fit on {self.device}: "
                                  f"{exc}") from None
        else:
            _check_host_memory(weight_bytes, what)
            model, plan = self._host_model_to_stream(fingerprint, config, dtype, weight_bytes, peer)
        cached = CachedModel(fingerprint, model, config, dtype, expected, weight_bytes,
                             ring_bytes=plan.ring_bytes if plan else 0, plan=plan,
                             config_key=_config_key(config_values), peers={peer})
        cached.users += 1  # the upload in progress holds the model: eviction skips it until complete
        self.models[fingerprint] = cached
        log.info("registered model %s: %d tensors, %s, awaiting upload", fingerprint, len(expected), human(weight_bytes))
        return cached

    def receive(self, fingerprint: str, tensors: dict[str, torch.Tensor],
                slices: dict[str, int] | None = None) -> CachedModel:
        """Copy a chunk of uploaded weights into the model; verify the fingerprint when whole.

        A tensor named in `slices` is a slice of rows starting at that row: a tensor larger
        than a chunk travels in several messages, in order, so that no one message stalls
        the loop for longer than a chunk takes (its digest is fed slice by slice; a slice
        from row 0 starts the tensor over). Every tensor of the chunk is checked before any
        is written, and a complete model (which sessions may be decoding with) is never
        written again."""
        slices = slices or {}
        cached = self.models.get(fingerprint)
        if cached is None:
            raise ModelNotFound(f"model {fingerprint} is not registered: register it before uploading")
        if cached.complete:
            raise BadRequest(f"model {fingerprint} is complete and immutable: nothing more to upload")
        for name, tensor in tensors.items():
            entry = cached.expected.get(name)
            if entry is None:
                raise BadRequest(f"model {fingerprint} has no tensor {quote(name)}")
            if name in slices:
                _check_slice(cached, entry, tensor, slices[name])
            elif tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise BadRequest(f"tensor {quote(name)}: got {tensor.dtype} {list(tensor.shape)}, "
                                 f"registered {entry.dtype} {list(entry.shape)}")
        state = cached.model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.counters.uploaded_bytes += tensor.numel() * tensor.element_size()
                if name not in slices:
                    state[name].copy_(tensor)
                    cached.partial.pop(name, None)
                    cached.digests[name] = models.tensor_digest(name, tensor)
                    continue
                start, entry = slices[name], cached.expected[name]
                if start == 0:
                    cached.digests.pop(name, None)
                    cached.partial[name] = _Partial(models.tensor_digester(name, entry.dtype, entry.shape))
                partial = cached.partial[name]
                state[name][start:start + tensor.shape[0]].copy_(tensor)
                partial.digester.update(models.tensor_bytes(tensor))
                partial.rows += tensor.shape[0]
                if partial.rows == entry.shape[0]:
                    cached.digests[name] = cached.partial.pop(name).digester.digest()
        cached.last_used = time.monotonic()
        if cached.complete:
            actual = models.combine_digests(cached.digests)
            if actual != fingerprint:
                self._drop_upload(cached, "its weights hash to another fingerprint")
                raise BadRequest(f"uploaded weights hash to {actual}, not the registered fingerprint {fingerprint}")
            cached.users -= 1  # the upload's hold
            if cached.streamed:
                self._start_streaming(cached)
            log.info("model %s complete and cached", fingerprint)
        return cached

    def preload(self, name: str, model: torch.nn.Module) -> CachedModel:
        """A model built on the server (`--model NAME`): complete, cached under its fingerprint and its name."""
        state = model.state_dict()
        unique = models.unique_state(model)
        weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
        self._make_room(weight_bytes, name)
        digests = {n: models.tensor_digest(n, t) for n, t in state.items()}
        fingerprint = models.combine_digests(digests)
        cached = CachedModel(fingerprint, model, model.config, next(model.parameters()).dtype,
                             {n: TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()}, weight_bytes,
                             digests=digests, name=name)
        self.models[fingerprint] = cached
        self.names[name] = fingerprint
        log.info("loaded model %s (%s): %s", name, fingerprint, human(weight_bytes))
        return cached

    def named(self, name: str) -> CachedModel:
        fingerprint = self.names.get(name)
        if fingerprint is None:
            raise ModelNotFound(f"no model named {name!r} on this server (loaded: {sorted(self.names) or 'none'}; "
                                f"start it with --model {name})")
        return self.get(fingerprint)

    def get(self, fingerprint: str) -> CachedModel:
        cached = self.models.get(fingerprint)
        if cached is None:
            raise ModelNotFound(f"model {fingerprint} is not cached on this server (evicted or never uploaded)")
        if not cached.complete:
            raise UploadIncomplete(f"model {fingerprint}: {len(cached.missing)} of {len(cached.expected)} "
                                   f"tensors not uploaded yet")
        cached.last_used = time.monotonic()
        return cached

    def expire_uploads(self, now: float | None = None) -> int:
        """Free the models whose upload sent nothing for `upload_ttl_s` (a client that gave up); how many."""
        now = time.monotonic() if now is None else now
        stale = [m for m in self.models.values()
                 if not m.complete and now - m.last_used > self.limits.upload_ttl_s]
        for cached in stale:
            self._drop_upload(cached, f"its upload sent nothing for {self.limits.upload_ttl_s:.0f} s")
        return len(stale)

    def _drop_upload(self, cached: CachedModel, why: str) -> None:
        del self.models[cached.fingerprint]
        cached.release()
        log.warning("dropped the partial upload of model %s: %s", cached.fingerprint, why)

    def _make_room(self, weight_bytes: int, fingerprint: str, peer: bytes | None = None) -> None:
        """Evict models no session uses, least recently used first, until `weight_bytes` fit the budget.

        For `peer` (the connection registering), only within fair shares: its own models
        (those it registered too), and another client's only while that client holds more
        than its share of the budget, so that one client filling the budget evicts its own
        models and never another's within their share (`FairShare`). None: the server's own
        load (`--model`), which may take any idle model."""
        shares = FairShare(self.models.values(), self.budget.limit_bytes, peer)
        protected = 0
        for victim in sorted(self.models.values(), key=lambda m: m.last_used):
            if not self.budget.shortfall(weight_bytes):
                break
            if victim.users or victim.name is not None:
                continue
            if peer is not None and not shares.may_evict(victim, peer):
                protected += 1
                continue
            del self.models[victim.fingerprint]
            shares.forget(victim)
            victim.release()
            self.counters.evictions += 1
            log.warning("evicted model %s (%s) to make room for %s", victim.fingerprint,
                        human(victim.weight_bytes), fingerprint)
        if self.budget.shortfall(weight_bytes):
            kept = (f"; {protected} idle models of other clients are within their fair share "
                    f"({gib(shares.share)} each of {shares.clients} clients) and are not evicted for this one"
                    if protected else "")
            raise OutOfMemory(f"model {fingerprint} needs {gib(weight_bytes)}, which does not fit beside the models "
                              f"in use and the KV caches: {self.budget.describe()}{kept}")

    def _host_model_to_stream(self, fingerprint: str, config, dtype: torch.dtype,
                              weight_bytes: int, peer: bytes | None) -> tuple[torch.nn.Module, ResidencyPlan]:
        """A model whose weights exceed the budget, built in host memory; and its residency plan.

        Refused before any upload when even streamed it cannot run here: its largest layer
        does not fit a given ring, or its resident parts, the ring and the KV reserve
        exceed the budget's room."""
        model = models.build_skeleton(config, dtype, self.device, weights_device="cpu")  # buffers on the device
        layers = find_decoder_layers(model)
        layer_bytes = tuple(packed_layer_bytes(layer) for layer in layers)
        fixed = weight_bytes - sum(p.numel() * p.element_size() for p in layers.parameters())
        ring = self.ring_bytes
        if ring is not None and max(layer_bytes) > ring:
            raise RingTooSmall(f"model {fingerprint}: a decoder layer of {max(layer_bytes) / 2**20:.1f} MiB does not "
                               f"fit the {ring / 2**20:.1f} MiB ring; start the server with a larger --ring-buffer-gb")
        kv_tokens = self.stream_kv_tokens if self.stream_kv_tokens is not None else models.max_positions(config)
        kv = models.kv_bytes_per_token(config, dtype) * kv_tokens
        minimum = fixed + (ring if ring is not None else 2 * max(layer_bytes)) + kv
        if not fits_in_budget(minimum, self.budget.limit_bytes - self.budget.reserve_bytes):
            raise OutOfMemory(f"model {fingerprint} does not fit even streamed: its always-resident parts "
                              f"({gib(fixed)}), a ring and the KV of {kv_tokens} tokens ({gib(kv)}) exceed the "
                              f"{gib(self.budget.limit_bytes)} budget; lower --stream-kv-tokens or raise the budget")
        self._make_room(minimum, fingerprint, peer)
        reserve = self.budget.reserve_bytes
        try:
            plan = plan_residency(
                available_bytes=self.budget.room() + reserve, layer_bytes=layer_bytes, fixed_bytes=fixed,
                kv_bytes=kv, activation_bytes=reserve, ring_bytes=ring,
                compute_per_transfer=GPU_DECODE_COMPUTE_PER_TRANSFER if self.device.type == "cuda" else None)
        except OutOfMemory as exc:
            raise OutOfMemory(f"model {fingerprint} does not fit even streamed beside the models in use: "
                              f"{exc}") from None
        log.info("model %s (%s) exceeds the %s budget: streaming through a %s ring; residency plan: %s",
                 fingerprint, gib(weight_bytes), gib(self.budget.limit_bytes), gib(plan.ring_bytes), plan.why)
        return model, plan

    def _start_streaming(self, cached: CachedModel) -> None:
        plan = cached.plan
        try:
            cached.stream = stream_model(cached.model, device=self.device, capacity_bytes=plan.ring_bytes,
                                         prefetch_depth=plan.prefetch_depth, resident_layers=plan.resident_layers)
        except (torch.OutOfMemoryError, RingTooSmall) as exc:
            del self.models[cached.fingerprint]
            if isinstance(exc, RingTooSmall):
                raise
            raise OutOfMemory(f"model {cached.fingerprint}: its resident parts and the "
                              f"{gib(cached.ring_bytes)} ring do not fit on {self.device}: {exc}") from None
        log.info("model %s streams %d decoder layers (%s) through a %s ring on %s; %d stay resident",
                 cached.fingerprint, len(cached.stream.layer_bytes), gib(sum(cached.stream.layer_bytes)),
                 gib(cached.ring_bytes), self.device, len(plan.resident_layers))


class FairShare:
    """Each client's share of the device budget for cached models, and what it holds of it.

    A client is a connection that registered (or attached to) a model the server did not
    load itself; a model held by several counts a part to each. The share is the budget
    over the clients holding models (the registering one included): a client over it is
    the one whose models others may evict. Per connection, since that is what the server
    can tell apart: a client that opens several connections gets several shares (an
    authenticated client is trusted not to, as with the other caps)."""

    def __init__(self, models: Iterable[CachedModel], budget_bytes: int, peer: bytes | None):
        self._held: dict[bytes, float] = {} if peer is None else {peer: 0.0}
        for model in models:
            self._add(model, 1)
        self.clients = max(len(self._held), 1)
        self.share = budget_bytes / self.clients

    def _add(self, model: CachedModel, sign: int) -> None:
        if model.name is not None or not model.peers:
            return  # the server's own models are nobody's share
        part = model.device_bytes / len(model.peers)
        for holder in model.peers:
            self._held[holder] = self._held.get(holder, 0.0) + sign * part

    def held(self, peer: bytes) -> float:
        return self._held.get(peer, 0.0)

    def may_evict(self, victim: CachedModel, peer: bytes) -> bool:
        """Whether `peer` may evict `victim`: it holds the model itself, or every holder is over its share."""
        return peer in victim.peers or all(self.held(holder) > self.share for holder in victim.peers)

    def forget(self, model: CachedModel) -> None:
        self._add(model, -1)


@dataclass
class _Partial:
    """A tensor received in row slices so far: its digest's state, and the rows it has."""
    digester: object
    rows: int = 0


def _check_slice(cached: CachedModel, entry: TensorEntry, tensor: torch.Tensor, start: object) -> None:
    name = entry.name
    expected = cached.partial[name].rows if name in cached.partial else 0
    if not isinstance(start, int) or isinstance(start, bool) or start not in (0, expected):
        raise BadRequest(f"tensor {quote(name)}: a slice must start at row 0 or at row {expected}, where the "
                         f"last one ended; got {quote(start)}")
    if (tensor.dtype != entry.dtype or tensor.dim() != len(entry.shape) or not entry.shape
            or tuple(tensor.shape[1:]) != entry.shape[1:] or start + tensor.shape[0] > entry.shape[0]):
        raise BadRequest(f"tensor {quote(name)}: a slice of {tensor.dtype} {list(tensor.shape)} from row {start} "
                         f"does not fit the registered {entry.dtype} {list(entry.shape)}")


def _config_key(values: dict) -> str:
    # transformers writes its own version into every config: two clients on different
    # releases still register the same model.
    return json.dumps({k: v for k, v in values.items() if k != "transformers_version"}, sort_keys=True, default=str)


def _same_registration(cached: CachedModel, config_values: object, dtype: torch.dtype,
                       entries: list[TensorEntry]) -> None:
    if dtype != cached.dtype or not isinstance(config_values, dict) or _config_key(config_values) != cached.config_key:
        raise BadRequest(f"model {cached.fingerprint} is registered here with another config or dtype "
                         f"({cached.dtype}); the same weights under a different config would compute "
                         f"something else")
    if len(entries) != len(cached.expected) or any(cached.expected.get(e.name) != e for e in entries):
        raise BadRequest(f"model {cached.fingerprint}: the declared tensors are not the {len(cached.expected)} "
                         f"the config implies (not declared, or other shapes)")


def _expected_entries(config, dtype: torch.dtype, entries: list[TensorEntry], what: str) -> dict[str, TensorEntry]:
    """The declared tensors, when they are exactly the config's; a register with fewer
    (`tensors: []` once completed at once and served zeros) or other ones is refused."""
    implied = implied_tensors(config, dtype, what)
    declared = {e.name: e for e in entries}
    if len(declared) != len(entries):
        raise BadRequest(f"{what}: a tensor is declared twice")
    for entry in entries:
        if implied.get(entry.name) != (entry.dtype, entry.shape):
            raise BadRequest(f"{what}: tensor {quote(entry.name)} {entry.dtype} {list(entry.shape)} "
                             f"does not match the config's architecture")
    missing = [name for name in implied if name not in declared]
    if missing:
        raise BadRequest(f"{what}: {len(missing)} tensors the config implies are not declared "
                         f"(first: {quote(missing[0])}); a register declares every tensor of the model")
    return declared


def _check_host_memory(weight_bytes: int, what: str) -> None:
    """A streamed model keeps its weights in host memory: refused when they do not fit
    (a 48.5 GiB model had been accepted on a 23 GiB host)."""
    available = host_memory.available_bytes()
    if weight_bytes > available:
        raise OutOfMemory(f"{what}: its {weight_bytes / 2**30:.2f} GiB of weights stream from host memory, "
                          f"which has {available / 2**30:.2f} GiB available")


