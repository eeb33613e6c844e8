"""Which decoder layers of a streamed model stay on the device, and how large its ring is.

Every streamed byte costs the link's time on every token (at ~55 GB/s, ~18 ms per GB
per token), while a resident byte costs nothing after the upload. So a model larger
than its budget keeps as many decoder layers resident as fit beside its always-resident
parts (embeddings, final norm, lm_head), the KV cache it reserves and a forward's
activations, and streams only the rest through a ring just large enough to keep the
link busy (the issue measured on the H200: a 9.1 GB ring of 14.4 layers left every one
of the 40 layers of a 13B model streaming; a ring of 3 leaves room for ~12 resident).
This is what bs-1 offloaders do (llama.cpp's `-ngl`, vLLM's prefetch offloader).

The ring holds the layer running plus `prefetch_depth` layers in flight. Within a
forward the host runs ahead of the device (the hooks enqueue copies and kernels without
waiting), so a copy is always queued behind the one in progress; what can stall the link
is a ring slot still in use. With depth d, the copy d layers ahead reuses the slot of the
streamed layer just before the current one, free once that layer and the run of r
resident layers after it have computed: the link never waits while (r + 1) x compute <=
d x transfer per layer. Decode on a GPU is far on the safe side (a 13B layer copies in
~11.5 ms at 55 GB/s and reads its weights from HBM in ~0.13 ms), so d = 1, a ring of two
layers, and every other slot is a resident layer (each one 11.5 ms less per token). When
the layer times are unknown the plan takes d = 2, the streamer's default.
Resident layers are spread evenly through the stack to keep those runs short.

Pure: no torch, so every plan is unit-tested on synthetic sizes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from djinn.errors import OutOfMemory

__all__ = ["UNKNOWN_TIMES_PREFETCH_DEPTH", "ResidencyPlan", "plan_residency", "spread"]

# The depth when the layer times are unknown: the streamer's default, one copy queued
# behind the one in progress even when the host falls behind for a layer.
UNKNOWN_TIMES_PREFETCH_DEPTH = 2


@dataclass(frozen=True)
class ResidencyPlan:
    """Where a streamed model's decoder layers live, and what that costs per token."""
    num_layers: int
    resident_layers: tuple[int, ...]  # decoder-layer indices kept on the device
    streamed_layers: tuple[int, ...]  # the others: copied through the ring on every forward
    prefetch_depth: int  # layers copied ahead of the one running
    ring_slots: int  # layers the ring holds at once (the running one and those in flight)
    ring_bytes: int
    bytes_streamed_per_token: int  # host->device weight bytes of one forward
    bytes_resident: int  # weights on the device: always-resident parts and resident layers
    kv_reserved_bytes: int  # left free for the KV cache the plan was made for
    activation_reserved_bytes: int  # left free for a forward's transient memory
    available_bytes: int  # what the plan had: device bytes for weights, ring, KV and activations
    why: str

    @property
    def device_bytes(self) -> int:
        """What the model holds of the device budget: resident weights and the ring."""
        return self.bytes_resident + self.ring_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "device_bytes": self.device_bytes}


