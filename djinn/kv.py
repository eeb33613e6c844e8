"""The KV cache as plain tensors and back, across transformers releases.

The wire and the session store see a KV cache as a list of (keys, values) per layer;
HuggingFace models see a `DynamicCache`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

KVPairs = list[tuple[torch.Tensor, torch.Tensor]]


def to_pairs(cache: DynamicCache) -> KVPairs:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def from_pairs(pairs: KVPairs) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(pairs):
        cache.update(keys, values, index)
    return cache


def wrap(pairs: KVPairs) -> DynamicCache:
    """A cache holding exactly these tensors, uncopied (`from_pairs` copies them in)."""
    cache = from_pairs([(torch.empty_like(k, device="meta"), torch.empty_like(v, device="meta")) for k, v in pairs])
    for index, (keys, values) in enumerate(pairs):
        set_layer(cache, index, keys, values)
    return cache


def nbytes(pairs: KVPairs) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in pairs)


def wire_names(num_layers: int) -> list[tuple[str, str]]:
    """Tensor names of each layer's keys and values in a message."""
    return [(f"kv.{i}.k", f"kv.{i}.v") for i in range(num_layers)]


def set_layer(cache: DynamicCache, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace one layer's tensors in place: the session store pages and rolls back through this."""
    if hasattr(cache, "layers"):
        cache.layers[index].keys, cache.layers[index].values = keys, values
    else:  # transformers < 4.56
        cache.key_cache[index], cache.value_cache[index] = keys, values


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop every layer's tokens past `length` (a step that failed or was cancelled half-way).

    A copy of the first `length` tokens frees the dropped tail. A rollback must never fail,
    though, and the rollback of a step that ran out of device memory has no room for a copy:
    then the layer keeps a view, whose tail's bytes go when the next step replaces it."""
    for index, (keys, values) in enumerate(to_pairs(cache)):
        if keys.dim() == 4 and keys.shape[-2] > length:
            kept_keys, kept_values = keys[..., :length, :], values[..., :length, :]
            try:
                kept_keys, kept_values = kept_keys.clone(), kept_values.clone()
            except torch.OutOfMemoryError:
                pass
            set_layer(cache, index, kept_keys, kept_values)
