"""Ring-buffer weight streaming: run a HuggingFace decoder larger than device memory.

This module owns the streamer of seed 003. Each decoder layer's parameters are
packed into one contiguous "layer blob" in (pinned) host memory; one flat device
allocation of `capacity_bytes`, the ring, holds the layers in flight. A dedicated
copy stream loads layers a few ahead of compute in chunks; forward pre-hooks point a
layer's parameters at views into the ring just before it runs and post-hooks point
them back at the host blob, so the unmodified HF model (and its KV cache, which
lives in activations and buffers, never in parameters) runs as usual. Embeddings,
final norm, lm_head and rotary buffers stay resident on the device, and so do the
decoder layers a residency plan (`djinn.server.residency`) keeps there: only the
others go through the ring, in stack order, wrapping to the first at a forward's end.

Ordering, all without device-wide syncs:
- compute waits on a layer's *ready* event (recorded on the copy stream after its
  last chunk) before the layer runs;
- a copy that overwrites ring bytes waits on the *done* event of every layer living
  there (recorded on the compute stream after that layer's forward);
- a load is only issued once the host has recorded the done events of the layers it
  would overwrite: `wait_event` on an event that is not yet recorded waits on
  nothing, so the host holds such a prefetch back ("deferral") until the post-hook
  of the layer in the way has run.

On a CPU device the same code runs with synchronous copies and no-op events, so the
allocator, the hooks and logit equivalence are tested in CI.
"""
from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import torch
from torch import nn

from djinn.errors import BadRequest

__all__ = [
    "ALIGNMENT", "Placement", "RingAllocator", "RingBuffer", "RingTooSmall", "StreamStats",
    "StreamingHandle", "find_decoder_layers", "fits_in_budget", "packed_layer_bytes", "stream_model",
]

# Every tensor inside a layer blob, and every layer in the ring, starts on a 256-byte
# boundary: any dtype view is legal and GEMM kernels see the alignment they would get
# from a fresh allocation.
ALIGNMENT = 256


class RingTooSmall(BadRequest, ValueError):
    """The ring cannot hold the largest decoder layer."""


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def fits_in_budget(model_bytes: int, budget_bytes: int) -> bool:
    """True when a model's weights fit in `budget_bytes` of device memory without streaming."""
    return model_bytes <= budget_bytes


# ---------------------------------------------------------------------------------
# The allocator: pure Python, no torch.


@dataclass(frozen=True)
class Placement:
    offset: int
    nbytes: int
    wrapped: bool  # the tail of the ring was too short: skipped, placed at offset 0
    overwrites: tuple  # tags of resident allocations this one overlaps, oldest first


class RingAllocator:
    """Skip-end placement of variable-sized blocks in a ring of `capacity_bytes`.

    Blocks are placed one after another; a block that does not fit before the end of
    the ring starts again at offset 0 and is never split. The allocator remembers
    which tagged blocks are resident and reports, for each placement, the ones it
    overwrites: the caller must wait until those are no longer read before copying.
    """

    def __init__(self, capacity_bytes: int, alignment: int = ALIGNMENT):
        if capacity_bytes <= 0 or alignment <= 0:
            raise ValueError(f"ring capacity and alignment must be positive, got "
                             f"{capacity_bytes} and {alignment}")
        self.capacity_bytes = capacity_bytes
        self.alignment = alignment
        self._head = 0
        self._resident: deque[tuple[Hashable, int, int]] = deque()  # (tag, offset, nbytes), oldest first

    @property
    def head(self) -> int:
        """Where the next block would start if it fits before the end."""
        return self._head

    @property
    def resident(self) -> tuple[tuple[Hashable, int, int], ...]:
        """(tag, offset, nbytes) of every block whose bytes are still intact, oldest first."""
        return tuple(self._resident)

    def plan(self, nbytes: int) -> Placement:
        """Where a block of `nbytes` would go and what it would overwrite; changes nothing."""
        if nbytes <= 0:
            raise ValueError(f"cannot place a block of {nbytes} bytes")
        if nbytes > self.capacity_bytes:
            raise RingTooSmall(f"a block of {nbytes} bytes does not fit in a ring of "
                               f"{self.capacity_bytes} bytes")
        offset = _align(self._head, self.alignment)
        wrapped = offset + nbytes > self.capacity_bytes
        if wrapped:
            offset = 0
        end = offset + nbytes
        overwrites = tuple(tag for tag, off, size in self._resident if off < end and offset < off + size)
        return Placement(offset, nbytes, wrapped, overwrites)

    def allocate(self, tag: Hashable, nbytes: int,
                 can_overwrite: Callable[[Hashable], bool] | None = None) -> Placement | None:
        """Place a block tagged `tag`; None (and nothing changes) if `can_overwrite`
        refuses one of the blocks it would overwrite."""
        placement = self.plan(nbytes)
        if can_overwrite is not None and not all(can_overwrite(t) for t in placement.overwrites):
            return None
        if placement.overwrites:
            start, end = placement.offset, placement.offset + nbytes
            self._resident = deque(r for r in self._resident if not (r[1] < end and start < r[1] + r[2]))
        self._resident.append((tag, placement.offset, nbytes))
        self._head = placement.offset + nbytes
        return placement


