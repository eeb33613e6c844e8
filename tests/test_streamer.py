"""Ring-buffer weight streaming (seed 003) on a CPU: the allocator, and logits of a
streamed model bit-identical to the same model fully resident."""
from __future__ import annotations

import random

import pytest
import torch

from djinn.models import TINY_MODEL, build
from djinn.server.streamer import (
    RingAllocator, RingTooSmall, find_decoder_layers, fits_in_budget, stream_model)

pytestmark = pytest.mark.ring_buffer

NEW_TOKENS = 20


# -- RingAllocator -------------------------------------------------------------------

def test_blocks_are_placed_back_to_back_on_aligned_offsets():
    ring = RingAllocator(1000, alignment=16)
    assert [ring.allocate(tag, 100).offset for tag in "abc"] == [0, 112, 224]
    assert [tag for tag, _, _ in ring.resident] == ["a", "b", "c"]
    assert ring.head == 324


def test_block_that_does_not_fit_before_the_end_restarts_at_zero_unsplit():
    ring = RingAllocator(100, alignment=1)
    ring.allocate("a", 40)
    ring.allocate("b", 40)
    placement = ring.allocate("c", 30)  # 20 bytes left at the end: skipped
    assert (placement.offset, placement.wrapped, placement.overwrites) == (0, True, ("a",))
    assert ring.resident == (("b", 40, 40), ("c", 0, 30))
    # the next one fits after c and overwrites only b
    placement = ring.allocate("d", 40)
    assert (placement.offset, placement.wrapped, placement.overwrites) == (30, False, ("b",))


def test_wrap_around_keeps_resident_blocks_disjoint_and_inside_the_ring():
    rng = random.Random(3)
    ring = RingAllocator(10_000, alignment=64)
    wraps = 0
    for tag in range(2_000):
        nbytes = rng.randint(1, 4_000)
        before = {t: (o, n) for t, o, n in ring.resident}
        placement = ring.allocate(tag, nbytes)
        wraps += placement.wrapped
        start, end = placement.offset, placement.offset + nbytes
        assert start % 64 == 0 and end <= ring.capacity_bytes
        assert set(placement.overwrites) == {t for t, (o, n) in before.items() if o < end and start < o + n}
        spans = sorted((o, o + n) for _, o, n in ring.resident)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert ring.resident[-1] == (tag, start, nbytes)
    assert wraps > 100


def test_block_larger_than_half_the_ring_is_alone_in_flight():
    ring = RingAllocator(100, alignment=1)
    assert ring.allocate(0, 60).overwrites == ()
    for tag in range(1, 5):
        placement = ring.allocate(tag, 60)
        assert (placement.offset, placement.wrapped, placement.overwrites) == (0, True, (tag - 1,))
        assert ring.resident == ((tag, 0, 60),)


def test_allocation_reports_and_waits_for_the_blocks_it_overwrites():
    ring = RingAllocator(100, alignment=1)
    for tag in "abc":
        ring.allocate(tag, 30)
    assert ring.plan(50).overwrites == ("a", "b")  # plan changes nothing
    computed = {"a"}
    assert ring.allocate("d", 50, can_overwrite=computed.__contains__) is None
    assert [t for t, _, _ in ring.resident] == ["a", "b", "c"] and ring.head == 90
    computed.add("b")
    placement = ring.allocate("d", 50, can_overwrite=computed.__contains__)
    assert (placement.offset, placement.overwrites) == (0, ("a", "b"))


def test_allocator_rejects_a_block_larger_than_the_ring():
    with pytest.raises(RingTooSmall, match="101 bytes .* 100 bytes"):
        RingAllocator(100).plan(101)
    assert issubclass(RingTooSmall, ValueError)


def test_fits_in_budget():
    assert fits_in_budget(10, 10) and not fits_in_budget(11, 10)


# -- the streamed model ------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return build(TINY_MODEL)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))


def _layer_bytes(model) -> list[int]:
    return [sum(p.numel() * p.element_size() for p in layer.parameters())
            for layer in find_decoder_layers(model)]


def _capacity(model, layers: float) -> int:
    return int(max(_layer_bytes(model)) * layers)


