"""The one forward call that every mode shares, and the padding of a batch.

Local and remote execution call exactly this, with the same arguments HF
`generate` uses (only the last position's logits; for a padded batch the attention
mask and the positions HF derives from it), so their logits agree bit for bit on the
same device and dtype.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch.func import functional_call


@dataclass(frozen=True)
class Padding:
    """A padded batch as HF's `generate` feeds it: the mask of every token so far and the step's positions.

    HF derives the prompt's positions from the mask (`_prepare_position_ids_for_generation`:
    cumsum - 1, padding at 0) and then adds one per step (`_update_model_kwargs_for_generation`);
    the mask grows by a column of ones per step, for finished rows too.
    """
    mask: torch.Tensor  # [batch, tokens so far, the step's own included], int64, 1 = attend
    positions: torch.Tensor  # [batch, the step's tokens], int64

    @classmethod
    def of_prompt(cls, mask: torch.Tensor) -> "Padding":
        mask = mask.long()
        return cls(mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))

    def next(self, tokens: int = 1) -> "Padding":
        """The padding of the step that feeds `tokens` more tokens after this one."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], tokens)], dim=1)
        steps = torch.arange(1, tokens + 1, dtype=torch.long, device=self.positions.device)
        return Padding(mask, self.positions[:, -1:] + steps)

    def to(self, device: torch.device) -> "Padding":
        return Padding(self.mask.to(device), self.positions.to(device))


@functools.cache
def cache_argument(model_class: type) -> str:
    """The name under which this model class's forward takes its KV cache."""
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name
    # warns and goes in 5.40); 5.17, on the GPU host, knows only the old one.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_last(model: torch.nn.Module, ids: torch.Tensor, cache, weights: dict | None = None,
                 padding: Padding | None = None) -> torch.Tensor:
    """Logits of the last position, [batch, vocab]; `cache` is extended in place."""
    return forward_logits(model, ids, cache, weights, padding)[:, -1]


@torch.no_grad()
def forward_logits(model: torch.nn.Module, ids: torch.Tensor, cache, weights: dict | None = None,
                   padding: Padding | None = None, all_positions: bool = False) -> torch.Tensor:
    """Logits of the last position, [batch, 1, vocab], or of every position (HF's `logits_to_keep=0`)."""
    kwargs = {"input_ids": ids, cache_argument(type(model)): cache, "use_cache": True,
              "logits_to_keep": 0 if all_positions else 1}
    if padding is not None:
        kwargs.update(attention_mask=padding.mask, position_ids=padding.positions)
    if weights:
        # As the module's own parameters: CPU kernels take another path (and differ in the last
        # bit) for weights that do not require grad, even under no_grad.
        params = dict(model.named_parameters())
        weights = {n: t.detach().requires_grad_(params[n].requires_grad) if n in params else t
                   for n, t in weights.items()}
        # tie_weights (functional_call's default): a tied weight shipped once stands for all its names.
        out = functional_call(model, weights, (), kwargs)
    else:
        out = model(**kwargs)
    return out.logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token of each row, [batch, 1]."""
    return logits.argmax(dim=-1, keepdim=True)
