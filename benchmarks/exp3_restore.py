"""exp3's user-code baseline at a breakpoint: no Djinn, the model on this process's device.

`park` pauses a prefill after decoder layer N with the same `ParkedForward` the server
uses. `ManualOffload` is what careful user code does with it: the (steered) activation and
layers 0..N's KV go to pinned host memory and the device copies are dropped; `restore`
later copies them back asynchronously. The exp3 benchmark's `manual_offload` and
`benchmarks/probes/server_resume_marks.py` time this one restore.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn import kv
from djinn.decoding import forward_last
from djinn.server.breakpoints import ParkedForward


def park(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> tuple[ParkedForward, object]:
    """A prefill of `ids` parked after decoder layer `layer`, and the KV cache it fills."""
    cache = kv.from_pairs([])
    return ParkedForward(model, layer, lambda: forward_last(model, ids, cache)), cache


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.clone()


@dataclass
class ManualOffload:
    parked: ParkedForward
    cache: object  # its layers are meta tensors while offloaded
    activation: torch.Tensor  # pinned host memory (on a CPU device, a copy)
    host_kv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, parked: ParkedForward, cache, scale: float) -> "ManualOffload":
        """Offload at the breakpoint: the activation times `scale`, and the KV, to host memory.
        The copies to host are synchronous; the device's are dropped once they are made."""
        activation = _to_host(parked.activation * scale)
        host_kv = [(_to_host(k), _to_host(v)) for k, v in kv.to_pairs(cache)]
        for index, (k, v) in enumerate(kv.to_pairs(cache)):
            kv.set_layer(cache, index, k.to("meta"), v.to("meta"))
        return cls(parked, cache, activation, host_kv)

    @property
    def nbytes(self) -> int:
        return self.activation.nbytes + sum(k.nbytes + v.nbytes for k, v in self.host_kv)

    def restore(self, device: torch.device | str) -> torch.Tensor:
        """The KV back into the cache and the activation to `device`; the activation.
        The copies are asynchronous on a GPU: synchronise before timing them as done."""
        on_gpu = torch.device(device).type == "cuda"

        def back(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True) if on_gpu else t.clone()

        for index, (k, v) in enumerate(self.host_kv):
            kv.set_layer(self.cache, index, back(k), back(v))
        return back(self.activation)
