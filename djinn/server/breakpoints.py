"""Breakpoints: a forward paused after decoder layer N, resumed with a (possibly modified) activation.

A `ParkedForward` runs the model's own, unmodified forward in a worker thread. A
forward hook on decoder layer N hands the layer's output (the hidden state) to the
caller and blocks; `resume` hands an activation back, the hook returns it as layer N's
output, and the model's own code carries on: layers N+1..L-1 with the masks and
position embeddings it computed for them, the final norm, the LM head and whatever else
the architecture does there (logit soft-capping, scaling). Nothing is model specific,
and resuming with the unmodified activation gives bit-identical logits by construction.
The KV cache is extended by layers 0..N before the pause and by N+1..L-1 after it.

Why a paused thread rather than re-running layers N+1.. from saved kwargs: the kwargs
differ per layer in models with mixed attention types, and the tail after the layer
loop differs per architecture; the paused frame keeps all of it. Only one thread
computes at a time: the caller blocks on every hand-off, so a worker never races the
server's request loop, and parked workers cost no CPU. Workers are kept for the next
forward: a thread's first forward on an H100 took ~45 ms longer than the same forward
on a thread that had run one (its per-thread CUDA library state), which a fresh thread
per breakpoint paid every time.

The server keeps one per parked session (`SessionStore`); benchmarks use the same
class on a local model for their user-code baselines.
"""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from djinn.errors import BadRequest, LimitExceeded
from djinn.server.streamer import find_decoder_layers

__all__ = ["ParkedForward", "check_layer", "limit_parked", "num_decoder_layers", "parked_room"]


class _Cancelled(BaseException):
    """Raised inside a paused forward to unwind it. A BaseException, so no `except Exception`
    in model code can swallow it."""


MAX_IDLE_WORKERS = 8  # idle worker threads kept for reuse; more parked at once exit when done


class _Worker:
    """A daemon thread that runs one forward at a time, then waits, idle, for the next.

    Busy workers (a forward running or parked) are capped by `limit` (None: no cap, for
    user code in benchmarks): each is a thread and its OpenMP pool, and a server that let
    clients park without bound died creating threads. The server sets its cap
    (`ServerLimits.max_parked`); a forward past it is refused before it starts.
    """

    _idle: queue.SimpleQueue = queue.SimpleQueue()
    _lock = threading.Lock()
    busy = 0
    limit: int | None = None

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="djinn-breakpoint-worker")
        self.thread.start()

    @classmethod
    def take(cls) -> "_Worker":
        with cls._lock:
            if cls.limit is not None and cls.busy >= cls.limit:
                raise LimitExceeded(f"{cls.busy} forwards are parked at breakpoints, the cap is {cls.limit}: "
                                    f"resume or cancel one first")
            cls.busy += 1
        try:
            return cls._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return cls()
        except BaseException:  # no thread could be started: the slot is not taken
            with cls._lock:
                cls.busy -= 1
            raise

    def run(self, job: Callable[[], Callable[[], None]]) -> None:
        """Run `job` on this thread; it returns its last hand-off, made once this worker is idle
        again, so the caller's next forward can have it."""
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            last_hand_off = self._jobs.get()()
            with self._lock:
                _Worker.busy -= 1
            keep = self._idle.qsize() < MAX_IDLE_WORKERS
            if keep:
                self._idle.put(self)
            last_hand_off()
            last_hand_off = None  # holds the outcome (an error's traceback, its frames' tensors) while idle
            if not keep:
                return


def limit_parked(limit: int | None) -> None:
    """Cap the forwards parked (or running) on worker threads at once in this process."""
    _Worker.limit = limit


def parked_room() -> int | None:
    """How many more forwards may park now; None without a cap."""
    return None if _Worker.limit is None else max(0, _Worker.limit - _Worker.busy)


def num_decoder_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model))


def check_layer(layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise BadRequest(f"breakpoint layer {layer} is outside 0..{num_layers - 1}: "
                         f"the model has {num_layers} decoder layers")


class ParkedForward:
    """`run()` (a forward of `model`) paused after decoder layer `layer`.

    The constructor returns once the forward is parked, with layer N's output in
    `activation`; exceptions of the forward before that point are raised there.
    """

    def __init__(self, model: nn.Module, layer: int, run: Callable[[], torch.Tensor]):
        stack = find_decoder_layers(model)
        check_layer(layer, len(stack))
        self.layer = layer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._reached = False
        self._finished = False
        # The worker issues its kernels on the caller's stream, so the caller's
        # synchronisation covers them.
        device = next(model.parameters()).device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._worker = _Worker.take()
        handle = stack[layer].register_forward_hook(self._hook)
        try:
            self._worker.run(lambda: self._main(run, stream))
            kind, value = self._events.get()
        finally:
            handle.remove()  # the paused call is already inside the hook; other forwards see no hook
        if kind != "parked":
            self._finished = True
            if kind == "error":
                raise value
            raise RuntimeError(f"the forward finished without running decoder layer {layer}")
        self.activation: torch.Tensor | None = value

    @property
    def parked(self) -> bool:
        return not self._finished

    def resume(self, activation: torch.Tensor) -> torch.Tensor:
        """Continue with `activation` as layer N's output; the forward's result (the logits)."""
        if self._finished:
            raise BadRequest("this forward is not parked any more")
        expected = self.activation
        if activation.shape != expected.shape or activation.dtype != expected.dtype:
            raise BadRequest(f"the activation to resume with is {activation.dtype} {list(activation.shape)}; "
                             f"layer {self.layer} produced {expected.dtype} {list(expected.shape)}")
        self._commands.put(("resume", activation.to(expected.device)))
        return self._finish()

    def cancel(self) -> None:
        """Unwind the paused forward; the caller rolls back the KV that layers 0..N added."""
        if not self._finished:
            self._commands.put(("cancel", None))
            self._finish()

    def _finish(self):
        kind, value = self._events.get()
        self._finished = True
        self.activation = None
        if kind == "error":
            raise value
        return value

    def _main(self, run: Callable[[], torch.Tensor], stream) -> Callable[[], None]:
        """The forward, on the worker; the hand-off of its outcome (see `_Worker.run`)."""
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                outcome = ("done", run())
        except _Cancelled:
            outcome = ("cancelled", None)
        except BaseException as exc:  # handed to the caller, raised there
            outcome = ("error", exc)
        return lambda: self._events.put(outcome)

    def _hook(self, module: nn.Module, args, output):
        if self._reached or threading.get_ident() != self._worker.thread.ident:
            return None
        self._reached = True
        # Decoder layers return the hidden state, or (in older releases and some
        # architectures) a tuple that starts with it.
        is_tensor = isinstance(output, torch.Tensor)
        self._events.put(("parked", output if is_tensor else output[0]))
        command, activation = self._commands.get()
        if command == "cancel":
            raise _Cancelled()
        return activation if is_tensor else (activation, *output[1:])
