"""One forward for the decode steps of several sessions of one model: continuous batching's compute.

Each session keeps its own KV cache, the `DynamicCache` that the session store pages,
rolls back and parks exactly as for a solo step. A batched step stacks them for one
forward: every layer's keys and values left-padded to the longest session and
concatenated along the batch, an attention mask that hides the padding (and a padded
session's own padding), each row's own position; then each session's cache grows by its
rows of the new KV column, and each session gets its rows of the logits.

Why stacking per step rather than a slot pool of one static cache (as the graph slots
have): sessions join and leave between any two steps, are paged out and rolled back one
by one, and keep every existing code path (breakpoints, paging, rollback) on their own
cache. The price is a copy of the batch's KV per step, read and written once: for the
multitenant experiment's contexts (a few hundred tokens) that is a small fraction of the
weights every decode step reads anyway. A slot pool is the way to drop that copy when
contexts grow; batch-sized CUDA graphs would capture exactly that pool (`unbatched_reason`
keeps graph-slot sessions out of batches until then).

Batched logits are not bit-identical to solo ones: the GEMMs have another shape and the
attention a mask. They are judged teacher-forced (`djinn.equivalence`); a batch of one
session runs the solo step instead, bit for bit what it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn import kv
from djinn.decoding import Padding, forward_last
from djinn.server.session_store import Session


@dataclass(frozen=True)
class BatchedStep:
    """One session's share of a batched decode: its checked token ids and its padding for this step."""
    session: Session
    ids: torch.Tensor  # [rows, 1] int64 on the device
    padding: Padding | None  # a session whose prompt was padded: its mask (this step's column included)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]


def unbatched_reason(session: Session) -> str | None:
    """Why this session's decode runs alone, or None when it may join a batch.

    Interventions (issue 18): a session that carries any runs alone here too, until its
    hooks can act on its own rows of a batch."""
    if session.breakpoint is not None:
        return "parked at a breakpoint"  # its solo step answers with the error
    if session.decoder is not None:
        return "decodes through a CUDA graph slot"  # the hook for batch-sized graphs
    if session.model.streamed:
        return "its model streams through the ring buffer"
    if session.cache is None or session.length == 0:
        return "has no prefill yet"  # its solo step answers with the error
    return None


def stacked_bytes(steps: list[BatchedStep]) -> int:
    """KV the batched forward holds beyond the sessions' own: the stacked copy and its new column."""
    longest = max(step.session.length for step in steps)
    rows = sum(step.rows for step in steps)
    return rows * (longest + 2) * steps[0].session.model.kv_bytes_per_token


def stacked_forward(model: torch.nn.Module, steps: list[BatchedStep]) -> list[torch.Tensor]:
    """The last position's logits of each session, [rows, vocab] each; each session's cache grows by one token."""
    lengths = [step.session.length for step in steps]
    longest = max(lengths)
    bounds, row = [], 0
    for step in steps:
        bounds.append((row, row + step.rows))
        row += step.rows
    per_session = [kv.to_pairs(step.session.cache) for step in steps]
    stacked = []
    for layer in range(len(per_session[0])):
        keys0, values0 = per_session[0][layer]
        keys = keys0.new_zeros(row, keys0.shape[1], longest, keys0.shape[3])
        values = values0.new_zeros(row, values0.shape[1], longest, values0.shape[3])
        for (a, b), length, pairs in zip(bounds, lengths, per_session):
            keys[a:b, :, longest - length:] = pairs[layer][0]
            values[a:b, :, longest - length:] = pairs[layer][1]
        stacked.append((keys, values))
    device = steps[0].ids.device
    mask = torch.zeros(row, longest + 1, dtype=torch.long, device=device)
    positions = torch.empty(row, 1, dtype=torch.long, device=device)
    for (a, b), length, step in zip(bounds, lengths, steps):
        if step.padding is None:
            mask[a:b, longest - length:] = 1
            positions[a:b] = length
        else:
            mask[a:b, longest - length:] = step.padding.mask.to(device)
            positions[a:b] = step.padding.positions.to(device)
    cache = kv.from_pairs(stacked)
    logits = forward_last(model, torch.cat([step.ids for step in steps]), cache, padding=Padding(mask, positions))
    for layer, (keys, values) in enumerate(kv.to_pairs(cache)):
        for (a, b), step in zip(bounds, steps):
            step.session.cache.update(keys[a:b, :, -1:], values[a:b, :, -1:], layer)
    return [logits[a:b] for a, b in bounds]
