"""What a forward or session step asks for, parsed and checked before anything runs.

A bad option fails its request with the session exactly as it was: nothing here
touches a session, so a retried prefill finds it empty and a retried decode feeds
its token once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn.decoding import Padding
from djinn.errors import BadRequest, quote
from djinn.sampling import SamplingParams
from djinn.transport import Codec, Message

RETURNABLE = ("token", "logits", "scores")  # the picked token, the raw logits, the processed scores
MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


@dataclass(frozen=True)
class StepOptions:
    returns: frozenset[str]
    logits_codec: Codec  # of the logits and scores in the reply
    sampling: SamplingParams | None  # a prefill's: the session samples so for its whole life
    attention_mask: torch.Tensor | None  # a prefill's, [batch, tokens], int64; None when it has no padding

    @classmethod
    def parse(cls, message: Message, *, starts_session: bool) -> "StepOptions":
        returns = message.args.get("returns", "logits")
        names = [returns] if isinstance(returns, str) else returns
        # strings first: a list among the names is unhashable (a fuzzed `internal` reply)
        if (not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names)
                or len(set(names)) != len(names) or any(name not in RETURNABLE for name in names)):
            raise BadRequest(f"'returns' must be one of {list(RETURNABLE)} or a list of them, got {quote(returns)}")
        codec = message.args.get("logits_codec", Codec.RAW.value)
        try:
            codec = Codec(codec)
        except ValueError:
            raise BadRequest(f"unknown logits codec {quote(codec)}") from None
        sampling, mask = message.args.get("sampling"), message.tensors.get("attention_mask")
        if not starts_session:
            if sampling is not None or mask is not None:
                raise BadRequest(f"'{message.op}' cannot set sampling or an attention mask: the prefill that "
                                 f"starts the session does, and the session keeps them")
            return cls(frozenset(names), codec, None, None)
        params = SamplingParams.from_wire(sampling) if sampling is not None else SamplingParams()
        if mask is not None:
            mask = _checked_mask(mask, message.tensors.get("input_ids"), "the prompt's input_ids")
            mask = None if bool(mask.all()) else mask  # as HF drops a mask of ones
        return cls(frozenset(names), codec, params, mask)


def stateless_padding(message: Message, past: int, max_positions: int) -> Padding | None:
    """A stateless forward's padding: the mask of every token so far and the step's positions, or none."""
    mask, positions = message.tensors.get("attention_mask"), message.tensors.get("position_ids")
    if mask is None and positions is None:
        return None
    if mask is None or positions is None:
        raise BadRequest("a padded forward sends both 'attention_mask' and 'position_ids'")
    ids = message.tensors.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None  # the executor rejects the ids themselves
    batch, tokens = ids.shape
    mask = _checked_mask(mask, torch.empty(batch, past + tokens), f"{past} cached + {tokens} new tokens")
    if positions.dtype not in (torch.int64, torch.int32) or tuple(positions.shape) != (batch, tokens):
        raise BadRequest(f"'position_ids' must be int64 [batch, new tokens] = {[batch, tokens]}, got "
                         f"{positions.dtype} {list(positions.shape)}")
    if tokens and (int(positions.min()) < 0 or int(positions.max()) >= max_positions):
        raise BadRequest(f"'position_ids' must lie in [0, {max_positions})")
    return Padding(mask, positions.long())


def _checked_mask(mask: torch.Tensor, ids: object, what: str) -> torch.Tensor:
    if mask.dtype not in MASK_DTYPES or mask.dim() != 2:
        raise BadRequest(f"'attention_mask' must be a 2-d int or bool tensor, got {mask.dtype} {list(mask.shape)}")
    if isinstance(ids, torch.Tensor) and tuple(mask.shape) != tuple(ids.shape):
        raise BadRequest(f"'attention_mask' {list(mask.shape)} does not cover {what} {list(ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise BadRequest("'attention_mask' must hold only 0 (padding) and 1")
    return mask.long()
