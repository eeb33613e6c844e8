"""Test-only: make a forward fail as an allocation failure would, to prove that nothing is lost.

`DJINN_TEST_INJECT_OOM` (read once, when the server starts; unset in normal use) is a
comma-separated list of `key=value`:

- `layer=L`: the attention of decoder layer L raises `torch.OutOfMemoryError` on entry,
  so layers 0..L-1 have already appended their KV: the step must roll that back;
- `times=N`: only the first N such calls raise (default: every one);
- `while_in_use_over=BYTES`: only while the device budget's accounted use exceeds BYTES,
  as a device smaller than its budget would: a retry succeeds only after paging.

A CPU has no allocator whose failure could be provoked, and a GPU test would need a
GPU; the hook is one global module pre-hook, installed only when the variable is set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV = "DJINN_TEST_INJECT_OOM"


@dataclass
class InjectedOOM:
    layer: int
    times: int | None = None
    while_in_use_over: int | None = None
    raised: int = 0

    @classmethod
    def parse(cls, spec: str) -> "InjectedOOM":
        fields = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("layer", "times", "while_in_use_over"):
                raise ValueError(f"{ENV}: expected layer=L[,times=N][,while_in_use_over=BYTES], got {spec!r}")
            fields[key.strip()] = int(value)
        if "layer" not in fields:
            raise ValueError(f"{ENV}: 'layer' is required, got {spec!r}")
        return cls(**fields)

    def install(self, budget) -> None:
        def hook(module, args):
            if getattr(module, "layer_idx", None) != self.layer or not type(module).__name__.endswith("Attention"):
                return None
            if self.times is not None and self.raised >= self.times:
                return None
            if self.while_in_use_over is not None and budget.in_use() <= self.while_in_use_over:
                return None
            self.raised += 1
            raise torch.OutOfMemoryError(f"out of memory (injected by {ENV} at decoder layer {self.layer}, "
                                         f"#{self.raised})")
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def remove(self) -> None:
        self._handle.remove()


def install_from_env(budget) -> InjectedOOM | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    injected = InjectedOOM.parse(spec)
    injected.install(budget)
    return injected