@pytest.mark.parametrize("ring_layers, prefetch_depth, chunk_bytes", [
    (2.5, 2, 256 << 10),
    (2.5, 0, 64 << 20),
    (1.2, 2, 100_000),  # one layer in flight at a time; chunks do not divide the layer
    (3.7, 4, 1 << 20),
    (9.0, 3, 64 << 20),  # every layer fits: still streamed each pass
], ids=lambda v: str(v))
def test_streamed_forward_is_bit_identical(reference, prompt, ring_layers, prefetch_depth, chunk_bytes):
    model = build(TINY_MODEL)
    with torch.no_grad():
        expected = reference(prompt).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, ring_layers),
                          chunk_bytes=chunk_bytes, prefetch_depth=prefetch_depth) as handle:
            for _ in range(2):  # the second pass starts from a ring the first left behind
                assert torch.equal(model(prompt).logits, expected)
            assert handle.stats.layer_loads == 2 * len(handle.layers)


def test_streamed_greedy_generate_with_kv_cache_is_bit_identical(reference, prompt):
    model = build(TINY_MODEL)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                  return_dict_in_generate=True, output_logits=True)
    expected = reference.generate(prompt, **kwargs)
    with stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.5),
                      chunk_bytes=256 << 10) as handle:
        got = model.generate(prompt, **kwargs)
        stats = handle.stats
    assert torch.equal(got.sequences, expected.sequences)
    assert got.sequences.shape[1] == prompt.shape[1] + NEW_TOKENS
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    assert stats.layer_loads == NEW_TOKENS * len(handle.layers)  # one forward per new token
    assert stats.wraps > 0 and stats.waits > 0


def test_stats_count_every_layer_once_per_pass(prompt):
    model = build(TINY_MODEL)
    layer_bytes = _layer_bytes(model)
    passes = 3
    with stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.5)) as handle:
        with torch.no_grad():
            for _ in range(passes):
                model(prompt)
        stats = handle.stats
    assert handle.layer_bytes == tuple(layer_bytes)  # tiny-llama's tensors need no padding
    assert stats.bytes_streamed == sum(layer_bytes) * passes
    assert stats.layer_loads == len(layer_bytes) * passes
    # the next pass's first layers are already prefetched
    assert stats.bytes_copied == stats.bytes_streamed + sum(layer_bytes[:2])
    assert stats.cancelled_loads == 0 and stats.copy_seconds > 0


def test_gpt2_streams_its_transformer_h():
    reference, model = build("gpt2", num_layers=3), build("gpt2", num_layers=3)
    ids = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(1))
    assert find_decoder_layers(model) is model.transformer.h
    with torch.no_grad():
        expected = reference(ids).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, 1.5),
                          chunk_bytes=1 << 20) as handle:
            assert torch.equal(model(ids).logits, expected)
            assert torch.equal(model(ids).logits, expected)
            assert handle.stats.layer_loads == 6


def test_a_models_decoder_layers_are_found_by_one_walk_of_its_modules():
    """A traced request asks for the stack once per intervention: only the first walks the model."""
    model = build(TINY_MODEL, num_layers=2)
    walks = []
    model.modules = lambda: (walks.append(1), *type(model).modules(model))[1:]  # counts the walks
    assert [find_decoder_layers(model) for _ in range(5)] == [model.model.layers] * 5
    assert len(walks) == 1
    other = build(TINY_MODEL, num_layers=3)
    assert find_decoder_layers(other) is other.model.layers and len(other.model.layers) == 3


def test_ring_smaller_than_a_layer_is_refused_and_the_model_left_alone(reference, prompt):
    model = build(TINY_MODEL)
    layer = max(_layer_bytes(model))
    with pytest.raises(RingTooSmall, match=f"ring of {layer - 1} bytes .* {layer} bytes"):
        stream_model(model, device="cpu", capacity_bytes=layer - 1)
    assert not any(l._forward_pre_hooks for l in find_decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, reference(prompt).logits)


