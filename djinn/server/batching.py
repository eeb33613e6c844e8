"""One forward for the decode steps of several sessions of one model: continuous batching's compute.

Each session keeps its own KV cache, the `DynamicCache` that the session store pages,
rolls back and parks exactly as for a solo step. A batched step stacks them for one
forward: every layer's keys and values left-padded to the longest session and
concatenated along the batch, an attention mask that hides the padding (and a padded
session's own padding), each row's own position; then each session's cache grows by its
rows of the new KV column, and each session gets its rows of the logits.

Why stacking rather than a slot pool of one static cache (as the graph slots have):
sessions join and leave between any two steps, are paged out and rolled back one by one,
and keep every existing code path (breakpoints, paging, rollback) on their own cache.
The price is a copy of the batch's KV when its membership changes (`StackedCache`: a
steady batch appends to the last step's stacked cache instead); for the multitenant
experiment's contexts (a few hundred tokens) that copy is a small fraction of the weights
every decode step reads anyway. Batch-sized CUDA graphs would capture a fixed pool of
that shape (`unbatched_reason` keeps graph-slot sessions out of batches until then).

Prompts that arrive together are batched the same way (`stacked_prefill`): left-padded to the
longest, one forward, each session keeping its rows of the KV with the padding cut off, so a
session of N joining tenants waits for one prefill forward, not N.

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

    A traced step (interventions, every position's logits) runs alone too, until its hooks can act
    on its own rows of a batch: `Server.batchable` keeps it out by its request."""
    if session.breakpoint is not None:
        return "parked at a breakpoint"  # its solo step answers with the error
    if session.decoder is not None:
        return "decodes through a fast-path slot (bs-1 CUDA graph)"  # the hook for batch-sized graphs
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


def prefill_bytes(steps: list[BatchedStep]) -> int:
    """KV a batched prefill holds beyond the sessions' own: the padded stacked KV, then each session's copy."""
    longest = max(step.ids.shape[1] for step in steps)
    rows = sum(step.rows for step in steps)
    return 2 * rows * longest * steps[0].session.model.kv_bytes_per_token


class StackedCache:
    """The last batched step's stacked KV, which the next step reuses while the same sessions step together.

    After a batched forward each session's cache holds views of its rows of the stacked
    cache (no copy back). When the next batch is the same sessions in the same order and
    none of their caches changed since (paged, rolled back, stepped alone: any of those
    replaces the views), the stacked cache is already that batch's, one token longer for
    every row: the forward appends to it directly. So a steady batch costs one append per
    layer, not a copy of every session's KV per step (2 x sessions x layers small copies:
    launch-bound on a GPU). When the batch changes, the sessions that left it get copies
    of their views, so the old stacked tensor goes instead of staying pinned by them."""

    def __init__(self):
        self.reused = self.restacked = 0  # batched steps that appended to the last one's cache / copied
        self._sessions: tuple[Session, ...] = ()
        self._cache = None
        self._views: list[kv.KVPairs] = []

    def stacked(self, steps: list["BatchedStep"], lengths: list[int], bounds: list[tuple[int, int]]):
        """The stacked cache of this batch: the last one when it still holds exactly these sessions."""
        sessions = tuple(step.session for step in steps)
        if self._cache is not None and self._holds(sessions):
            cache, self._cache = self._cache, None
            self.reused += 1
            return cache
        self.release(keep=sessions)
        self.restacked += 1
        longest = max(lengths)
        per_session = [kv.to_pairs(step.session.cache) for step in steps]
        rows = bounds[-1][1]
        stacked = []
        for layer in range(len(per_session[0])):
            keys0, values0 = per_session[0][layer]
            keys = keys0.new_zeros(rows, keys0.shape[1], longest, keys0.shape[3])
            values = values0.new_zeros(rows, values0.shape[1], longest, values0.shape[3])
            for (a, b), length, pairs in zip(bounds, lengths, per_session):
                keys[a:b, :, longest - length:] = pairs[layer][0]
                values[a:b, :, longest - length:] = pairs[layer][1]
            stacked.append((keys, values))
        return kv.from_pairs(stacked)

    def keep(self, steps: list["BatchedStep"], cache, lengths: list[int], bounds: list[tuple[int, int]]) -> None:
        """After the forward: each session's cache becomes views of its rows of `cache`."""
        pairs = kv.to_pairs(cache)
        total = pairs[0][0].shape[-2]
        self._views = []
        for step, length, (a, b) in zip(steps, lengths, bounds):
            start = total - length - 1  # its left padding
            views = [(k[a:b, :, start:], v[a:b, :, start:]) for k, v in pairs]
            for layer, (k, v) in enumerate(views):
                kv.set_layer(step.session.cache, layer, k, v)
            self._views.append(views)
        self._sessions, self._cache = tuple(step.session for step in steps), cache

    def release(self, keep: tuple[Session, ...] = ()) -> None:
        """Give the sessions of the last batch (but `keep`) copies of their views, and forget it."""
        for session, views in zip(self._sessions, self._views):
            if any(session is k for k in keep) or session.cache is None:
                continue
            for layer, ((k, v), (vk, vv)) in enumerate(zip(kv.to_pairs(session.cache), views)):
                if k is vk and v is vv:
                    kv.set_layer(session.cache, layer, k.clone(), v.clone())
        self._sessions, self._cache, self._views = (), None, []

    def _holds(self, sessions: tuple[Session, ...]) -> bool:
        if len(sessions) != len(self._sessions) or any(a is not b for a, b in zip(sessions, self._sessions)):
            return False
        return all(k is vk and v is vv for session, views in zip(sessions, self._views)
                   for (k, v), (vk, vv) in zip(kv.to_pairs(session.cache), views))


