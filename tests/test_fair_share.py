"""Cross-client eviction within fair shares (issue 13, closing note: "a client can still
evict another client's idle model by filling the budget"). In-process, on the weight cache:
each connection's share is the budget over the clients holding models; a client may evict
its own idle models, and another's only while that one holds more than its share."""
from __future__ import annotations

import pytest
import torch

from djinn import models
from djinn.client import config_dict
from djinn.errors import OutOfMemory
from djinn.server.device_budget import DeviceBudget
from djinn.server.weight_cache import FairShare, TensorEntry, WeightCache

A, B = b"client-a", b"client-b"


@pytest.fixture(scope="module")
def three():
    """Three tiny models with distinct weights: (model, fingerprint, state) each."""
    built = [models.build(models.TINY_MODEL, seed=seed) for seed in range(3)]
    return [(m, models.fingerprint(m.state_dict()), m.state_dict()) for m in built]


def nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def cache_for(models_worth: float, three) -> WeightCache:
    return WeightCache(DeviceBudget(torch.device("cpu"), int(models_worth * nbytes(three[0][2]))))


def register(cache: WeightCache, entry, peer: bytes):
    model, fingerprint, state = entry
    return cache.register(fingerprint, config_dict(model), torch.float32,
                          [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()], peer=peer)


def load(cache: WeightCache, entry, peer: bytes):
    register(cache, entry, peer)
    return cache.receive(entry[1], entry[2])


def test_a_client_filling_the_budget_evicts_its_own_model_not_anothers(three):
    cache = cache_for(2.5, three)  # two models fit, a third does not: the share is 1.25 models each
    load(cache, three[0], A)  # A's model is the least recently used, and idle
    load(cache, three[1], B)
    load(cache, three[2], B)
    assert three[0][1] in cache.models, "B evicted A's model while A held less than its share"
    assert three[1][1] not in cache.models and cache.counters.evictions == 1, "B's own idle model made room"


def test_a_client_over_its_share_is_the_one_evicted(three):
    cache = cache_for(2.5, three)
    load(cache, three[0], A)
    load(cache, three[1], A)  # A alone: the whole budget is its share
    load(cache, three[2], B)  # now two clients: A's two models are over its 1.25
    assert set(cache.models) == {three[1][1], three[2][1]}, "A's least recently used model goes, down to its share"


def test_no_room_within_the_shares_is_a_clear_out_of_memory(three):
    cache = cache_for(2.5, three)
    load(cache, three[0], A)
    register(cache, three[1], B)  # B's upload in progress holds its model
    with pytest.raises(OutOfMemory, match="within their fair share"):
        register(cache, three[2], B)
    assert three[0][1] in cache.models


def test_the_server_loading_a_model_itself_may_take_any_idle_model(three):
    cache = cache_for(1.5, three)
    load(cache, three[0], A)
    cache.preload("second", three[1][0])  # --model: no client's share
    assert set(cache.models) == {three[1][1]}


def test_a_shared_model_counts_a_part_to_each_holder(three):
    cache = cache_for(4, three)
    shared = load(cache, three[0], A)
    register(cache, three[0], B)  # B registers the same weights: it holds the model with A
    load(cache, three[1], A)
    shares = FairShare(cache.models.values(), cache.budget.limit_bytes, peer=None)
    size = nbytes(three[0][2])
    assert shares.clients == 2 and shares.share == 2 * size
    assert shares.held(A) == pytest.approx(1.5 * size) and shares.held(B) == pytest.approx(0.5 * size)
    assert shares.may_evict(shared, B), "a holder may evict the model it holds"