class RingBuffer:
    """The one flat device allocation of the ring and its allocator."""

    def __init__(self, capacity_bytes: int, device: str | torch.device, alignment: int = ALIGNMENT):
        self.allocator = RingAllocator(capacity_bytes, alignment)
        self.device = torch.device(device)
        self.tensor = torch.empty(capacity_bytes, dtype=torch.uint8, device=self.device)

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity_bytes

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset:offset + nbytes]


# ---------------------------------------------------------------------------------
# Copy engines: a CUDA copy stream with events, or synchronous copies on a CPU.


class _Load:
    """One layer's trip through the ring (`layer`: its position among the streamed layers)."""
    __slots__ = ("layer", "offset", "nbytes", "start", "ready", "done",
                 "consumed", "computed", "cancelled")

    def __init__(self, layer: int, offset: int, nbytes: int):
        self.layer, self.offset, self.nbytes = layer, offset, nbytes
        self.start = self.ready = self.done = None  # events (CUDA) or None
        self.consumed = False  # compute has been ordered after its ready event
        self.computed = False  # its done event is recorded (or nothing will ever read it)
        self.cancelled = False  # prefetched, then dropped by a resync


class _CudaCopier:
    """Copies on a dedicated stream; events order them against the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # The ring was just allocated on the current stream, and the caching allocator
        # orders a reused block only against that stream: kernels of the memory's
        # previous owner may still be queued there. The copy stream is not ordered after
        # them, so its first copies into the ring would race them; order it once here.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.seconds = 0.0
        self._timed: deque[_Load] = deque()  # loads whose copy time is not yet read
        self._timing_pool: list[torch.cuda.Event] = []
        self._done_pool: list[torch.cuda.Event] = []

    def _timing_event(self) -> torch.cuda.Event:
        return self._timing_pool.pop() if self._timing_pool else torch.cuda.Event(enable_timing=True)

    def copy(self, load: _Load, dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int,
             after: Iterable[_Load]) -> None:
        stream = self.stream
        for victim in after:
            stream.wait_event(victim.done)
            # The wait captured the event's current recording: the event can be reused.
            self._done_pool.append(victim.done)
            victim.done = None
        load.start, load.ready = self._timing_event(), self._timing_event()
        with torch.cuda.stream(stream):
            load.start.record(stream)
            n = load.nbytes
            for o in range(0, n, chunk_bytes):
                dst[o:o + chunk_bytes].copy_(src[o:o + chunk_bytes], non_blocking=True)
            load.ready.record(stream)
        self._timed.append(load)
        self.harvest(block=False)

    def wait_ready(self, load: _Load) -> None:
        torch.cuda.current_stream(self.device).wait_event(load.ready)

    def record_done(self):
        event = self._done_pool.pop() if self._done_pool else torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def harvest(self, block: bool) -> None:
        """Add up the copy time of loads compute has consumed, recycling their events.

        A ready event is only reused once compute's wait on it is enqueued, or compute
        could end up waiting on a later copy."""
        timed = self._timed
        while timed and timed[0].consumed:
            load = timed[0]
            if block:
                load.ready.synchronize()
            elif not load.ready.query():
                return
            if not load.cancelled:
                self.seconds += load.start.elapsed_time(load.ready) / 1e3
            self._timing_pool += (load.start, load.ready)
            load.start = load.ready = None
            timed.popleft()

    def synchronize(self) -> None:
        self.stream.synchronize()


class _InlineCopier:
    """CPU stand-in for the copy stream: copies finish before `copy` returns, so the
    ordering events are placeholders."""
    _DONE = object()

    def __init__(self):
        self.seconds = 0.0
        self._timed: deque[_Load] = deque()

    def copy(self, load: _Load, dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int,
             after: Iterable[_Load]) -> None:
        for victim in after:
            victim.done = None
        t0 = time.perf_counter()
        for o in range(0, load.nbytes, chunk_bytes):
            dst[o:o + chunk_bytes].copy_(src[o:o + chunk_bytes])
        load.start = time.perf_counter() - t0  # seconds, read by harvest
        self._timed.append(load)
        self.harvest(block=False)

    def wait_ready(self, load: _Load) -> None:
        pass

    def record_done(self):
        return self._DONE

    def harvest(self, block: bool) -> None:
        timed = self._timed
        while timed and timed[0].consumed:
            load = timed.popleft()
            if not load.cancelled:
                self.seconds += load.start
            load.start = None

    def synchronize(self) -> None:
        pass


# ---------------------------------------------------------------------------------
# The streamed model.


@dataclass(frozen=True)
class StreamStats:
    bytes_streamed: int  # bytes of the layer loads compute has used
    layer_loads: int  # layer loads compute has used
    bytes_copied: int  # bytes copied into the ring, prefetches not (yet) used included
    wraps: int  # placements that skipped the ring's tail and restarted at offset 0
    waits: int  # copies ordered after the compute of a layer they overwrite
    deferrals: int  # prefetches held back until the layer in the way had run
    cancelled_loads: int  # prefetches dropped because a forward stopped early
    copy_seconds: float  # copy-engine time of the used loads (CUDA events), or host time on CPU

    @property
    def copy_gbps(self) -> float:
        """Streaming bandwidth of the copy engine alone, in 1e9 bytes per second."""
        return self.bytes_streamed / self.copy_seconds / 1e9 if self.copy_seconds else 0.0


@dataclass
class _LayerSpec:
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    offsets: tuple[int, ...]  # byte offset of each parameter inside the blob
    nbytes: int  # blob size (a multiple of ALIGNMENT)
    blob: torch.Tensor | None = None  # flat uint8 view of the host arena
    host_views: tuple[torch.Tensor, ...] = ()


def _layout(layer: nn.Module, alignment: int) -> _LayerSpec:
    params = tuple(layer.parameters())
    offsets, end = [], 0
    for p in params:
        offsets.append(end)
        end = _align(end + p.numel() * p.element_size(), alignment)
    return _LayerSpec(layer, params, tuple(offsets), max(end, alignment))


def packed_layer_bytes(layer: nn.Module, alignment: int = ALIGNMENT) -> int:
    """The bytes a decoder layer takes in the ring (and in host memory) once packed; works on meta layers."""
    return _layout(layer, alignment).nbytes


class _HostArena:
    """One host allocation for every streamed layer, page-locked on CUDA at its exact size.

    torch's pinned allocator rounds a request up to a power of two (a 17.8 GB arena takes
    32 GiB, a 115 GB one 128 GiB: more than the GPU host has), so the memory is allocated
    as ordinary host memory and registered with the driver (`cudaHostRegister`), which
    pins exactly its pages. Unregistered on `close`, or when dropped."""

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self._registered = False
        if pin:
            # Fault the pages in with torch's threads first: the driver would fault them one
            # by one on one thread while pinning.
            self.tensor.zero_()
            error = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(error) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory for the streamed "
                                   f"layers failed with CUDA error {int(error)} ({error}); the host may not allow "
                                   f"that much page-locked memory (ulimit -l, the container's memlock limit)")
            self._registered = True

    def close(self) -> None:
        if self._registered:
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may be gone; the pages go with the process
            pass


# Each model's stack, found once: the search walks every module and sums the parameters of
# each ModuleList (4 ms for llama-2-13b on the 2-core CI machine), and a traced request asks
# once per intervention: a logit lens at every layer of that model asked 40 times per request.
# Weak keys: a model evicted from the weight cache takes its entry with it.
_DECODER_LAYERS: "weakref.WeakKeyDictionary[nn.Module, nn.ModuleList]" = weakref.WeakKeyDictionary()


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its nn.ModuleList holding the most parameters
    (`model.model.layers` for Llama/Mistral, `model.transformer.h` for GPT-2)."""
    found = _DECODER_LAYERS.get(model)
    if found is None:
        found = _DECODER_LAYERS[model] = _largest_module_list(model)
    return found


