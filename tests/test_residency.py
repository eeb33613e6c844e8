"""Residency planning (djinn.server.residency): the most decoder layers resident beside a ring
sized by the layer times, and a server's streamed model that follows its plan, with KV growing
past the plan's reserve paged under the same budget."""
from __future__ import annotations

import random

import pytest
import torch

from djinn import models
from djinn.client import config_dict
from djinn.decoding import greedy
from djinn.errors import OutOfMemory
from djinn.server.device_budget import DeviceBudget
from djinn.server.executor import Executor
from djinn.server.residency import UNKNOWN_TIMES_PREFETCH_DEPTH, plan_residency, spread
from djinn.server.session_store import SessionStore
from djinn.server.streamer import find_decoder_layers, packed_layer_bytes
from djinn.server.weight_cache import TensorEntry, WeightCache

pytestmark = pytest.mark.ring_buffer

GB = 10**9
LAYER = 634_388_480  # a llama-2-13b decoder layer in fp16, as the streamer packs it
FIXED = 655_380_480  # its embeddings, final norm and lm_head
KV = 562 * 819_200  # its KV for a 512-token prompt and 50 new tokens


def plan(available=10 << 30, layers=40, activation=512 << 20, **kw):
    return plan_residency(available_bytes=available, layer_bytes=[LAYER] * layers, fixed_bytes=FIXED, kv_bytes=KV,
                          activation_bytes=activation, **kw)


# -- the plan -----------------------------------------------------------------------------------
def test_13b_at_10_gib_keeps_twelve_layers_resident_behind_a_two_layer_ring():
    """The issue's case: a decode layer reads its weights from HBM ~100x faster than PCIe copies it."""
    p = plan(compute_per_transfer=55 / 4800)
    assert (p.prefetch_depth, p.ring_slots, p.ring_bytes) == (1, 2, 2 * LAYER)
    assert len(p.resident_layers) == 12 and len(p.streamed_layers) == 28
    assert p.bytes_streamed_per_token == 28 * LAYER  # 17.8 GB, from 25.4 GB when all 40 streamed
    assert p.bytes_resident == FIXED + 12 * LAYER and p.device_bytes == p.bytes_resident + p.ring_bytes
    assert p.device_bytes + KV + (512 << 20) <= 10 << 30
    assert p.device_bytes + KV + (512 << 20) + LAYER > 10 << 30, "a 13th layer would not have fitted"
    assert sorted(p.resident_layers + p.streamed_layers) == list(range(40))
    assert "12 resident layers" in p.why and "28 of 40 layers stream" in p.why and "transfer-bound" in p.why


def test_unknown_layer_times_take_the_streamers_default_depth():
    p = plan()
    assert p.prefetch_depth == UNKNOWN_TIMES_PREFETCH_DEPTH == 2 and p.ring_slots == 3
    assert len(p.resident_layers) == 11 and "layer times unknown" in p.why


def test_compute_bound_layers_need_one_copy_ahead():
    p = plan(compute_per_transfer=3.0)
    assert p.prefetch_depth == 1 and "compute-bound" in p.why


def test_resident_runs_whose_compute_outlasts_the_copies_deepen_the_ring():
    # (run + 1) x 0.6 = 1.2 copies' time per resident run of 1: depth 2, so 11 resident instead of 12.
    p = plan(compute_per_transfer=0.6)
    assert p.prefetch_depth == 2 and p.ring_slots == 3 and len(p.resident_layers) == 11
    # Runs of 3 resident layers (a budget for 30 of 40) at 0.45: (3 + 1) x 0.45 = 1.8 -> depth 2.
    roomy = plan(available=FIXED + KV + (512 << 20) + 33 * LAYER, compute_per_transfer=0.45)
    assert roomy.prefetch_depth == 2 and len(roomy.resident_layers) == 30


def test_resident_layers_are_spread_through_the_stack():
    p = plan(compute_per_transfer=0.01)
    gaps = [b - a for a, b in zip(p.resident_layers, p.resident_layers[1:])]
    assert max(gaps) - min(gaps) <= 1 and p.resident_layers[0] > 0 and p.resident_layers[-1] < 39
    assert spread(0, 5) == () and spread(5, 5) == (0, 1, 2, 3, 4) and spread(1, 40) == (20,)
    with pytest.raises(ValueError):
        spread(6, 5)


def test_a_given_ring_is_kept_and_the_rest_planned_around_it():
    p = plan(ring_bytes=int(14.4 * LAYER), activation=256 << 20, compute_per_transfer=0.01)  # the ring
    assert p.ring_bytes == int(14.4 * LAYER) and p.ring_slots == 14
    assert len(p.resident_layers) == 0 and p.bytes_streamed_per_token == 40 * LAYER
    with pytest.raises(OutOfMemory, match="cannot hold a decoder layer"):
        plan(ring_bytes=LAYER - 1)


def test_no_room_for_the_ring_is_out_of_memory_naming_the_parts():
    with pytest.raises(OutOfMemory, match="cannot hold even the ring.*KV"):
        plan(available=FIXED + KV + (512 << 20) + LAYER)


def test_uneven_layers_keep_the_smallest_resident():
    p = plan_residency(available_bytes=90, layer_bytes=[30, 10, 20, 10], fixed_bytes=0, kv_bytes=0,
                       activation_bytes=0, compute_per_transfer=0.01)
    assert p.ring_bytes == 60 and p.resident_layers == (1, 3) and p.streamed_layers == (0, 2)


