"""The link sweep's step pairing (benchmarks.paired_steps): two full_djinn generations driven in
lockstep against a live CPU server, each step one decode request, the first side alternating."""
from __future__ import annotations

import djinn

import pytest

from benchmarks.paired_steps import DifferentDecodePaths, lockstep_steps


def test_lockstep_pairs_every_decode_step_and_alternates_which_side_goes_first(shared_server, tiny_model, make_prompt,
                                                                                hf_greedy):
    prompt, tokens = make_prompt(tiny_model, 12), 7
    expected, _ = hf_greedy(tiny_model, prompt, tokens)
    with djinn.connect(shared_server.host_port) as a, djinn.connect(shared_server.host_port) as b:
        clients = {"a": a, "b": b}
        remotes = {side: client.load(tiny_model, mode="full_djinn") for side, client in clients.items()}
        sessions = {side: remote.session() for side, remote in remotes.items()}
        sent = {side: [] for side in clients}
        order = []
        for side, session in sessions.items():
            generate = session.generate

            def recorded(n, side=side, generate=generate):
                order.append(side)
                tokens_out = generate(n)
                sent[side].append(tokens_out)
                return tokens_out
            session.generate = recorded
        try:
            records = lockstep_steps(sessions, {side: c.counters for side, c in clients.items()}, prompt, tokens)
        finally:
            for session in sessions.values():
                session.close()
    assert [len(r) for r in records.values()] == [tokens - 1, tokens - 1]  # the decode steps, the prefill's not
    # The prefill's own token first (no request), then pairs whose first side alternates.
    assert order == ["a", "b"] + [side for i in range(tokens - 1) for side in (("a", "b"), ("b", "a"))[i % 2]]
    for side, record in records.items():
        assert all(step.bytes.messages_sent == step.bytes.messages_received == 1 for step in record), side
        assert all(step.compute_ms > 0 and step.wall_ms >= step.compute_ms for step in record), side
        generated = [t.item() for t in sent[side]]
        assert generated == expected[0, prompt.shape[1]:].tolist(), side  # each side's tokens: HF's greedy ones


def test_lockstep_refuses_sides_that_decoded_on_different_paths(shared_server, tiny_model, make_prompt):
    """Two concurrent fast-path sessions of one model: the first holds the model's bs-1 slot, the
    second decodes on HF eager (as the H200's link sweep found), so their steps are not pairs."""
    prompt = make_prompt(tiny_model, 12)
    with djinn.connect(shared_server.host_port) as a, djinn.connect(shared_server.host_port) as b:
        clients = {"a": a, "b": b}
        remotes = {side: client.load(tiny_model, mode="full_djinn", decode="fast") for side, client in clients.items()}
        sessions = {side: remote.session() for side, remote in remotes.items()}
        try:
            with pytest.raises(DifferentDecodePaths, match="different paths"):
                lockstep_steps(sessions, {side: c.counters for side, c in clients.items()}, prompt, 3)
        finally:
            for session in sessions.values():
                session.close()
