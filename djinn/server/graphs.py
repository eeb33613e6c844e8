"""Graph-captured decode: a static KV cache and a CUDA-graph decode step per slot.

HF eager decoding of a 7B model is bound by kernel launches, not by the GPU: a
decode step launches hundreds of small kernels from Python (25 ms/token on an H100
for 4.5 ms of weight reads). A dedicated server can run the step over a
`StaticCache` (fixed addresses, the position as a device tensor) through
`torch.compile(mode="reduce-overhead")`, which records it as a CUDA graph and
replays it: one launch per token. The logits then differ from eager HF in the last
bits (fused kernels, attention over the static length under a mask), so the graph
path is a server option, off where bit-identical logits matter.
"""
from __future__ import annotations

import torch
from transformers import StaticCache

from djinn.decoding import cache_argument


class GraphDecoder:
    """A static cache for one batch of sequences and the compiled decode step over it.

    A slot is reused across sessions (`prefill` resets it), so the step compiles once.
    """

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, device: torch.device,
                 compiled: bool = True, backend=None):
        self.model = model
        self.batch = batch
        self.max_len = max_len
        self.device = device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # The step's inputs live in these buffers, written in place before each step.
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # Which static slots hold tokens. Without it HF treats a one-token query as
        # needing no mask and attends to the unwritten slots too.
        self.mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0
        # `backend` compiles without CUDA graphs (any device): the tests' view of the traced step.
        self.compiled = compiled and (device.type == "cuda" or backend is not None)
        self.cudagraphs = self.compiled and backend is None
        self.cache_argument = cache_argument(type(model))  # looked up here: the compiled forward only reads it
        if self.compiled:
            # Every tensor the graph reads is a static input: the graph reads it in place
            # at a fixed address. The StaticCache tensors HF marks itself when it allocates
            # them (in the eager prefill); these three are ours. Unmarked, cudagraph trees
            # would copy them on every replay into buffers of their private pool that the
            # pool counts as free once recorded.
            for buffer in (self.ids, self.position, self.mask):
                torch._dynamo.mark_static_address(buffer)
            options = {"mode": "reduce-overhead"} if backend is None else {"backend": backend}
            self._step = torch.compile(self._forward, fullgraph=True, dynamic=False, **options)
        else:
            self._step = self._forward

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, **{self.cache_argument: self.cache},
                         cache_position=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] != self.batch or ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt {list(ids.shape)} does not fit a slot of batch {self.batch}, "
                             f"length {self.max_len}")
        if self.length:
            self.cache.reset()
        self.mask.zero_()
        self.mask[:, : ids.shape[1]] = 1
        logits = self._forward(ids, torch.arange(ids.shape[1], device=self.device), self.mask)
        self.length = ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.length >= self.max_len:
            raise ValueError(f"slot full: {self.max_len} tokens")
        self.ids.copy_(token)
        self.position.fill_(self.length)
        self.mask[:, self.length] = 1
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # The graph's output buffer is overwritten by the next replay: hand out a copy.
        logits = self._step(self.ids, self.position, self.mask).clone()
        self.length += 1
        return logits


class GraphSlots:
    """The server's graph slots: one per (model, batch), lent to one session at a time.

    A session that cannot get one (slot busy, prompt too long, model streamed, no room
    in the budget) decodes eagerly instead, so slots only ever speed sessions up.
    """

    def __init__(self, budget, max_len: int):
        self.budget = budget  # djinn.server.device_budget.DeviceBudget: a new slot needs room in it
        self.device = budget.device
        self.max_len = max_len
        self.slots: dict[tuple[str, int], GraphDecoder] = {}
        self.lent: set[int] = set()
        self.bytes = 0  # KV the slots' static caches take
        budget.hold("graph_slots", lambda: self.bytes)

    def acquire(self, cached, batch: int, tokens: int, slot_bytes: int) -> GraphDecoder | None:
        if cached.streamed or tokens >= self.max_len:
            return None
        key = (cached.fingerprint, batch)
        slot = self.slots.get(key)
        if slot is None:
            if self.budget.shortfall(slot_bytes):
                return None
            slot = self.slots[key] = GraphDecoder(cached.model, batch, self.max_len, self.device)
            self.bytes += slot_bytes
        if id(slot) in self.lent:
            return None
        self.lent.add(id(slot))
        return slot

    def release(self, slot: GraphDecoder) -> None:
        self.lent.discard(id(slot))