@pytest.mark.parametrize("seed", range(20))
def test_every_plan_fits_what_it_had_and_streams_at_least_one_layer(seed):
    rng = random.Random(seed)
    layers = [rng.choice([LAYER, rng.randint(1, 2 * LAYER)]) for _ in range(rng.randint(1, 80))]
    ratio = rng.choice([None, 0.0, 0.01, 0.3, 0.9, 2.0])
    available = rng.randint(0, sum(layers) + 4 * GB)
    try:
        p = plan_residency(available_bytes=available, layer_bytes=layers, fixed_bytes=FIXED, kv_bytes=KV,
                           activation_bytes=1 << 28, compute_per_transfer=ratio)
    except OutOfMemory:
        shallowest = 2 if ratio is not None else UNKNOWN_TIMES_PREFETCH_DEPTH + 1  # ring slots
        assert available < FIXED + KV + (1 << 28) + shallowest * max(layers)
        return
    assert p.device_bytes + KV + (1 << 28) <= available
    assert p.streamed_layers and set(p.resident_layers).isdisjoint(p.streamed_layers)
    assert p.bytes_streamed_per_token == sum(layers[i] for i in p.streamed_layers)
    assert p.ring_bytes >= (p.prefetch_depth + 1) * max(layers)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="decoder layers of positive size"):
        plan_residency(available_bytes=1, layer_bytes=[], fixed_bytes=0, kv_bytes=0, activation_bytes=0)
    with pytest.raises(ValueError, match="kv_bytes must be >= 0"):
        plan_residency(available_bytes=1, layer_bytes=[1], fixed_bytes=0, kv_bytes=-1, activation_bytes=0)


# -- a server's streamed model follows its plan ---------------------------------------------------
PROMPT, NEW_TOKENS, SESSIONS = 24, 6, 3
KV_TOKENS = PROMPT + NEW_TOKENS  # the plan's reserve: one session's whole generation
RESIDENT = 3


@pytest.fixture(scope="module")
def streamed(tiny_model):
    """An executor whose budget holds the fixed parts, a 3-layer ring (CPU: depth 2), 3 resident
    layers and the KV of one session; and its cached model."""
    state = tiny_model.state_dict()
    layers = find_decoder_layers(tiny_model)
    layer = packed_layer_bytes(layers[0])
    fixed = sum(t.numel() * t.element_size() for t in state.values()) - sum(
        p.numel() * p.element_size() for p in layers.parameters())
    kv = models.kv_bytes_per_token(tiny_model.config, torch.float32) * KV_TOKENS
    budget = DeviceBudget(torch.device("cpu"), fixed + (3 + RESIDENT) * layer + kv + (16 << 10))
    weights = WeightCache(budget, stream_kv_tokens=KV_TOKENS)
    sessions = SessionStore(600.0, "test", budget, swap=True, host_limit_bytes=1 << 30)
    fingerprint = models.fingerprint(state)
    weights.register(fingerprint, config_dict(tiny_model), torch.float32,
                     [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()])
    cached = weights.receive(fingerprint, state)
    return Executor(budget, weights, sessions), cached


def test_the_streamed_model_keeps_its_planned_layers_resident(streamed, tiny_model):
    executor, cached = streamed
    plan, handle = cached.plan, cached.stream
    assert cached.streamed and handle is not None
    assert len(plan.resident_layers) == RESIDENT and handle.resident_layers == plan.resident_layers
    assert handle.streamed_layers == plan.streamed_layers and handle.prefetch_depth == plan.prefetch_depth == 2
    assert handle.ring.capacity_bytes == plan.ring_bytes == cached.ring_bytes
    assert sum(handle.layer_bytes) == plan.bytes_streamed_per_token
    assert executor.budget.held()["weights"] == cached.device_bytes == plan.device_bytes
    assert plan.kv_reserved_bytes == models.kv_bytes_per_token(tiny_model.config, torch.float32) * KV_TOKENS


def test_kv_past_the_plans_reserve_pages_under_the_same_budget_and_decodes_exactly(streamed, tiny_model):
    executor, cached = streamed
    prompts = [torch.randint(0, 8192, (1, PROMPT), generator=torch.Generator().manual_seed(7 + i))
               for i in range(SESSIONS)]
    refs = [tiny_model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0) for p in prompts]
    before = cached.stream.stats.bytes_streamed
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]

    def step(session, ids):
        executor.sessions.get(session.handle, cached.fingerprint)
        return greedy(executor.session_step(session, ids))

    tokens = [[step(s, p)] for s, p in zip(sessions, prompts)]
    for _ in range(NEW_TOKENS - 1):
        for s, out in zip(sessions, tokens):
            out.append(step(s, out[-1]))
            assert executor.budget.in_use() <= executor.budget.limit_bytes
    for p, out, ref in zip(prompts, tokens, refs):
        assert torch.equal(torch.cat([p, *out], dim=1), ref)
    # Three sessions' KV against a reserve of one: paged out and back, never over the budget.
    assert executor.sessions.paging.page_outs > 0 and executor.sessions.paging.page_ins > 0
    forwards = SESSIONS * NEW_TOKENS
    assert cached.stream.stats.bytes_streamed - before == forwards * cached.plan.bytes_streamed_per_token
