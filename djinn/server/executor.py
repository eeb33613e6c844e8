"""The server's compute: validates model inputs and runs forwards on its device.

All modes share these calls: a stateless forward (weights shipped or cached, KV
shipped) and session prefill/decode (KV resident in the session store). Greedy
tokens are picked here for clients that want only the token. Sessions may also run a
step to a breakpoint (`run_to_layer`) and `resume` it later.

The memory policy lives here too: before a session step runs, its new KV and its
paged-out layers must fit the budget beside the weights and every other resident KV;
what does not fit is paged out from the least recently used sessions (unless KV swap
is off, when the request fails with `OutOfMemory`), then the session's own pages come
back. A step that fails half-way is rolled back to its starting length.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from typing import Callable

import torch
from transformers import DynamicCache

from djinn import kv, models
from djinn.decoding import forward_last
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.breakpoints import ParkedForward, check_layer, num_decoder_layers
from djinn.server.limits import checked_config, implied_tensors
from djinn.server.session_store import Breakpoint, Session, SessionState, SessionStore
from djinn.server.weight_cache import CachedModel, WeightCache
from djinn.transport import TensorKind, TensorSpec

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

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A received tensor on its way to the device without blocking on the copy."""
        if self.device.type != "cuda":
            return self.on_device(tensor)
        if not tensor.is_pinned():  # one that landed pinned (`landing`) needs no staging copy
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def landing(self, spec: TensorSpec) -> torch.Tensor | None:
        """Pinned host memory to receive a raw activation frame into (the server socket's
        landing on a CUDA device): its upload in `resume` is then a plain async DMA, with no
        0.2-0.6 ms staging copy inside the resume's IO wait.

        Only the size a parked step waits for lands: the header alone, not yet checked
        against its frame, must not make the server pin (and its host allocator cache) memory.
        """
        if spec.kind is not TensorKind.ACTIVATION or not any(
                s.breakpoint is not None and s.breakpoint.forward.activation.nbytes == spec.nbytes
                for s in self.sessions.sessions.values()):
            return None
        return torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=True)

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

    @staticmethod
    def _kv_bytes(cached: CachedModel, batch: int, tokens: int, layers: int | None = None) -> int:
        """KV bytes `tokens` new tokens add over `layers` decoder layers (all when None)."""
        per_token = cached.kv_bytes_per_token
        if layers is not None:
            per_token = per_token * layers // cached.num_layers
        return batch * tokens * per_token

    def _admit(self, session: Session, new_bytes: int, while_paging_in: Callable[[], None] | None = None,
               started: float | None = None) -> None:
        """Room for `new_bytes` of new KV and the session's paged-out layers, then those layers paged in.

        The time from `started` (the request's, else now) until the pages were on the device
        (`SessionStore.page_in`) is the request's IO wait, kept in `session.last_io_wait_ms`;
        `while_paging_in` is host work to overlap with the page-in's copies.
        """
        started = time.perf_counter() if started is None else started
        missing = session.host_bytes
        over = self.memory_in_use() + missing + new_bytes - self.budget_bytes
        if over > 0:
            what = (f"{new_bytes / 1e6:.1f} MB more KV cache" +
                    (f" and {missing / 1e6:.1f} MB paged back in" if missing else ""))
            if not self.sessions.swap:
                raise OutOfMemory(f"{what} would exceed the {self.budget_bytes / 1e9:.2f} GB budget "
                                  f"({self.memory_in_use() / 1e9:.2f} GB in use; KV swap is disabled)")
            freed = self.sessions.page_out_lru(over, keep=session)
            if freed < over:
                raise OutOfMemory(f"{what} would exceed the {self.budget_bytes / 1e9:.2f} GB budget even with "
                                  f"the KV of every other session paged to host "
                                  f"({self.memory_in_use() / 1e9:.2f} GB still in use)")
        session.last_io_wait_ms = (self.sessions.page_in(session, while_paging_in) - started) * 1e3

    def not_parked(self, session: Session) -> None:
        if session.breakpoint is not None:
            raise BadRequest(f"session {session.handle} is parked at decoder layer {session.breakpoint.layer}: "
                             f"resume or cancel it first")

    # -- sessions ------------------------------------------------------------------
    def _begin_step(self, session: Session, ids: torch.Tensor | None) -> tuple[torch.Tensor, int, DynamicCache]:
        """Checked token ids, the session's length before the step and its cache, with room for the step."""
        self.not_parked(session)
        cached = session.model
        ids = self.token_ids(ids, "input_ids", cached.vocab_size, session.length, cached.max_positions,
                             session.batch)
        self._admit(session, self._kv_bytes(cached, ids.shape[0], ids.shape[1]))
        start = session.length
        if session.cache is None:
            session.cache = kv.from_pairs([])
        session.state = SessionState.RUNNING
        return ids, start, session.cache

    def session_step(self, session: Session, ids: torch.Tensor | None) -> torch.Tensor:
        """Prefill (empty session) or decode (later calls): the last position's logits."""
        if self.sessions.graphs is not None and (session.decoder is not None or session.length == 0):
            logits = self._graph_step(session, ids)
            if logits is not None:
                return logits
        ids, start, cache = self._begin_step(session, ids)
        try:
            logits = self._run(session.model.model, ids, cache, {})
        except BaseException:
            self.sessions.rollback(session, start)
            raise
        finally:
            session.state = SessionState.IDLE
        session.recount()
        return logits

    def _graph_step(self, session: Session, ids: torch.Tensor | None) -> torch.Tensor | None:
        """A step through the session's graph slot; None when a new session gets no slot."""
        cached = session.model
        ids = self.token_ids(ids, "input_ids", cached.vocab_size, session.length, cached.max_positions,
                             session.batch)
        slot = session.decoder
        if slot is None:
            graphs = self.sessions.graphs
            slot_bytes = self._kv_bytes(cached, ids.shape[0], graphs.max_len)
            slot = graphs.acquire(cached, ids.shape[0], ids.shape[1], slot_bytes,
                                  room=self.budget_bytes - self.memory_in_use())
            if slot is None:
                return None
            session.decoder = slot
            with self._forward_errors():
                return slot.prefill(ids)
        if ids.shape[1] != 1:
            raise BadRequest(f"session {session.handle} decodes through a CUDA graph: one token per decode step")
        if slot.length >= slot.max_len:
            raise BadRequest(f"session {session.handle} filled its graph slot of {slot.max_len} tokens "
                             f"(--graph-max-len)")
        with self._forward_errors():
            return slot.step(ids)

    def run_to_layer(self, session: Session, ids: torch.Tensor | None, layer: int) -> torch.Tensor:
        """Run a step (prefill or decode) up to decoder layer `layer` and park it; that layer's output."""
        model = session.model.model
        if session.model.streamed:
            # Its ring holds the layers of one forward in flight; a forward parked half-way
            # would leave the ring to whichever forward runs next.
            raise BadRequest(f"model {session.model.fingerprint} streams its layers through the ring buffer: "
                             f"breakpoints need a model resident on the device")
        if session.decoder is not None:
            raise BadRequest(f"session {session.handle} decodes through a CUDA graph slot: breakpoints need an "
                             f"eagerly decoded session (open one and call run_to_layer before any prefill)")
        check_layer(layer, num_decoder_layers(model))
        ids, start, cache = self._begin_step(session, ids)
        try:
            with self._forward_errors():
                parked = ParkedForward(model, layer, lambda: forward_last(model, ids, cache))
        except BaseException:
            session.state = SessionState.IDLE
            self.sessions.rollback(session, start)
            raise
        session.breakpoint = Breakpoint(parked, layer, start, ids.shape[1], ids.shape[0])
        session.state = SessionState.PARKED
        session.recount()
        return parked.activation

    def resume(self, session: Session, activation: torch.Tensor | None) -> torch.Tensor:
        """Continue a parked step from layer N+1 with `activation` as layer N's output; the logits."""
        bp = session.breakpoint
        if bp is None:
            raise BadRequest(f"session {session.handle} is not parked at a breakpoint: run_to_layer first")
        if activation is None:
            raise BadRequest("'resume' needs an 'activation' tensor")
        expected = bp.forward.activation
        if activation.shape != expected.shape or activation.dtype != expected.dtype:
            raise BadRequest(f"the activation is {activation.dtype} {list(activation.shape)}; decoder layer "
                             f"{bp.layer} produced {expected.dtype} {list(expected.shape)}")
        started = time.perf_counter()
        layers_left = session.model.num_layers - 1 - bp.layer
        # The activation's upload is queued while the KV pages cross PCIe, so getting ready
        # costs about the KV transfer; one that arrived in pageable memory (not landed: a
        # compressed frame) is first copied into pinned memory, also beside the KV copies.
        uploaded = []
        # IO_WAIT -> ready: the KV pages and the activation are on the device (the page-in waits for both).
        self._admit(session, self._kv_bytes(session.model, bp.batch, bp.step_tokens, layers_left),
                    while_paging_in=lambda: uploaded.append(self._upload(activation)), started=started)
        activation = uploaded[0]
        session.breakpoint, session.state = None, SessionState.RUNNING
        try:
            with self._forward_errors():
                logits = bp.forward.resume(activation)
        except BaseException:
            self.sessions.rollback(session, bp.start_length)
            raise
        finally:
            session.state = SessionState.IDLE
        session.recount()
        return logits

    def cancel(self, session: Session) -> None:
        self.sessions.cancel_breakpoint(session)

    def offload(self, session: Session) -> int:
        """Page all of the session's resident KV to host now; the bytes moved."""
        if not self.sessions.swap:
            raise BadRequest("KV swap is disabled on this server (--disable-kv-swap): nothing can be offloaded")
        return self.sessions.page_out(session)

    # -- stateless -----------------------------------------------------------------
    def stateless_step(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], config, ids: torch.Tensor | None,
                       pairs: kv.KVPairs) -> tuple[torch.Tensor, kv.KVPairs]:
        vocab = model.get_input_embeddings().num_embeddings
        past = pairs[0][0].shape[-2] if pairs else 0
        batch = pairs[0][0].shape[0] if pairs else None
        ids = self.token_ids(ids, "input_ids", vocab, past, models.max_positions(config), batch)
        cache = kv.from_pairs([(self.on_device(k), self.on_device(v)) for k, v in pairs])
        logits = self._run(model, ids, cache, {n: self.on_device(t) for n, t in weights.items()})
        return logits, kv.to_pairs(cache)

    def skeleton(self, config_values: dict, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
        """An architecture without weights of its own, for forwards with shipped weights.

        Kept for the next forward, the `skeletons` most recently used (each holds a whole
        model's memory: a cache without bound grew 38 MB per distinct config); a new one is
        built only when it fits the budget beside what is resident."""
        limits = self.weights.limits
        key = json.dumps(config_values, sort_keys=True, default=str) + str(dtype)
        model = self._skeletons.pop(key, None)  # re-inserted last: dict order is the LRU order
        if model is None:
            config = checked_config(config_values, limits, "the stateless forward")
            nbytes = sum(math.prod(shape) * dt.itemsize
                         for dt, shape in implied_tensors(config, dtype, "the stateless forward").values())
            while len(self._skeletons) >= limits.skeletons:
                self._skeletons.pop(next(iter(self._skeletons)))
            room = self.budget_bytes - self.memory_in_use()
            if nbytes > room:
                raise OutOfMemory(f"the stateless forward's model of {nbytes / 1e9:.2f} GB does not fit the "
                                  f"{room / 1e9:.2f} GB left of the budget")
            with self._forward_errors():
                model = models.build_skeleton(config, dtype, self.device)
        self._skeletons[key] = model
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
        with self._forward_errors():
            return forward_last(model, ids, cache, weights)

    @staticmethod
    @contextmanager
    def _forward_errors():
        try:
            yield
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"forward ran out of device memory: {exc}") from None
        except (RuntimeError, ValueError, IndexError) as exc:
            raise BadRequest(f"forward failed on these inputs: {exc}") from None