def _largest_module_list(model: nn.Module) -> nn.ModuleList:
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = module, count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers with parameters to stream")
    return best


class StreamingHandle:
    """A model whose decoder layers stream through a device ring on every forward.

    Made by `stream_model`; `remove()` (or leaving the `with` block) puts the model
    back as it was. Inference only: the ring views are overwritten once a layer has
    run, so autograd must not keep them.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device, capacity_bytes: int,
                 chunk_bytes: int, prefetch_depth: int, alignment: int = ALIGNMENT,
                 resident_layers: Iterable[int] = ()):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.device = device
        self.chunk_bytes = chunk_bytes  # may be changed between forwards (the chunk sweep does)
        self.layers = find_decoder_layers(model)
        resident = sorted(set(resident_layers))
        if resident and not (0 <= resident[0] and resident[-1] < len(self.layers)):
            raise ValueError(f"resident layers {resident} outside the model's {len(self.layers)} decoder layers")
        if len(resident) == len(self.layers):
            raise ValueError("every decoder layer is resident: nothing to stream (load the model without a ring)")
        self.resident_layers = tuple(resident)
        # The decoder layers that stream, in stack order; `_specs` and loads index into it.
        self.streamed_layers = tuple(i for i in range(len(self.layers)) if i not in set(resident))
        specs = [_layout(self.layers[i], alignment) for i in self.streamed_layers]
        self.prefetch_depth = min(prefetch_depth, len(specs))

        largest = max(range(len(specs)), key=lambda i: specs[i].nbytes)
        if specs[largest].nbytes > capacity_bytes:
            raise RingTooSmall(
                f"ring of {capacity_bytes} bytes ({capacity_bytes / 2**20:.1f} MiB) cannot hold "
                f"decoder layer {self.streamed_layers[largest]} of {type(model).__name__}: "
                f"{specs[largest].nbytes} bytes "
                f"({specs[largest].nbytes / 2**20:.1f} MiB); give the ring at least that much")
        self._check_no_shared_parameters()

        self._orig_param_device: dict[nn.Parameter, torch.device] = {}
        self._orig_buffer_device: list[tuple[nn.Module, str, torch.device]] = []
        self._arena: _HostArena | None = None
        with torch.no_grad():
            self._pack(specs)
            self._place_resident()
        self._specs = specs
        self.layer_bytes = tuple(spec.nbytes for spec in specs)  # packed blob sizes of the streamed layers
        self.ring = RingBuffer(capacity_bytes, device, alignment)
        if device.type == "cuda":
            self._copier = _CudaCopier(device)  # after the ring: its stream waits for the allocation
            # Should the handle be dropped without remove(), the allocator must not hand the
            # ring out again before the copies queued into it have finished.
            self.ring.tensor.record_stream(self._copier.stream)
        else:
            self._copier = _InlineCopier()
        self._views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

        self._issued: deque[_Load] = deque()  # loads issued, not yet used by compute, in order
        self._current: _Load | None = None  # the load whose layer is running
        self._next_issue = 0  # the layer the next load is for
        self._counts = dict(bytes_streamed=0, layer_loads=0, bytes_copied=0, wraps=0, waits=0,
                            deferrals=0, cancelled_loads=0)
        self._hooks = []
        for position, index in enumerate(self.streamed_layers):
            layer = self.layers[index]
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(position)))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(position), always_call=True))
        self._issue_ahead()  # the first forward starts with its first layers in flight

    # -- setup --------------------------------------------------------------------

    def _check_no_shared_parameters(self) -> None:
        owner: dict[int, int] = {}
        for index, layer in enumerate(self.layers):
            for p in layer.parameters():
                if owner.setdefault(id(p), index) != index:
                    raise ValueError(f"parameter shared by decoder layers {owner[id(p)]} and {index}: "
                                     "streaming needs each layer to own its weights")
        prefix = next(name + "." if name else "" for name, m in self.model.named_modules() if m is self.layers)
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in owner and not name.startswith(prefix):
                raise ValueError(f"parameter {name} is also a decoder-layer weight (tied); cannot stream it")

    def _pack(self, specs: list[_LayerSpec]) -> None:
        # One host arena for all blobs, pinned at its exact size (`_HostArena`).
        total = sum(spec.nbytes for spec in specs)
        self._arena = _HostArena(total, pin=self.device.type == "cuda")
        arena = self._arena.tensor
        start = 0
        for spec in specs:
            spec.blob = arena[start:start + spec.nbytes]
            views = []
            for p, off in zip(spec.params, spec.offsets):
                n = p.numel() * p.element_size()
                dst = spec.blob[off:off + n]
                dst.copy_(p.detach().contiguous().reshape(-1).view(torch.uint8))
                self._orig_param_device[p] = p.device
                view = dst.view(p.dtype).view(p.shape)
                p.data = view  # frees the original storage: the blob is the only copy
                views.append(view)
            spec.host_views = tuple(views)
            start += spec.nbytes

    def _place_resident(self) -> None:
        streamed = {id(p) for p in self._orig_param_device}
        for p in self.model.parameters():
            if id(p) not in streamed:
                self._orig_param_device[p] = p.device
                p.data = p.data.to(self.device)
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    self._orig_buffer_device.append((module, name, buf.device))
                    module._buffers[name] = buf.to(self.device)

    # -- the hot path: a few Python operations per layer ---------------------------

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            issued = self._issued
            if self._current is not None or (issued[0].layer if issued else self._next_issue) != index:
                self._resync(index)
            if not issued:
                self._issue(force=True)
            load = issued.popleft()
            self._copier.wait_ready(load)
            load.consumed = True
            self._current = load
            spec = self._specs[index]
            for p, view in zip(spec.params, self._ring_views(index, load.offset)):
                p.data = view
            self._counts["bytes_streamed"] += load.nbytes
            self._counts["layer_loads"] += 1
            self._issue_ahead()
        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            load = self._current
            if load is None or load.layer != index:
                return  # an exception before our pre-hook ran; the next pre-hook resyncs
            load.done = self._copier.record_done()
            load.computed = True
            self._current = None
            for p, view in zip(self._specs[index].params, self._specs[index].host_views):
                p.data = view
            self._issue_ahead()
        return post_hook

    def _ring_views(self, index: int, offset: int) -> tuple[torch.Tensor, ...]:
        # Placements repeat from pass to pass, so the views are built once per (layer, offset).
        views = self._views.get((index, offset))
        if views is None:
            spec, ring = self._specs[index], self.ring.tensor
            views = tuple(ring[offset + off:offset + off + p.numel() * p.element_size()]
                          .view(p.dtype).view(p.shape) for p, off in zip(spec.params, spec.offsets))
            if len(self._views) > 64 * len(self._specs):
                self._views.clear()
            self._views[(index, offset)] = views
        return views

    def _issue_ahead(self) -> None:
        while len(self._issued) < self.prefetch_depth:
            if not self._issue(force=False):
                self._counts["deferrals"] += 1
                return

    def _issue(self, force: bool) -> bool:
        index = self._next_issue
        spec = self._specs[index]
        load = _Load(index, 0, spec.nbytes)
        placement = self.ring.allocator.allocate(load, spec.nbytes, can_overwrite=_computed)
        if placement is None:
            if force:  # cannot happen: a forced load only overwrites layers that already ran
                raise RuntimeError(f"ring streamer: layer {index} would overwrite a layer still to run")
            return False
        load.offset = placement.offset
        victims = [v for v in placement.overwrites if v.done is not None]
        self._copier.copy(load, self.ring.view(placement.offset, spec.nbytes), spec.blob,
                          self.chunk_bytes, victims)
        counts = self._counts
        counts["waits"] += len(victims)
        counts["wraps"] += placement.wrapped
        counts["bytes_copied"] += spec.nbytes
        self._issued.append(load)
        self._next_issue = (index + 1) % len(self._specs)
        return True

    def _resync(self, index: int) -> None:
        """A forward stopped early (an exception, a breakpoint) or ran layers out of order:
        drop the prefetch plan and restart it at `index`."""
        if self._current is not None:
            load, self._current = self._current, None
            load.done, load.computed = self._copier.record_done(), True
            spec = self._specs[load.layer]
            for p, view in zip(spec.params, spec.host_views):
                p.data = view
        # Nothing will read the dropped loads; later copies over them queue behind them
        # on the same copy stream, so they need no event.
        for load in self._issued:
            load.consumed = load.computed = load.cancelled = True
        self._counts["cancelled_loads"] += len(self._issued)
        self._issued.clear()
        self._next_issue = index

    # -- public -------------------------------------------------------------------

    @property
    def stats(self) -> StreamStats:
        """Counters so far; waits for the copy engine to finish the loads compute used."""
        self._copier.harvest(block=True)
        return StreamStats(copy_seconds=self._copier.seconds, **self._counts)

    def remove(self) -> None:
        """Remove the hooks, free the ring and put every tensor back on its original device."""
        if not self._hooks:
            return
        self._copier.synchronize()
        if self.device.type == "cuda":
            # Every stream, not only the current one: forwards may have read the ring on
            # another stream (a worker thread's), and the allocator only knows of the
            # copy stream's use of it.
            torch.cuda.synchronize(self.device)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._resync(0)
        with torch.no_grad():
            for p, device in self._orig_param_device.items():
                p.data = p.data.to(device)
            for module, name, device in self._orig_buffer_device:
                module._buffers[name] = module._buffers[name].to(device)
        # Host-origin weights are views of the arena still: it stays allocated, unpinned.
        self._arena.close()
        self._issued.clear()
        self._views.clear()
        self.ring = None
        self._specs = []

    def __enter__(self) -> StreamingHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _computed(load: _Load) -> bool:
    return load.computed


def stream_model(model: nn.Module, *, device: str | torch.device, capacity_bytes: int,
                 chunk_bytes: int = 64 << 20, prefetch_depth: int = 2, alignment: int = ALIGNMENT,
                 resident_layers: Iterable[int] = ()) -> StreamingHandle:
    """Stream `model`'s decoder layers through a `capacity_bytes` ring on `device`.

    Moves the always-resident parts (embeddings, final norm, lm_head, buffers) and the
    decoder layers in `resident_layers` to `device`, packs each other decoder layer into
    one host blob (pinned when `device` is CUDA; a layer already on the device is copied
    out to it) and installs the hooks; the model is then called as usual. Raises
    `RingTooSmall` when the largest streamed layer does not fit in the ring.
    """
    return StreamingHandle(model, device=device, capacity_bytes=capacity_bytes, chunk_bytes=chunk_bytes,
                           prefetch_depth=prefetch_depth, alignment=alignment, resident_layers=resident_layers)
