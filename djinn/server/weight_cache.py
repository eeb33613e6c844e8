"""Models resident on the server's device, keyed by the fingerprint of their weights.

A model is registered (config, dtype, tensor list), then its weights arrive in
chunks; each tensor is copied into the on-device model as it lands and digested, so
an upload that breaks can be resumed by sending only the missing tensors. When all
have arrived the digests must combine to the registered fingerprint. Models that no
session uses are evicted, least recently used first, when a new one would overflow
the memory budget.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from djinn import models
from djinn.errors import BadRequest, ModelNotFound, OutOfMemory, UploadIncomplete

log = logging.getLogger("djinn.server.weights")


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
    users: int = 0  # open sessions

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
        config = self.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uploaded_bytes: int = 0


class WeightCache:
    def __init__(self, device: torch.device, budget_bytes: int, reserve_bytes=lambda: 0):
        self.device = device
        self.budget_bytes = budget_bytes
        self._reserved = reserve_bytes  # bytes others (the KV sessions) hold within the budget
        self.models: dict[str, CachedModel] = {}
        self.counters = CacheCounters()

    @property
    def resident_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.models.values())

    def register(self, fingerprint: str, config_values: dict, dtype: torch.dtype,
                 entries: list[TensorEntry]) -> CachedModel:
        """The cached model, or a new empty one awaiting its weights."""
        cached = self.models.get(fingerprint)
        if cached is not None:
            if cached.complete:
                self.counters.hits += 1
            cached.last_used = time.monotonic()
            return cached
        self.counters.misses += 1
        try:
            config = models.config_from_dict(config_values)
        except Exception as exc:
            raise BadRequest(f"model {fingerprint}: config is not a HuggingFace config: {exc}") from None
        weight_bytes = sum(_numel(e.shape) * _itemsize(e.dtype) for e in entries)
        self._make_room(weight_bytes, fingerprint)
        try:
            model = models.build_skeleton(config, dtype, self.device)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"model {fingerprint} ({weight_bytes} bytes) does not fit on {self.device}: {exc}") from None
        state = model.state_dict()
        for entry in entries:
            target = state.get(entry.name)
            if target is None or tuple(target.shape) != entry.shape or target.dtype != entry.dtype:
                raise BadRequest(f"model {fingerprint}: tensor {entry.name!r} {entry.dtype} {list(entry.shape)} "
                                 f"does not match the config's architecture")
        cached = CachedModel(fingerprint, model, config, dtype, {e.name: e for e in entries}, weight_bytes)
        self.models[fingerprint] = cached
        log.info("registered model %s: %d tensors, %.1f MB, awaiting upload",
                 fingerprint, len(entries), weight_bytes / 1e6)
        return cached

    def receive(self, fingerprint: str, tensors: dict[str, torch.Tensor]) -> CachedModel:
        """Copy a chunk of uploaded weights into the model; verify the fingerprint when whole."""
        cached = self.models.get(fingerprint)
        if cached is None:
            raise ModelNotFound(f"model {fingerprint} is not registered: register it before uploading")
        state = cached.model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                entry = cached.expected.get(name)
                if entry is None:
                    raise BadRequest(f"model {fingerprint} has no tensor {name!r}")
                if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                    raise BadRequest(f"tensor {name!r}: got {tensor.dtype} {list(tensor.shape)}, "
                                     f"registered {entry.dtype} {list(entry.shape)}")
                state[name].copy_(tensor)
                cached.digests[name] = models.tensor_digest(name, tensor)
                self.counters.uploaded_bytes += tensor.numel() * tensor.element_size()
        if cached.complete:
            actual = models.combine_digests(cached.digests)
            if actual != fingerprint:
                del self.models[fingerprint]
                raise BadRequest(f"uploaded weights hash to {actual}, not the registered fingerprint {fingerprint}")
            log.info("model %s complete and cached", fingerprint)
        return cached

    def get(self, fingerprint: str) -> CachedModel:
        cached = self.models.get(fingerprint)
        if cached is None:
            raise ModelNotFound(f"model {fingerprint} is not cached on this server (evicted or never uploaded)")
        if not cached.complete:
            raise UploadIncomplete(f"model {fingerprint}: {len(cached.missing)} of {len(cached.expected)} "
                                   f"tensors not uploaded yet")
        cached.last_used = time.monotonic()
        return cached

    def _make_room(self, weight_bytes: int, fingerprint: str) -> None:
        def used() -> int:
            return self.resident_bytes + self._reserved()
        for victim in sorted(self.models.values(), key=lambda m: m.last_used):
            if used() + weight_bytes <= self.budget_bytes:
                break
            if victim.users == 0:
                del self.models[victim.fingerprint]
                self.counters.evictions += 1
                log.warning("evicted model %s (%.1f MB) to make room for %s",
                            victim.fingerprint, victim.weight_bytes / 1e6, fingerprint)
        if used() + weight_bytes > self.budget_bytes:
            raise OutOfMemory(f"model {fingerprint} needs {weight_bytes / 1e9:.2f} GB; the budget is "
                              f"{self.budget_bytes / 1e9:.2f} GB with {used() / 1e9:.2f} GB held by models in use "
                              f"and KV caches")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
