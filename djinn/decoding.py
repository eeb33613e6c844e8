"""The one forward call and the one greedy pick that every mode shares.

Local and remote execution call exactly this, with the same arguments HF
`generate` uses (only the last position's logits), so their logits agree bit for
bit on the same device and dtype.
"""
from __future__ import annotations

import torch
from torch.func import functional_call


@torch.no_grad()
def forward_last(model: torch.nn.Module, ids: torch.Tensor, cache, weights: dict | None = None) -> torch.Tensor:
    """Logits of the last position, [batch, vocab]; `cache` is extended in place."""
    kwargs = dict(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = functional_call(model, weights, (), kwargs) if weights else model(**kwargs)
    return out.logits[:, -1]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token of each row, [batch, 1]."""
    return logits.argmax(dim=-1, keepdim=True)
