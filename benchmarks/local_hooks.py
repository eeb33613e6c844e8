"""The user-code baseline of the interventions: plain forward hooks on a local HF model.

What a white-box user writes without Djinn (and what nnsight's HF backend amounts to): hooks
on `model.model.layers[i]`, its `.self_attn` and `.mlp`, `.embed_tokens` and `.norm`, written
against HF's Llama module tree directly, not with Djinn's hook code. Djinn's server-side
interventions are checked against these bit for bit (tests/test_interventions.py) and timed
against them (benchmarks/test_exp3_interventions.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from djinn import kv
from djinn.decoding import forward_logits

Hook = tuple[str, "int | None", Callable[[torch.Tensor], "torch.Tensor | None"]]  # site, layer, fn(h)


def module_of(model: nn.Module, site: str, layer: int | None) -> nn.Module:
    if site == "embeddings":
        return model.model.embed_tokens
    if site == "final_norm":
        return model.model.norm
    block = model.model.layers[layer]
    return {"layer": block, "attention": block.self_attn, "mlp": block.mlp}[site]


def edit_of(op: str, value=None, positions=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user's hook does to a hidden state [batch, tokens, hidden]: scale by `value`, add
    `value`, replace by `value`, zero, or set to the mean over the positions."""
    def apply(h: torch.Tensor) -> torch.Tensor:
        part = h if positions is None else h[:, positions]
        if op == "scale":
            new = part * value
        elif op == "add":
            new = part + value
        elif op == "replace":
            new = torch.broadcast_to(value, part.shape).contiguous()
        elif op == "zero":
            new = torch.zeros_like(part)
        elif op == "mean":
            new = part.mean(dim=1, keepdim=True).expand_as(part).contiguous()
        else:
            raise ValueError(f"unknown edit {op!r}")
        if positions is None:
            return new
        out = h.clone()
        out[:, positions] = new
        return out
    return apply


def recorder(into: list, positions=None) -> Callable[[torch.Tensor], None]:
    """A hook function that keeps a copy of what it sees (at `positions`: a list, or a slice such as
    `slice(-1, None)`, which indexes without an index tensor) and changes nothing."""
    def fn(h: torch.Tensor) -> None:
        into.append((h if positions is None else h[:, positions]).clone())
    return fn


@contextmanager
def hooked(model: nn.Module, hooks: Iterable[Hook]):
    """The hooks installed for the block, removed after it; at one module they run in the order given."""
    handles = []
    for site, layer, fn in hooks:
        def hook(module, args, output, fn=fn):
            h = output if isinstance(output, torch.Tensor) else output[0]
            new = fn(h)
            if new is None:
                return None
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])
        handles.append(module_of(model, site, layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def lens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens: the final norm and the unembedding applied to a hidden state."""
    return model.lm_head(model.model.norm(hidden))


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt: torch.Tensor, steps: int,
                    hooks_at: Callable[[int], Iterable[Hook]]) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Greedy decoding with `hooks_at(step)` installed around each step's forward (step 0: the prompt):
    the tokens [batch, steps], each step's last-position logits [batch, steps, vocab], the KV cache."""
    cache, feed, tokens, logits = kv.from_pairs([]), prompt, [], []
    for step in range(steps):
        with hooked(model, hooks_at(step)):
            out = forward_logits(model, feed, cache)[:, -1]
        feed = out.argmax(-1, keepdim=True)
        tokens.append(feed)
        logits.append(out)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1), cache
