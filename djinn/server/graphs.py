"""Graph-captured decode: a static KV cache and one CUDA graph per decode slot.

HF eager decoding of a 7B model is bound by kernel launches, not by the GPU: a
decode step launches hundreds of small kernels from Python. A dedicated server can
capture the step once as a CUDA graph over a `StaticCache` (fixed addresses, the
position as a device tensor) and replay it: one launch per token. The logits then
differ from eager HF in the last bits (the attention spans the static length under
a mask), so the graph path is an option of the server, off where bit-identical
logits matter.
"""
from __future__ import annotations

import torch
from transformers import StaticCache

CAPTURE_WARMUP_STEPS = 2  # CUDA graphs need the step run on a side stream before capture


class GraphDecoder:
    """A static cache for one sequence batch and the captured decode step over it."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, device: torch.device):
        self.model = model
        self.batch = batch
        self.max_len = max_len
        self.device = device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=positions, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] != self.batch or ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt {list(ids.shape)} does not fit a slot of batch {self.batch}, "
                             f"length {self.max_len}")
        if self.length:
            self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device)
        logits = self._forward(ids, positions)
        self.length = ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.length >= self.max_len:
            raise ValueError(f"slot full: {self.max_len} tokens")
        self.ids.copy_(token)
        self.position.fill_(self.length)
        if self.device.type != "cuda":
            logits = self._forward(self.ids, self.position)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.length += 1
        return logits

    def _capture(self) -> None:
        # Warm-up steps write at the current position, which the real step overwrites
        # before any later step reads it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP_STEPS):
                self._forward(self.ids, self.position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(self.ids, self.position)
