"""The batched decode of several sessions (djinn.server.batching) against each session's solo steps.

In-process (executor + session store + weight cache): a batched step has other GEMM shapes
and an attention mask, so on CPU fp32 its logits differ from the solo step's in the last
bits; each session is judged teacher-forced (both fed the same tokens, every step's logits
compared) and its cache must hold what its solo run's holds, within the same tolerance.
"""
from __future__ import annotations

import pytest
import torch

from djinn import kv
from djinn.decoding import Padding
from djinn.equivalence import Equivalence, judge
from djinn.errors import BadRequest
from djinn.server.batching import BatchedStep, unbatched_reason

from tests.test_session_store import fingerprinted, kv_per_token, make_executor  # noqa: F401 (fixtures)

NEW_TOKENS = 6
PROMPT_LENGTHS = (5, 23, 12)  # ragged: every session pads to the longest differently


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(19)
    return [torch.randint(0, 8192, (1, n), generator=gen) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def fed(prompts):
    """The tokens every session is fed after its prompt (teacher forcing: the same on both sides)."""
    gen = torch.Generator().manual_seed(20)
    return [torch.randint(0, 8192, (p.shape[0], NEW_TOKENS), generator=gen) for p in prompts]


def _solo(executor, cached, prompt, tokens) -> tuple[torch.Tensor, kv.KVPairs]:
    """Each step's logits [rows, steps, vocab] and the final KV of a session stepped alone."""
    session = executor.sessions.open(cached, b"solo")
    logits = [executor.session_step(session, prompt)]
    for i in range(tokens.shape[1]):
        logits.append(executor.session_step(session, tokens[:, i:i + 1]))
    pairs = [(k.clone(), v.clone()) for k, v in kv.to_pairs(session.cache)]
    executor.sessions.close(session.handle)
    return torch.stack(logits, dim=1), pairs


def _batched(executor, sessions, steps: list[list[int]], tokens) -> list[list[torch.Tensor]]:
    """Step `steps[t]` (indices into `sessions`) together at turn t; each session's logits in order."""
    out = [[] for _ in sessions]
    fed_so_far = [0] * len(sessions)
    for members in steps:
        batch = []
        for i in members:
            ids = tokens[i][:, fed_so_far[i]:fed_so_far[i] + 1]
            padding = sessions[i].padding.next(1) if sessions[i].padding is not None else None
            batch.append(BatchedStep(sessions[i], executor.step_ids(sessions[i], ids), padding))
            if padding is not None:
                sessions[i].padding = padding
        logits = executor.batched_step(batch) if len(batch) > 1 else [
            executor.session_step(batch[0].session, batch[0].ids, batch[0].padding)]
        for i, rows in zip(members, logits):
            out[i].append(rows)
            fed_so_far[i] += 1
    return out


def _assert_equivalent(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> None:
    verdict = judge(reference, candidate)
    assert verdict.verdict is not Equivalence.SILENTLY_WRONG, f"{what}: {verdict}"
    assert verdict.top1_agreement == 1.0, f"{what}: {verdict}"


def _assert_cache_close(session, pairs: kv.KVPairs, what: str) -> None:
    got = kv.to_pairs(session.cache)
    assert len(got) == len(pairs)
    for layer, ((k, v), (rk, rv)) in enumerate(zip(got, pairs)):
        assert k.shape == rk.shape, f"{what}: layer {layer} holds {list(k.shape)}, solo {list(rk.shape)}"
        torch.testing.assert_close(k, rk, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-4)


def test_batched_steps_equal_each_sessions_solo_steps(make_executor, prompts, fed):
    executor, cached = make_executor(1 << 30)
    solo = [_solo(executor, cached, p, t) for p, t in zip(prompts, fed)]
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
    first = [executor.session_step(s, p) for s, p in zip(sessions, prompts)]
    got = _batched(executor, sessions, [[0, 1, 2]] * NEW_TOKENS, fed)
    for i, (session, (ref_logits, ref_pairs)) in enumerate(zip(sessions, solo)):
        assert session.length == PROMPT_LENGTHS[i] + NEW_TOKENS
        assert torch.equal(first[i], ref_logits[:, 0]), "the prefill ran alone: bit for bit"
        _assert_equivalent(ref_logits[:, 1:], torch.stack(got[i], dim=1), f"session {i}")
        _assert_cache_close(session, ref_pairs, f"session {i}")
    assert all(s.kv_bytes == s.count_kv_bytes() > 0 for s in sessions), "the store's count follows the batch"


def test_sessions_join_and_leave_between_steps(make_executor, prompts, fed):
    executor, cached = make_executor(1 << 30)
    solo = [_solo(executor, cached, p, t) for p, t in zip(prompts, fed)]
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
    for s, p in zip(sessions, prompts):
        executor.session_step(s, p)
    # 0 and 1 start; 2 joins at turn 2; 0 leaves after turn 3; 2 finishes alone.
    turns = [[0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [1, 2], [1, 2], [2], [2]]
    counts = [sum(i in t for t in turns) for i in range(3)]
    got = _batched(executor, sessions, turns, fed)
    for i, session in enumerate(sessions):
        steps = counts[i]
        _assert_equivalent(solo[i][0][:, 1:1 + steps], torch.stack(got[i], dim=1), f"session {i}")
        assert session.length == PROMPT_LENGTHS[i] + steps


def test_a_padded_session_batches_with_its_own_mask(make_executor, prompts, fed):
    """A session holding a padded batch of two rows joins others: its padding stays hidden."""
    executor, cached = make_executor(1 << 30)
    padded = torch.cat([prompts[1][:, :23], prompts[1][:, :23].flip(1)])
    mask = torch.ones_like(padded)
    mask[1, :9] = 0  # row 1 is left-padded by 9
    rows_fed = torch.cat([fed[1], fed[0]])

    def open_padded():
        session = executor.sessions.open(cached, b"peer")
        session.padding = Padding.of_prompt(mask)
        logits = executor.session_step(session, padded, session.padding)
        return session, logits

    reference, first = open_padded()
    ref = [first]
    for i in range(NEW_TOKENS):
        reference.padding = reference.padding.next(1)
        ref.append(executor.session_step(reference, rows_fed[:, i:i + 1], reference.padding))
    session, _ = open_padded()
    other = executor.sessions.open(cached, b"peer")
    executor.session_step(other, prompts[0])
    got = _batched(executor, [session, other], [[0, 1]] * NEW_TOKENS, [rows_fed, fed[0]])
    _assert_equivalent(torch.stack(ref[1:], dim=1), torch.stack(got[0], dim=1), "the padded session")


def test_a_paged_out_session_is_paged_in_before_it_joins(make_executor, tiny_model, prompts, fed):
    per_token = kv_per_token(tiny_model)
    executor, cached = make_executor(1 << 30)
    solo = [_solo(executor, cached, p, t) for p, t in zip(prompts, fed)]
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
    for s, p in zip(sessions, prompts):
        executor.session_step(s, p)
    assert executor.sessions.page_out(sessions[1]) == PROMPT_LENGTHS[1] * per_token
    assert sessions[1].host and sessions[1].kv_bytes == 0
    got = _batched(executor, sessions, [[0, 1, 2]] * 2, fed)
    assert not sessions[1].host, "its layers came back for the batch"
    assert sessions[1].paging.page_ins == tiny_model.config.num_hidden_layers
    for i in range(3):
        _assert_equivalent(solo[i][0][:, 1:3], torch.stack(got[i], dim=1), f"session {i}")


def test_a_batch_makes_room_by_paging_out_sessions_outside_it(make_executor, tiny_model, prompts, fed):
    per_token = kv_per_token(tiny_model)
    total = sum(PROMPT_LENGTHS)
    stacked = 3 * (max(PROMPT_LENGTHS) + 2)  # the batch's stacked copy and new column (`stacked_bytes`)
    # Room for the bystander, the three sessions and all but 20 tokens of the stacked copy.
    executor, cached = make_executor((40 + total + stacked - 20) * per_token)
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
    bystander = executor.sessions.open(cached, b"other")
    executor.session_step(bystander, torch.zeros(1, 40, dtype=torch.long))
    for s, p in zip(sessions, prompts):
        executor.session_step(s, p)
    _batched(executor, sessions, [[0, 1, 2]], fed)
    assert bystander.host, "the least recently used session outside the batch was paged out"
    assert all(not s.host for s in sessions), "no session of the batch is paged out to make room for it"


def test_a_failed_batch_leaves_every_session_as_it_was(make_executor, prompts, fed, monkeypatch):
    executor, cached = make_executor(1 << 30)
    sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
    for s, p in zip(sessions, prompts):
        executor.session_step(s, p)
    before = [[(k.clone(), v.clone()) for k, v in kv.to_pairs(s.cache)] for s in sessions]
    batch = [BatchedStep(s, executor.step_ids(s, t[:, :1]), None) for s, t in zip(sessions, fed)]

    def half_then_fail(model, steps, stacks):
        for step in steps[:2]:  # two sessions' caches grow, then the forward dies
            for layer, (k, v) in enumerate(kv.to_pairs(step.session.cache)):
                step.session.cache.update(k[..., -1:, :], v[..., -1:, :], layer)
        raise RuntimeError("the forward failed half-way")

    monkeypatch.setattr("djinn.server.executor.stacked_forward", half_then_fail)
    with pytest.raises(BadRequest, match="half-way"):
        executor.batched_step(batch)
    for session, pairs, n in zip(sessions, before, PROMPT_LENGTHS):
        assert session.length == n and session.state.value == "idle"
        _assert_cache_close(session, pairs, "after the rollback")


def test_sessions_that_cannot_join_a_batch_say_why(make_executor, prompts, tiny_model):
    executor, cached = make_executor(1 << 30)
    fresh = executor.sessions.open(cached, b"peer")
    assert "prefill" in unbatched_reason(fresh)
    ready = executor.sessions.open(cached, b"peer")
    executor.session_step(ready, prompts[0])
    assert unbatched_reason(ready) is None
    parked = executor.sessions.open(cached, b"peer")
    executor.session_step(parked, prompts[1])
    executor.run_to_layer(parked, prompts[1][:, :1], 0)
    try:
        assert "parked" in unbatched_reason(parked)
    finally:
        executor.cancel(parked)
    assert unbatched_reason(parked) is None, "cancelled, it may join again"


def _storage(session) -> int:
    return kv.to_pairs(session.cache)[0][0].untyped_storage().data_ptr()


def test_a_steady_batch_appends_to_its_stacked_cache_exactly_as_a_restack_would(make_executor, prompts, fed):
    executor, cached = make_executor(1 << 30)

    def run(restack_every_step: bool):
        sessions = [executor.sessions.open(cached, b"peer") for _ in prompts]
        for s, p in zip(sessions, prompts):
            executor.session_step(s, p)
        logits = []
        for i in range(NEW_TOKENS):
            if restack_every_step:
                executor.stacks.release()
            batch = [BatchedStep(s, executor.step_ids(s, t[:, i:i + 1]), None) for s, t in zip(sessions, fed)]
            logits.append(torch.cat(executor.batched_step(batch)))
            assert len({_storage(s) for s in sessions}) == 1, "every session's cache is a view of the stacked one"
        return sessions, torch.stack(logits)

    _, restacked = run(True)
    before = executor.stacks.reused, executor.stacks.restacked
    sessions, reused = run(False)
    assert (executor.stacks.reused - before[0], executor.stacks.restacked - before[1]) == (NEW_TOKENS - 1, 1)
    assert torch.equal(reused, restacked), "the reused stacked cache holds exactly what a restack copies"
    # One leaves: it gets its own copy, and the next batch restacks without it.
    batch = [BatchedStep(s, executor.step_ids(s, t[:, :1]), None) for s, t in zip(sessions[:2], fed)]
    executor.batched_step(batch)
    left = sessions[2]
    assert _storage(left) not in {_storage(s) for s in sessions[:2]}, "the departed session holds its own copy"
    assert left.length == PROMPT_LENGTHS[2] + NEW_TOKENS and left.kv_bytes == left.count_kv_bytes()
    # A paged-out member breaks the reuse too: it is paged back in and restacked.
    executor.sessions.page_out(sessions[0])
    executor.batched_step([BatchedStep(s, executor.step_ids(s, t[:, 1:2]), None) for s, t in zip(sessions[:2], fed)])
    assert not sessions[0].host and _storage(sessions[0]) == _storage(sessions[1])