def test_forward_that_stops_midway_does_not_break_the_next(reference, prompt):
    model = build(TINY_MODEL)
    layers = find_decoder_layers(model)

    class Stop(Exception):
        pass

    def stop(module, args):
        raise Stop

    with torch.no_grad():
        expected = reference(prompt).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.5)) as handle:
            hook = layers[3].register_forward_pre_hook(stop)
            with pytest.raises(Stop):
                model(prompt)
            hook.remove()
            assert all(p.device.type == "cpu" and p.untyped_storage().data_ptr()
                       != handle.ring.tensor.untyped_storage().data_ptr() for p in layers[3].parameters())
            assert torch.equal(model(prompt).logits, expected)
            assert handle.stats.cancelled_loads > 0


def test_inference_mode_works(reference, prompt):
    model = build(TINY_MODEL)
    with torch.inference_mode():
        expected = reference(prompt).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.5)):
            assert torch.equal(model(prompt).logits, expected)


def test_remove_restores_the_model(reference, prompt):
    model = build(TINY_MODEL)
    handle = stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.5))
    with torch.no_grad():
        model(prompt)
    handle.remove()
    handle.remove()  # idempotent
    layers = find_decoder_layers(model)
    assert not any(l._forward_pre_hooks or l._forward_hooks for l in layers)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, reference(prompt).logits)


# -- resident layers: a residency plan's, kept on the device, never through the ring -------

RESIDENT = (1, 4, 6)  # of tiny-llama's 8: spread, as djinn.server.residency spreads them


def _arena_and_ring(handle) -> set[int]:
    return {handle.ring.tensor.untyped_storage().data_ptr(), handle._arena.tensor.untyped_storage().data_ptr()}


@pytest.mark.parametrize("ring_layers, prefetch_depth", [(2.0, 1), (3.0, 2), (1.0, 2)], ids=lambda v: str(v))
def test_resident_layers_stay_put_and_only_the_others_stream(reference, prompt, ring_layers, prefetch_depth):
    model = build(TINY_MODEL)
    layers = find_decoder_layers(model)
    layer_bytes = _layer_bytes(model)
    streamed = [i for i in range(len(layers)) if i not in RESIDENT]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                  return_dict_in_generate=True, output_logits=True)
    expected = reference.generate(prompt, **kwargs)
    with stream_model(model, device="cpu", capacity_bytes=_capacity(model, ring_layers), chunk_bytes=100_000,
                      prefetch_depth=prefetch_depth, resident_layers=RESIDENT) as handle:
        assert handle.streamed_layers == tuple(streamed) and handle.resident_layers == RESIDENT
        assert handle.layer_bytes == tuple(layer_bytes[i] for i in streamed)
        got = model.generate(prompt, **kwargs)
        stats = handle.stats
        outside = _arena_and_ring(handle)
        for i in RESIDENT:  # their own storage, no hooks
            assert not layers[i]._forward_pre_hooks
            assert all(p.untyped_storage().data_ptr() not in outside for p in layers[i].parameters())
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    assert stats.layer_loads == NEW_TOKENS * len(streamed)
    assert stats.bytes_streamed == NEW_TOKENS * sum(layer_bytes[i] for i in streamed)
    assert stats.cancelled_loads == 0


def test_resident_layers_out_of_range_or_all_of_them_are_refused():
    model = build(TINY_MODEL)
    capacity = _capacity(model, 2.0)
    with pytest.raises(ValueError, match="outside the model's 8 decoder layers"):
        stream_model(model, device="cpu", capacity_bytes=capacity, resident_layers=[0, 8])
    with pytest.raises(ValueError, match="nothing to stream"):
        stream_model(model, device="cpu", capacity_bytes=capacity, resident_layers=range(8))


def test_remove_restores_a_model_with_resident_layers(reference, prompt):
    model = build(TINY_MODEL)
    handle = stream_model(model, device="cpu", capacity_bytes=_capacity(model, 2.0), prefetch_depth=1,
                          resident_layers=RESIDENT)
    with torch.no_grad():
        model(prompt)
    handle.remove()
    assert not any(l._forward_pre_hooks or l._forward_hooks for l in find_decoder_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, reference(prompt).logits)


