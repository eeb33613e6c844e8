"""How many decoder layers of a large shape the ring-buffer experiment runs on this host.

Issue 17's 70B run: llama-2-70b at a 24 GB budget with as many of its 80 layers as the host
can hold page-locked, compared with the same truncated model resident on the device. The
streamer's model is built on the device and its streamed layers are copied out to one
pinned host arena (`djinn.server.streamer`), so host memory holds only those layers; the
device must hold the whole truncated model once, for the resident reference. The count is
the largest that satisfies both, each layer count with its own residency plan (the plan's
KV reserve grows with the layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from djinn.server.residency import ResidencyPlan

# Host memory the arena leaves to everything else in the pytest process and on the host
# (torch and CUDA's own ~5 GB, the prompt, the results, the page cache): measured
# MemAvailable less this is what the arena may take.
HOST_MARGIN_BYTES = 12 << 30


@dataclass(frozen=True)
class LayerCount:
    num_layers: int
    plan: ResidencyPlan
    arena_bytes: int  # pinned host memory of the streamed layers
    host_available_bytes: int  # what djinn.host_memory said before anything was built
    device_bytes: int  # what the resident reference needs on the device
    limited_by: str


def layers_that_fit(full_layers: int, layer_bytes: int, device_model_bytes: Callable[[int], int],
                    plan_for: Callable[[int], ResidencyPlan], host_available_bytes: int,
                    device_free_bytes: int) -> LayerCount:
    """The most layers (at most `full_layers`) whose streamed share fits the host's pinnable memory
    and whose whole model fits the device; `plan_for(n)` is the residency plan of n layers,
    `device_model_bytes(n)` the resident reference's device need."""
    pinnable = host_available_bytes - HOST_MARGIN_BYTES
    for n in range(full_layers, 0, -1):
        plan = plan_for(n)
        arena = len(plan.streamed_layers) * layer_bytes
        device = device_model_bytes(n)
        if arena <= pinnable and device <= device_free_bytes:
            if n == full_layers:
                limited = "nothing: the whole model fits"
            elif len(plan_for(n + 1).streamed_layers) * layer_bytes > pinnable:
                limited = "host memory"
            else:
                limited = "device memory (the resident reference)"
            return LayerCount(n, plan, arena, host_available_bytes, device, limited)
    raise ValueError(f"not one streamed layer of {layer_bytes / 2**30:.2f} GiB fits: "
                     f"{host_available_bytes / 2**30:.1f} GiB host memory available (less a {HOST_MARGIN_BYTES / 2**30:.0f} GiB margin), "
                     f"{device_free_bytes / 2**30:.1f} GiB free on the device")
