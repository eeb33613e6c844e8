"""The server's compute: validates model inputs and runs forwards on its device.

All modes share these calls: a stateless forward (weights shipped or cached, KV
shipped) and session prefill/decode (KV resident in the session store). Greedy
tokens are picked here for clients that want only the token.
"""
from __future__ import annotations

import json

import torch
from djinn import kv, models
from djinn.decoding import forward_last
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.session_store import Session, SessionStore
from djinn.server.weight_cache import CachedModel, WeightCache

ID_DTYPES = (torch.int64, torch.int32)
# CPU GEMM kernels take different code paths for misaligned operands and then differ
# in the last bits; received frames start wherever libzmq put them.
KERNEL_ALIGNMENT = 64


class Executor:
    def __init__(self, device: torch.device, weights: WeightCache, sessions: SessionStore, budget_bytes: int):
        self.device = device
        self.weights = weights
        self.sessions = sessions
        self.budget_bytes = budget_bytes
        self._skeletons: dict[str, torch.nn.Module] = {}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A received tensor where compute wants it: on the device, suitably aligned."""
        if self.device.type == "cpu" and tensor.data_ptr() % KERNEL_ALIGNMENT:
            return tensor.clone()
        return tensor.to(self.device)

    def memory_in_use(self) -> int:
        return self.weights.resident_bytes + self.sessions.kv_bytes

    # -- inputs --------------------------------------------------------------------
    def token_ids(self, ids: torch.Tensor | None, name: str, vocab_size: int, past: int,
                  max_positions: int, batch: int | None = None) -> torch.Tensor:
        if ids is None:
            raise BadRequest(f"request has no '{name}' tensor")
        if ids.dtype not in ID_DTYPES:
            raise BadRequest(f"'{name}' must be int64 or int32 token ids, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise BadRequest(f"'{name}' must have shape [batch, tokens] with both > 0, got {list(ids.shape)}")
        if batch is not None and ids.shape[0] != batch:
            raise BadRequest(f"'{name}' has batch {ids.shape[0]}, the KV cache holds batch {batch}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise BadRequest(f"'{name}' holds token id {low if low < 0 else high} outside the vocabulary [0, {vocab_size})")
        if past + ids.shape[1] > max_positions:
            raise BadRequest(f"{past} cached + {ids.shape[1]} new tokens exceed the model's context of {max_positions}")
        return ids.to(self.device, torch.int64)

    def _reserve_kv(self, cached: CachedModel, batch: int, tokens: int) -> None:
        need = batch * tokens * models.kv_bytes_per_token(cached.config, cached.dtype)
        if self.memory_in_use() + need > self.budget_bytes:
            raise OutOfMemory(f"{need / 1e6:.1f} MB more KV cache would exceed the {self.budget_bytes / 1e9:.2f} GB "
                              f"budget ({self.memory_in_use() / 1e9:.2f} GB in use)")

    # -- sessions ------------------------------------------------------------------
    def session_step(self, session: Session, ids: torch.Tensor | None) -> torch.Tensor:
        """Prefill (empty session) or decode (later calls): the last position's logits."""
        cached = session.model
        batch = kv.to_pairs(session.cache)[0][0].shape[0] if session.length else None
        ids = self.token_ids(ids, "input_ids", cached.vocab_size, session.length, cached.max_positions, batch)
        self._reserve_kv(cached, ids.shape[0], ids.shape[1])
        cache = session.cache if session.cache is not None else kv.from_pairs([])
        logits = self._run(cached.model, ids, cache, {})
        self.sessions.store(session, cache)
        return logits

    # -- stateless -----------------------------------------------------------------
    def stateless_step(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], config, ids: torch.Tensor | None,
                       pairs: kv.KVPairs) -> tuple[torch.Tensor, kv.KVPairs]:
        vocab = model.get_input_embeddings().num_embeddings
        past = pairs[0][0].shape[-2] if pairs else 0
        batch = pairs[0][0].shape[0] if pairs else None
        max_positions = getattr(config, "max_position_embeddings", None) or config.n_positions
        ids = self.token_ids(ids, "input_ids", vocab, past, max_positions, batch)
        cache = kv.from_pairs([(self.on_device(k), self.on_device(v)) for k, v in pairs])
        logits = self._run(model, ids, cache, {n: self.on_device(t) for n, t in weights.items()})
        return logits, kv.to_pairs(cache)

    def skeleton(self, config_values: dict, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
        """An architecture without weights of its own, for forwards with shipped weights."""
        key = json.dumps(config_values, sort_keys=True, default=str) + str(dtype)
        if key not in self._skeletons:
            try:
                config = models.config_from_dict(config_values)
            except Exception as exc:
                raise BadRequest(f"config is not a HuggingFace config: {exc}") from None
            self._skeletons[key] = models.build_skeleton(config, dtype, self.device)
        model = self._skeletons[key]
        return model, model.config

    def check_kv(self, pairs: kv.KVPairs, config) -> None:
        layers = config.num_hidden_layers
        if pairs and len(pairs) != layers:
            raise BadRequest(f"KV cache has {len(pairs)} layers, the model has {layers}")
        for index, (k, v) in enumerate(pairs):
            if k.dim() != 4 or k.shape != v.shape or k.shape[:3] != pairs[0][0].shape[:3]:
                raise BadRequest(f"KV layer {index}: keys {list(k.shape)} and values {list(v.shape)} do not "
                                 f"match [batch, heads, tokens, head_dim] of layer 0")

    # -- the forward ---------------------------------------------------------------
    def _run(self, model: torch.nn.Module, ids: torch.Tensor, cache, weights: dict) -> torch.Tensor:
        try:
            return forward_last(model, ids, cache, weights)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"forward ran out of device memory: {exc}") from None
        except (RuntimeError, ValueError, IndexError) as exc:
            raise BadRequest(f"forward failed on these inputs: {exc}") from None