# -- the CUDA ordering protocol, with stream semantics simulated on the CPU -------------
#
# Fake streams log their operations; `wait_event` captures the event's latest record, as
# cudaStreamWaitEvent does, and `wait_stream` the other stream's last operation. Every
# chunk copy (`copy_(..., non_blocking=True)`) is logged on the stream it was issued on,
# with the ring bytes it writes. From the log we check, byte for byte, that every layer's
# read of the ring comes after all the chunks that wrote its bytes, and that no chunk
# overwrites them until the read is over. Data still moves synchronously, so the logits
# check runs too.

class _FakeStream:
    def __init__(self, device=None):
        self.ops = []  # ("wait", node or None) | ("record", None) | ("copy", None); a node is (stream, index)

    def wait_event(self, event):
        self.ops.append(("wait", event.node))

    def wait_stream(self, stream):
        self.ops.append(("wait", (stream, len(stream.ops) - 1) if stream.ops else None))

    def synchronize(self):
        pass


class _FakeEvent:
    current = None  # the fake current stream

    def __init__(self, enable_timing=False):
        self.node = None

    def record(self, stream=None):
        stream = stream or _FakeEvent.current
        stream.ops.append(("record", None))
        self.node = (stream, len(stream.ops) - 1)

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 1.0


def _happens_before(a, b) -> bool:
    """Node `a` is ordered before node `b` (or is `b`)."""
    seen, todo = set(), [b]
    while todo:
        stream, i = todo.pop()
        if stream is a[0] and i >= a[1]:
            return True
        if i < 0 or (id(stream), i) in seen:
            continue
        seen.add((id(stream), i))
        kind, waited = stream.ops[i]
        if kind == "wait" and waited is not None:
            todo.append(waited)
        todo.append((stream, i - 1))
    return False


class _StreamTrace:
    """Installs the fake streams and events, and checks the log they leave."""

    def __init__(self, monkeypatch):
        import contextlib

        from djinn.server import streamer

        self.compute = compute = _FakeStream()
        _FakeEvent.current = compute
        # Work queued on the compute stream before the handle exists: the kernels of the
        # previous owner of the memory the allocator hands the ring.
        compute.ops.append(("record", None))
        self.before = (compute, 0)
        self.chunks = []  # (data_ptr, nbytes, node) of every non-blocking copy
        self.loads = []  # (load, first chunk, end chunk), in copy-stream order
        self.reads = []  # (load, read start node, read end node)
        self.query_answers = None  # an iterator of bools for Event.query, or always True
        open_reads, trace = [], self

        @contextlib.contextmanager
        def use_stream(stream):
            previous, _FakeEvent.current = _FakeEvent.current, stream
            try:
                yield
            finally:
                _FakeEvent.current = previous

        real_copy = torch.Tensor.copy_

        def logged_copy(dst, src, non_blocking=False):
            out = real_copy(dst, src, non_blocking)
            if non_blocking:
                stream = _FakeEvent.current
                stream.ops.append(("copy", None))
                trace.chunks.append((dst.data_ptr(), dst.numel() * dst.element_size(), (stream, len(stream.ops) - 1)))
            return out

        class Recorded(streamer._CudaCopier):
            def __init__(self):
                super().__init__(torch.device("cpu"))

            def copy(self, load, dst, src, chunk_bytes, after):
                first = len(trace.chunks)
                super().copy(load, dst, src, chunk_bytes, after)
                trace.loads.append((load, first, len(trace.chunks)))

            def wait_ready(self, load):
                super().wait_ready(load)
                open_reads.append((load, (compute, len(compute.ops) - 1)))

            def record_done(self):
                event = super().record_done()
                trace.reads.append(open_reads.pop(0) + (event.node,))
                return event

        def query(event):
            return next(trace.query_answers) if trace.query_answers is not None else True

        monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
        monkeypatch.setattr(_FakeEvent, "query", query)
        monkeypatch.setattr(torch.cuda, "stream", use_stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeEvent.current)
        monkeypatch.setattr(torch.Tensor, "copy_", logged_copy)
        monkeypatch.setattr(streamer, "_InlineCopier", Recorded)

    def check(self, ring: torch.Tensor) -> None:
        """No chunk copy races the queued work the ring's memory came from or any layer's read."""
        base = ring.data_ptr()
        assert self.chunks and all(stream is not self.compute for _, _, (stream, _) in self.chunks), \
            "chunk copies must run on the copy stream"
        for _, _, node in self.chunks:
            assert _happens_before(self.before, node), \
                "a copy into the ring was not ordered after the work queued before the ring was allocated"
        own = {id(load): (first, end) for load, first, end in self.loads}
        for load, read_start, read_end in self.reads:
            lo, hi = load.offset, load.offset + load.nbytes
            first, end = own[id(load)]
            assert sum(n for _, n, _ in self.chunks[first:end]) == load.nbytes
            for k, (ptr, n, node) in enumerate(self.chunks):
                start = ptr - base
                if first <= k < end:
                    assert lo <= start and start + n <= hi
                    assert _happens_before(node, read_start), "a layer read the ring before its copy ended"
                elif start < hi and lo < start + n:
                    assert _happens_before(node, read_start) or _happens_before(read_end, node), \
                        "a copy overwrote a layer still being read"


