"""A server whose budget is smaller than a model's weights streams it through its ring
(seed 003): same client API, logits bit-identical to HF generate, the ring in the stats."""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn import models
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.device_budget import DeviceBudget
from djinn.server.streamer import find_decoder_layers
from djinn.server.weight_cache import TensorEntry, WeightCache

from benchmarks.launcher import cpu_server

pytestmark = pytest.mark.ring_buffer

NEW_TOKENS = 12
MODEL_BYTES = models.parameter_bytes(models.TINY_MODEL, torch.float32)
BUDGET_BYTES = int(MODEL_BYTES * 0.8)  # the weights do not fit: streamed
KV_TOKENS = 64  # the residency plan's KV reserve: a 40-token prompt and its new tokens


def _layer_bytes(model) -> list[int]:
    return [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in find_decoder_layers(model)]


@pytest.fixture(scope="module")
def ring_bytes(tiny_model) -> int:
    ring = 6 << 20  # a whole number of MiB survives the trip through --ring-buffer-gb
    assert 2 * max(_layer_bytes(tiny_model)) < ring < 3 * max(_layer_bytes(tiny_model))
    return ring


@pytest.fixture(scope="module")
def small_server(server_launcher, ring_bytes):
    server = server_launcher.start("streaming", cpu_server("--vram-budget-gb", f"{BUDGET_BYTES / 2**30:.9f}",
                                                           "--ring-buffer-gb", f"{ring_bytes / 2**30:.9f}",
                                                           "--stream-kv-tokens", str(KV_TOKENS),
                                                           "--disable-kv-swap"))
    yield server
    server.stop()


@pytest.fixture
def client(small_server):
    with djinn.connect(small_server.host_port, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model, hf_greedy):
    ids = torch.randint(0, 8192, (1, 40), generator=torch.Generator().manual_seed(3))
    return (ids, *hf_greedy(tiny_model, ids, NEW_TOKENS))


def _model_stats(client, fingerprint: str) -> dict:
    return next(m for m in client.stats()["models"] if m["fingerprint"] == fingerprint)


@pytest.mark.parametrize("mode", ["full_djinn", "remote_cache", "partially_aware"])
def test_streamed_model_matches_hf_generate_bit_for_bit(client, tiny_model, reference, ring_bytes, mode):
    ids, ref_tokens, ref_logits = reference
    remote = client.load(tiny_model, mode=mode)
    before = _model_stats(client, remote.fingerprint)["stream"]["bytes_streamed"]
    tokens = remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(remote.last_logits, ref_logits)

    stats = _model_stats(client, remote.fingerprint)
    plan = stats["residency"]
    streamed = sum(_layer_bytes(tiny_model)[i] for i in plan["streamed_layers"])
    # The budget leaves room beside the given ring for two of the eight layers (the plan's).
    assert stats["streamed"] and stats["ring_bytes"] == plan["ring_bytes"] == ring_bytes
    assert len(plan["resident_layers"]) == 2 and plan["bytes_streamed_per_token"] == streamed
    assert stats["device_bytes"] == plan["device_bytes"] == MODEL_BYTES - streamed + ring_bytes < BUDGET_BYTES
    # every streamed layer once per forward, one forward per new token
    assert stats["stream"]["bytes_streamed"] - before == NEW_TOKENS * streamed
    assert client.stats()["memory"]["weights_bytes"] <= BUDGET_BYTES


def test_server_logs_its_decision(client, small_server, tiny_model):
    client.load(tiny_model, mode="full_djinn")
    assert "exceeds the" in small_server.log() and "streaming through a" in small_server.log()


def test_a_model_that_fits_the_budget_stays_resident(client, make_prompt):
    small = models.build(models.TINY_MODEL, seed=4, num_layers=2)
    ids = make_prompt(small, 16)
    remote = client.load(small, mode="full_djinn")
    assert not _model_stats(client, remote.fingerprint)["streamed"]
    assert torch.equal(remote.generate(ids, max_new_tokens=4),
                       small.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_evicting_a_streamed_model_makes_room_for_another(client, tiny_model, reference):
    ids = reference[0]
    first = client.load(tiny_model, mode="full_djinn").fingerprint
    other = models.build(models.TINY_MODEL, seed=3)
    evictions = client.stats()["cache"]["evictions"]
    remote = client.load(other, mode="full_djinn")  # two rings and residents exceed the budget
    assert client.stats()["cache"]["evictions"] > evictions
    assert first not in {m["fingerprint"] for m in client.stats()["models"]}
    assert torch.equal(remote.generate(ids, max_new_tokens=4),
                       other.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def _entries(model) -> list[TensorEntry]:
    return [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()]


def test_ring_smaller_than_a_layer_is_refused_at_register_before_any_upload(tiny_model):
    layer = max(_layer_bytes(tiny_model))
    cache = WeightCache(DeviceBudget(torch.device("cpu"), BUDGET_BYTES), ring_bytes=layer // 2)
    with pytest.raises(BadRequest, match="does not fit the .* ring.*--ring-buffer-gb"):
        cache.register("f" * 32, tiny_model.config.to_dict(), torch.float32, _entries(tiny_model))
    assert not cache.models


def test_model_too_large_even_streamed_is_refused(tiny_model):
    resident = MODEL_BYTES - sum(_layer_bytes(tiny_model))
    cache = WeightCache(DeviceBudget(torch.device("cpu"), resident), ring_bytes=max(_layer_bytes(tiny_model)))
    with pytest.raises(OutOfMemory, match="does not fit even streamed"):
        cache.register("f" * 32, tiny_model.config.to_dict(), torch.float32, _entries(tiny_model))
    assert not cache.models
