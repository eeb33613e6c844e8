"""The server's compute: validates model inputs and runs forwards on its device.

All modes share these calls: a stateless forward (weights shipped or cached, KV
shipped) and session prefill/decode (KV resident in the session store). Greedy
tokens are picked here for clients that want only the token. Sessions may also run a
step to a breakpoint (`run_to_layer`) and `resume` it later.

Memory is not decided here: each session step runs inside `SessionStore.step`, which
makes room for it under the device budget, rolls it back if it fails and retries it if
the device ran out of memory; a forward here only has to be re-runnable (`attempt`).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext

import torch

from djinn import kv, models
from djinn.decoding import Padding, forward_last, forward_logits
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.batching import (BatchedStep, StackedCache, prefill_bytes, stacked_bytes, stacked_forward,
                                   stacked_prefill)
from djinn.server.breakpoints import ParkedForward, check_layer, num_decoder_layers
from djinn.server.device_budget import DeviceBudget
from djinn.server.fast_decode import FAST_EAGER, HF_EAGER, SlotFailed
from djinn.server.interventions import StepHooks
from djinn.server.limits import checked_config, implied_tensors
from djinn.server.session_store import Breakpoint, Session, SessionStore
from djinn.server.weight_cache import CachedModel, WeightCache
from djinn.transport import TensorKind, TensorSpec
from djinn.units import gib

ID_DTYPES = (torch.int64, torch.int32)
# CPU GEMM kernels take different code paths for misaligned operands and then differ
# in the last bits; received frames start wherever libzmq put them.
KERNEL_ALIGNMENT = 64


class Executor:
    def __init__(self, budget: DeviceBudget, weights: WeightCache, sessions: SessionStore):
        self.device = budget.device
        self.budget = budget
        self.weights = weights
        self.sessions = sessions
        self._skeletons: dict[str, torch.nn.Module] = {}
        self.stacks = StackedCache()  # the last batched step's KV, for the next step of the same batch

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

    def not_parked(self, session: Session) -> None:
        if session.breakpoint is not None:
            raise BadRequest(f"session {session.handle} is parked at decoder layer {session.breakpoint.layer}: "
                             f"resume or cancel it first")

    # -- sessions ------------------------------------------------------------------
    def step_ids(self, session: Session, ids: torch.Tensor | None) -> torch.Tensor:
        """A step's token ids (a prefill's or a decode's), checked against the session: a solo step's
        check, and a batched step's before it joins."""
        self.not_parked(session)
        cached = session.model
        return self.token_ids(ids, "input_ids", cached.vocab_size, session.length, cached.max_positions,
                              session.batch)

    def session_step(self, session: Session, ids: torch.Tensor | None, padding: Padding | None = None,
                     edits: StepHooks | None = None, all_logits: bool = False) -> torch.Tensor:
        """Prefill (empty session) or decode (later calls): the last position's logits, [batch, vocab]
        (every position's, [batch, tokens, vocab], with `all_logits`).

        `padding`: a padded batch's mask and positions for this step (the fast path takes none);
        `edits`: the interventions' hooks of this step, installed around each attempt of its forward.
        A traced step (edits or every position's logits) runs HF's eager forward, where the hooks are:
        a session on the fast path leaves it first, its KV moving out of the slot."""
        traced = edits is not None or all_logits
        fast = self.sessions.fast
        if traced and session.decoder is not None:
            self.sessions.leave_fast_path(session)
        if fast is not None and fast.wanted(session.decode) and not traced:
            if padding is None:
                logits = self._fast_step(session, ids)
                if logits is not None:
                    return logits
            elif session.length == 0:
                fast.fallbacks["a padded batch"] += 1
        ids = self.step_ids(session, ids)
        model = session.model.model
        logits = self.sessions.step(session, self._kv_bytes(session.model, ids.shape[0], ids.shape[1]),
                                    lambda attempt: self._run(model, ids, session.cache, {}, padding, edits,
                                                              all_logits))
        session.path = HF_EAGER
        if fast is not None:
            fast.steps[HF_EAGER] += 1
        return logits

    def batched_step(self, steps: list[BatchedStep]) -> list[torch.Tensor]:
        """The decode steps of several sessions of one model as one forward (`djinn.server.batching`);
        each session's logits. A failure rolls every session back; an allocation failure is not
        retried here (the server then steps the sessions one by one, with the store's retries)."""
        return self._batched(steps, stacked_bytes(steps), lambda model: stacked_forward(model, steps, self.stacks))

    def batched_prefill(self, steps: list[BatchedStep]) -> list[torch.Tensor]:
        """The prompts of several empty sessions of one model as one forward (`batching.stacked_prefill`);
        each session's last-position logits. Failures as `batched_step`'s."""
        return self._batched(steps, prefill_bytes(steps), lambda model: stacked_prefill(model, steps))

    def _batched(self, steps: list[BatchedStep], kv_bytes: int, forward) -> list[torch.Tensor]:
        model = steps[0].session.model.model
        if any(step.session.model.model is not model for step in steps):
            raise ValueError("a batched step runs the sessions of one model")
        with self._forward_errors():
            return self.sessions.step_batch([step.session for step in steps], kv_bytes, lambda: forward(model))

    def _fast_step(self, session: Session, ids: torch.Tensor | None) -> torch.Tensor | None:
        """A step through the session's fast-path slot; None when the step decodes with HF instead."""
        fast = self.sessions.fast
        ids = self.step_ids(session, ids)
        slot = session.decoder
        if slot is not None and slot.length + ids.shape[1] > slot.max_len:
            self.sessions.leave_fast_path(session)  # past the slot: HF from here on
            return None
        if slot is None:
            if session.length and ids.shape[1] != 1:
                return None  # a session comes back onto the fast path at a one-token step
            slot, reason = fast.acquire(session.model, ids.shape[0], session.length + ids.shape[1])
            if slot is None:
                if session.length == 0:
                    fast.fallbacks[reason] += 1
                return None

        def run(attempt: int) -> torch.Tensor:
            if session.decoder is None:  # its KV, paged in by now, moves into the slot
                if session.length:
                    slot.load(kv.to_pairs(session.cache))
                else:
                    slot.length = 0
                session.decoder, session.cache = slot, None
            with self._forward_errors():
                return slot.step(ids) if ids.shape[1] == 1 and slot.length else slot.extend(ids)

        try:
            logits = self.sessions.step(session, 0, run)
        except SlotFailed:
            self.sessions.leave_fast_path(session)
            return None
        except BaseException:
            if session.decoder is not slot:  # it never got in: the slot goes back
                fast.release(slot)
            raise
        session.path = slot.path if ids.shape[1] == 1 and session.length > 1 else FAST_EAGER
        fast.steps[session.path] += 1
        return logits

    def run_to_layer(self, session: Session, ids: torch.Tensor | None, layer: int,
                     edits: StepHooks | None = None) -> torch.Tensor:
        """Run a step (prefill or decode) up to decoder layer `layer` and park it; that layer's output.

        `edits` (at sites up to layer N) run before the park and are removed once it is parked."""
        model = session.model.model
        if session.model.streamed:
            # Its ring holds the layers of one forward in flight; a forward parked half-way
            # would leave the ring to whichever forward runs next.
            raise BadRequest(f"model {session.model.fingerprint} streams its layers through the ring buffer: "
                             f"breakpoints need a model resident on the device")
        check_layer(layer, num_decoder_layers(model))
        ids = self.step_ids(session, ids)
        if session.decoder is not None:  # the hooks that park a forward attach to HF's layers
            self.sessions.leave_fast_path(session)
        start = session.length
        parked = self.sessions.step(session, self._kv_bytes(session.model, ids.shape[0], ids.shape[1]),
                                    lambda attempt: self._park(model, layer, ids, session, edits))
        self.sessions.park(session, Breakpoint(parked, layer, start, ids, edits))
        return parked.activation

    def _park(self, model: torch.nn.Module, layer: int, ids: torch.Tensor, session: Session,
              edits: StepHooks | None = None) -> ParkedForward:
        with self._forward_errors(), self._installed(edits, ids):
            return ParkedForward(model, layer, lambda: forward_last(model, ids, session.cache))

    def resume(self, session: Session, activation: torch.Tensor | None, edits: StepHooks | None = None) -> torch.Tensor:
        """Continue a parked step from layer N+1 with `activation` as layer N's output; the logits.

        `edits` (at sites after layer N) are installed while layers N+1.. run."""
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
        cached = session.model
        self.sessions.unpark(session)
        # The activation's upload is queued while the KV pages cross PCIe, so getting ready
        # costs about the KV transfer; one that arrived in pageable memory (not landed: a
        # compressed frame) is first copied into pinned memory, also beside the KV copies.
        uploaded: list[torch.Tensor] = []

        def upload() -> None:
            if not uploaded:
                uploaded.append(self._upload(activation))

        def run(attempt: int) -> torch.Tensor:
            upload()
            with self._forward_errors():
                if attempt == 0:
                    with self._installed(edits, bp.ids):
                        return bp.forward.resume(uploaded[0])
                # The parked forward died with the allocation failure and its KV was rolled back:
                # layers 0..N run again (the same inputs, the same KV, the same edits), then the
                # activation replaces layer N's output as before.
                parked = self._park(cached.model, bp.layer, bp.ids, session, bp.edits)
                with self._installed(edits, bp.ids):
                    return parked.resume(uploaded[0])

        layers_left = cached.num_layers - 1 - bp.layer
        # IO_WAIT -> ready: the KV pages and the activation are on the device (the page-in waits for both).
        return self.sessions.step(session, self._kv_bytes(cached, bp.batch, bp.step_tokens, layers_left), run,
                                  start_length=bp.start_length,
                                  retry_kv_bytes=self._kv_bytes(cached, bp.batch, bp.step_tokens),
                                  while_paging_in=upload, started=started)

    def cancel(self, session: Session) -> None:
        self.sessions.cancel_breakpoint(session)

    def offload(self, session: Session) -> int:
        """Page all of the session's resident KV to host now; the bytes moved."""
        if not self.sessions.swap:
            raise BadRequest("KV swap is disabled on this server (--disable-kv-swap): nothing can be offloaded")
        return self.sessions.page_out(session)

    # -- stateless -----------------------------------------------------------------
    def stateless_step(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], config, ids: torch.Tensor | None,
                       pairs: kv.KVPairs, padding: Padding | None = None, edits: StepHooks | None = None,
                       all_logits: bool = False) -> tuple[torch.Tensor, kv.KVPairs]:
        vocab = model.get_input_embeddings().num_embeddings
        past = pairs[0][0].shape[-2] if pairs else 0
        batch = pairs[0][0].shape[0] if pairs else None
        ids = self.token_ids(ids, "input_ids", vocab, past, models.max_positions(config), batch)
        weights = {n: self.on_device(t) for n, t in weights.items()}

        def run(attempt: int) -> tuple[torch.Tensor, kv.KVPairs]:
            # A fresh cache each attempt: a forward that failed half-way had extended some layers.
            cache = kv.from_pairs([(self.on_device(k), self.on_device(v)) for k, v in pairs])
            return self._run(model, ids, cache, weights, padding, edits, all_logits), kv.to_pairs(cache)
        return self.sessions.retrying(run, want_bytes=kv.nbytes(pairs))

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
            if self.budget.shortfall(nbytes):
                raise OutOfMemory(f"the stateless forward's model of {gib(nbytes)} does not fit: "
                                  f"{self.budget.describe()}")
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
    def _run(self, model: torch.nn.Module, ids: torch.Tensor, cache, weights: dict,
             padding: Padding | None = None, edits: StepHooks | None = None, all_logits: bool = False) -> torch.Tensor:
        with self._forward_errors(), self._installed(edits, ids):
            logits = forward_logits(model, ids, cache, weights, padding.to(self.device) if padding else None,
                                    all_positions=all_logits)
        return logits if all_logits else logits[:, -1]

    @staticmethod
    def _installed(edits: StepHooks | None, ids: torch.Tensor):
        """The step's intervention hooks for one attempt of its forward (none without edits)."""
        return edits.installed(*ids.shape) if edits is not None else nullcontext()

    def _forward(self, step, ids: torch.Tensor) -> torch.Tensor:
        with self._forward_errors():
            return step(ids)

    @staticmethod
    @contextmanager
    def _forward_errors():
        """A forward's failure on bad inputs as `BadRequest`; an allocation failure as itself, for the
        session store to retry (`torch.OutOfMemoryError` is a RuntimeError: it must pass first)."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise BadRequest(f"forward failed on these inputs: {exc}") from None