@pytest.mark.parametrize("ring_layers, prefetch_depth", [(1.0, 2), (1.3, 1), (2.5, 0), (2.5, 2), (3.2, 5), (9.0, 3)],
                         ids=lambda v: str(v))
def test_cuda_event_protocol_has_no_ring_races(monkeypatch, reference, prompt, ring_layers, prefetch_depth):
    trace = _StreamTrace(monkeypatch)
    model = build(TINY_MODEL)
    with torch.no_grad():
        expected = reference(prompt).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, ring_layers),
                          chunk_bytes=100_000, prefetch_depth=prefetch_depth) as handle:
            ring = handle.ring.tensor
            for _ in range(3):
                assert torch.equal(model(prompt).logits, expected)
    assert len(trace.reads) == 3 * len(find_decoder_layers(model))
    trace.check(ring)


@pytest.mark.parametrize("ring_layers, prefetch_depth", [(2.0, 1), (3.0, 2), (1.0, 1)], ids=lambda v: str(v))
def test_cuda_event_protocol_with_resident_layers_has_no_ring_races(monkeypatch, reference, prompt, ring_layers,
                                                                    prefetch_depth):
    trace = _StreamTrace(monkeypatch)
    model = build(TINY_MODEL)
    with torch.no_grad():
        expected = reference(prompt).logits
        with stream_model(model, device="cpu", capacity_bytes=_capacity(model, ring_layers), chunk_bytes=100_000,
                          prefetch_depth=prefetch_depth, resident_layers=RESIDENT) as handle:
            ring = handle.ring.tensor
            for _ in range(3):
                assert torch.equal(model(prompt).logits, expected)
            # A ring of depth + 1 equal layers never holds a prefetch back (what the plan sizes it for).
            assert handle.stats.deferrals == 0 or ring_layers < prefetch_depth + 1
    assert len(trace.reads) == 3 * (len(find_decoder_layers(model)) - len(RESIDENT))
    trace.check(ring)


def test_first_copies_wait_for_work_queued_before_the_ring(monkeypatch):
    """The ring comes from the caching allocator, ordered only against the stream that
    allocated it: a layer prefetched at construction must not be written before the
    work already queued there, or a kernel of the memory's previous owner races it."""
    trace = _StreamTrace(monkeypatch)
    model = _Stack([64] * 4)
    with torch.no_grad(), stream_model(model, device="cpu", capacity_bytes=_capacity(model, 9.0),
                                       chunk_bytes=1 << 20, prefetch_depth=2) as handle:
        ring = handle.ring.tensor
        assert len(trace.chunks) == 2  # layers 0 and 1, queued before any forward
        model(torch.zeros(3))
    trace.check(ring)


class _Layer(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))
        self.b = torch.nn.Parameter(torch.randn(7))  # not a multiple of the alignment

    def forward(self, x):
        return x * 0.5 + self.w.sum() * 1e-3 + self.b.sum() * 1e-3


