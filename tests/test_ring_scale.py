"""The 70B run's layer count (benchmarks.ring_scale): as many layers as the host can pin and the
device can hold resident, each count with its own residency plan."""
from __future__ import annotations

import pytest

from djinn.server.residency import plan_residency

from benchmarks.ring_scale import HOST_MARGIN_BYTES, layers_that_fit

GIB = 1 << 30
LAYER = 1_711_276_032  # a llama-2-70b decoder layer in fp16
FIXED = 524_304_384  # its embeddings, final norm and lm_head
KV_PER_LAYER = 562 * 4096  # per token per layer (GQA, 8 KV heads), for 562 tokens


def plan_for(n):
    return plan_residency(available_bytes=24 * 10**9, layer_bytes=[LAYER] * n, fixed_bytes=FIXED,
                          kv_bytes=KV_PER_LAYER * n, activation_bytes=512 << 20, compute_per_transfer=0.011)


def device_need(n):
    return FIXED + n * LAYER + KV_PER_LAYER * n


def test_a_125_gb_host_limits_the_70b_to_what_it_can_pin():
    count = layers_that_fit(80, LAYER, device_need, plan_for, host_available_bytes=118 * GIB,
                            device_free_bytes=140 * GIB)
    streamed = len(count.plan.streamed_layers)
    assert count.limited_by == "host memory"
    assert count.arena_bytes == streamed * LAYER <= 118 * GIB - HOST_MARGIN_BYTES < (streamed + 1) * LAYER
    assert count.num_layers == streamed + len(count.plan.resident_layers) and 60 < count.num_layers < 80
    assert count.device_bytes == device_need(count.num_layers)


def test_a_small_device_limits_the_count_by_the_resident_reference():
    count = layers_that_fit(80, LAYER, device_need, plan_for, host_available_bytes=1024 * GIB,
                            device_free_bytes=80 * GIB)
    assert count.limited_by.startswith("device memory") and device_need(count.num_layers) <= 80 * GIB
    assert device_need(count.num_layers + 1) > 80 * GIB


def test_everything_fits_on_a_large_host_and_device():
    count = layers_that_fit(80, LAYER, device_need, plan_for, 1024 * GIB, 1024 * GIB)
    assert count.num_layers == 80 and count.limited_by.startswith("nothing")


def test_a_host_without_room_for_one_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="not one streamed layer"):
        layers_that_fit(80, LAYER, device_need, plan_for, HOST_MARGIN_BYTES, 140 * GIB)