def spread(count: int, total: int) -> tuple[int, ...]:
    """`count` of `total` indices, evenly spaced: the middle of each of `count` equal shares."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot pick {count} of {total} layers")
    return tuple((2 * i + 1) * total // (2 * count) for i in range(count))


def _longest_run(resident: tuple[int, ...]) -> int:
    longest = run = 0
    previous = None
    for index in resident:
        run = run + 1 if previous is not None and index == previous + 1 else 1
        longest, previous = max(longest, run), index
    return longest


def _depth_for(resident: tuple[int, ...], compute_per_transfer: float | None) -> tuple[int, str]:
    if compute_per_transfer is None:
        return UNKNOWN_TIMES_PREFETCH_DEPTH, "layer times unknown"
    if compute_per_transfer >= 1:
        return 1, (f"compute-bound (a layer computes in {compute_per_transfer:.3g}x its copy time): "
                   f"each copy hides behind the compute of the layer before it")
    run = _longest_run(resident)
    return max(1, math.ceil((run + 1) * compute_per_transfer)), (
        f"transfer-bound (a layer computes in {compute_per_transfer:.3g}x its copy time; "
        f"longest resident run {run})")


def plan_residency(*, available_bytes: int, layer_bytes: Sequence[int], fixed_bytes: int, kv_bytes: int,
                   activation_bytes: int, ring_bytes: int | None = None,
                   compute_per_transfer: float | None = None) -> ResidencyPlan:
    """The plan that streams the fewest bytes per token within `available_bytes`.

    `layer_bytes`: each decoder layer as the streamer packs it; `fixed_bytes`: the parts
    always resident; `kv_bytes`, `activation_bytes`: what to leave free (the KV cache is
    reserved for the longest context the plan serves: no re-planning as it grows).
    `ring_bytes` fixes the ring (an operator's choice); None sizes it from the depth.
    `compute_per_transfer`, a layer's decode compute time over its copy time, sizes the
    depth when known. Raises `OutOfMemory` when not even the ring fits.
    """
    total = len(layer_bytes)
    if total == 0 or min(layer_bytes) <= 0:
        raise ValueError(f"a streamed model needs decoder layers of positive size, got {list(layer_bytes)}")
    for name, value in (("available_bytes", available_bytes), ("fixed_bytes", fixed_bytes),
                        ("kv_bytes", kv_bytes), ("activation_bytes", activation_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    slot = max(layer_bytes)
    room = available_bytes - fixed_bytes - kv_bytes - activation_bytes
    by_size = sorted(range(total), key=lambda i: layer_bytes[i])

    def resident_for(ring: int) -> tuple[int, ...]:
        """The most layers that fit beside `ring`, smallest first; at least one streams, or
        the model needed no ring. Equal layers (every decoder we stream) are spread evenly."""
        left, count = room - ring, 0
        for index in by_size[:total - 1]:
            if layer_bytes[index] > left:
                break
            left -= layer_bytes[index]
            count += 1
        return spread(count, total) if len(set(layer_bytes)) == 1 else tuple(sorted(by_size[:count]))

    if ring_bytes is not None:
        depth, depth_why = UNKNOWN_TIMES_PREFETCH_DEPTH, "the ring's size was given"
        ring, slots = ring_bytes, ring_bytes // slot
        if ring < slot:
            raise OutOfMemory(f"a ring of {ring} bytes cannot hold a decoder layer of {slot} bytes")
    else:
        depth = 1 if compute_per_transfer is not None else UNKNOWN_TIMES_PREFETCH_DEPTH
        # One layer deeper at a time: each keeps fewer layers resident, which shortens the runs
        # the depth must cover, so the shallowest sufficient ring is found within a few rounds.
        while True:
            slots = depth + 1
            ring = slots * slot
            if room < ring:
                depth_why = "no room"
                break
            needed, depth_why = _depth_for(resident_for(ring), compute_per_transfer)
            if needed > depth and room < (slots + 1) * slot:
                depth_why += f"; {needed} would be better, but a deeper ring does not fit"
                break
            if needed <= depth:
                break
            depth += 1
    if room < ring:
        raise OutOfMemory(f"{available_bytes / 2**30:.2f} GiB cannot hold even the ring: always-resident parts "
                          f"{fixed_bytes / 2**30:.2f} GiB, KV {kv_bytes / 2**30:.2f} GiB, activations "
                          f"{activation_bytes / 2**30:.2f} GiB and a ring of {ring / 2**30:.2f} GiB")
    resident = resident_for(ring)
    streamed = tuple(i for i in range(total) if i not in set(resident))
    resident_layer_bytes = sum(layer_bytes[i] for i in resident)
    streamed_bytes = sum(layer_bytes[i] for i in streamed)
    why = (f"{available_bytes / 2**30:.2f} GiB = always-resident {fixed_bytes / 2**30:.2f} + KV "
           f"{kv_bytes / 2**30:.2f} + activations {activation_bytes / 2**30:.2f} + ring {ring / 2**30:.2f} "
           f"({slots} layers: depth {depth}, {depth_why}) + {len(resident)} resident layers "
           f"{resident_layer_bytes / 2**30:.2f} GiB; {len(streamed)} of {total} layers stream "
           f"{streamed_bytes / 1e9:.2f} GB per token")
    return ResidencyPlan(total, resident, streamed, depth, slots, ring, streamed_bytes,
                         fixed_bytes + resident_layer_bytes, kv_bytes, activation_bytes, available_bytes, why)