class _Stack(torch.nn.Module):
    """Decoder-like stack of layers of any sizes; `stop` raises before that layer."""

    class Stop(Exception):
        pass

    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(n) for n in sizes)

    def forward(self, x, stop=None):
        for index, layer in enumerate(self.layers):
            if index == stop:
                raise _Stack.Stop
            x = layer(x)
        return x


@pytest.mark.parametrize("seed", range(40))
def test_random_rings_and_early_stops_have_no_races(monkeypatch, seed):
    """Layers of mixed sizes, rings from one layer to all of them, any prefetch depth,
    forwards that stop midway (the resync path), and event queries that say "not yet":
    the log must show no race and the outputs must match the resident model."""
    rng = random.Random(seed)
    if seed == 0:  # llama-2-13b through a 10 GiB ring: 40 equal layers, 16.9 fit; prefetch 2
        sizes, ring_layers, depth, passes = [1024] * 40, 16.93, 2, 4
    else:
        count = rng.randint(1, 10)
        sizes = [rng.choice([256, 1000, rng.randint(1, 4000)]) for _ in range(count)]
        ring_layers, depth, passes = rng.uniform(1.0, count + 1.5), rng.randint(0, 5), rng.randint(1, 5)
    # Odd seeds keep a random subset of the layers resident (a residency plan's), at least one streams.
    resident = sorted(rng.sample(range(len(sizes)), rng.randint(0, len(sizes) - 1))) if seed % 2 else []
    stops = [rng.choice([None, None, None, *range(len(sizes))]) for _ in range(passes)]
    reference = _Stack(sizes)
    x = torch.randn(3)
    with torch.no_grad():
        expected = reference(x)
        trace = _StreamTrace(monkeypatch)
        trace.query_answers = iter(lambda: rng.random() < 0.5, None)
        model = _Stack(sizes)
        model.load_state_dict(reference.state_dict())
        capacity = int(max(_layer_bytes(model)) * ring_layers) + 512
        with stream_model(model, device="cpu", capacity_bytes=capacity, chunk_bytes=rng.choice([64, 1000, 1 << 20]),
                          prefetch_depth=depth, resident_layers=resident) as handle:
            ring = handle.ring.tensor
            for stop in stops:
                if stop is None:
                    assert torch.equal(model(x), expected)
                else:
                    with pytest.raises(_Stack.Stop):
                        model(x, stop=stop)
            assert torch.equal(model(x), expected)
    trace.check(ring)


@pytest.mark.gpu
def test_on_a_gpu_resident_layers_stay_on_it_the_arena_is_pinned_exactly_and_logits_match():
    """The CUDA path of a residency plan: a model built on the device keeps its resident layers
    there, its streamed ones move to a host arena registered at its exact size, and the logits
    equal the resident model's bit for bit (deterministic kernels on both sides)."""
    from djinn.reproducibility import deterministic_region
    from djinn.telemetry.pcie import cuda_unavailable_reason

    if cuda_unavailable_reason():
        pytest.skip(cuda_unavailable_reason())
    ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with deterministic_region(), torch.no_grad():
        expected = build(TINY_MODEL, dtype=torch.float16, device="cuda")(ids).logits
        model = build(TINY_MODEL, dtype=torch.float16, device="cuda")
        layers = find_decoder_layers(model)
        handle = stream_model(model, device="cuda", capacity_bytes=2 * max(_layer_bytes(model)), prefetch_depth=1,
                              resident_layers=RESIDENT)
        arena = handle._arena.tensor
        assert arena.is_pinned() and arena.numel() == sum(handle.layer_bytes)
        assert all(p.is_cuda for i in RESIDENT for p in layers[i].parameters())
        assert all(not p.is_cuda for i in handle.streamed_layers for p in layers[i].parameters())
        for _ in range(3):
            assert torch.equal(model(ids).logits, expected)
        assert handle.stats.layer_loads == 3 * len(handle.streamed_layers) and handle.stats.copy_seconds > 0
        handle.remove()
        assert not arena.is_pinned()  # unregistered; the weights went back to the device
        assert all(p.is_cuda for p in model.parameters())
        assert torch.equal(model(ids).logits, expected)