def _row_bounds(steps: list[BatchedStep]) -> list[tuple[int, int]]:
    """Each session's rows of the stacked batch, in order: [start, end)."""
    bounds, row = [], 0
    for step in steps:
        bounds.append((row, row + step.rows))
        row += step.rows
    return bounds


def stacked_forward(model: torch.nn.Module, steps: list[BatchedStep], stacks: StackedCache) -> list[torch.Tensor]:
    """The last position's logits of each session, [rows, vocab] each; each session's cache grows by one token."""
    lengths = [step.session.length for step in steps]
    longest = max(lengths)
    bounds = _row_bounds(steps)
    row = bounds[-1][1]
    cache = stacks.stacked(steps, lengths, bounds)
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
    logits = forward_last(model, torch.cat([step.ids for step in steps]), cache, padding=Padding(mask, positions))
    stacks.keep(steps, cache, lengths, bounds)
    return [logits[a:b] for a, b in bounds]


def stacked_prefill(model: torch.nn.Module, steps: list[BatchedStep]) -> list[torch.Tensor]:
    """The prompts of several empty sessions as one forward, left-padded to the longest: the last
    position's logits of each session, [rows, vocab] each; each session's cache becomes its rows of
    the KV without the padding (a copy: its later steps run on a cache of its own length, as a solo
    prefill would leave it)."""
    lengths = [step.ids.shape[1] for step in steps]
    longest = max(lengths)
    device = steps[0].ids.device
    bounds = _row_bounds(steps)
    row = bounds[-1][1]
    ids = torch.zeros(row, longest, dtype=torch.long, device=device)  # the padding's id is masked out
    mask = torch.zeros(row, longest, dtype=torch.long, device=device)
    for (a, b), length, step in zip(bounds, lengths, steps):
        ids[a:b, longest - length:] = step.ids
        mask[a:b, longest - length:] = 1
    cache = kv.from_pairs([])
    logits = forward_last(model, ids, cache, padding=Padding.of_prompt(mask))
    pairs = kv.to_pairs(cache)
    for (a, b), length, step in zip(bounds, lengths, steps):
        step.session.cache = kv.from_pairs([(k[a:b, :, longest - length:].clone(), v[a:b, :, longest - length:].clone())
                                            for k, v in pairs])
    return [logits[a:b] for a, b in bounds]
