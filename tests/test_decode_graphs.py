"""Graph-slot decoding (`--decode-graphs`) through a live server.

On a CPU the slot runs the same static-cache step eagerly (the CUDA graph is the
GPU's part), so the slot bookkeeping and the static-cache equivalence are tested here.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.errors import BadRequest

from benchmarks.launcher import cpu_server

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def graph_server(server_launcher):
    server = server_launcher.start("graphs", cpu_server("--decode-graphs", "--graph-max-len", "128"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model, hf_greedy):
    ids = torch.randint(0, 8192, (1, 40), generator=torch.Generator().manual_seed(3))
    return (ids, *hf_greedy(tiny_model, ids, NEW_TOKENS))


def test_graph_slot_decoding_matches_hf_tokens(graph_server, tiny_model, reference):
    ids, ref_tokens, ref_logits = reference
    with djinn.connect(graph_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn")
        tokens = remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(remote.last_logits, ref_logits, rtol=1e-4, atol=1e-4)
        # The slot went back when the session closed: the next session gets it again.
        assert torch.equal(remote.generate(ids, max_new_tokens=NEW_TOKENS), ref_tokens)


def test_a_busy_slot_leaves_other_sessions_eager(graph_server, tiny_model, reference):
    ids, ref_tokens, _ = reference
    with djinn.connect(graph_server.host_port) as client:
        fp = client.load(tiny_model, mode="full_djinn").fingerprint
        conn = client.connection
        first, second = (conn.request("open_session", {"model": fp}).args["session"] for _ in range(2))
        tokens = {}
        for handle in (first, second):
            tokens[handle] = [conn.request("prefill", {"model": fp, "session": handle, "returns": "token"},
                                           {"input_ids": ids}).tensors["token"]]
        for _ in range(NEW_TOKENS - 1):
            for handle in (first, second):
                tokens[handle].append(conn.request("decode", {"model": fp, "session": handle, "returns": "token"},
                                                   {"input_ids": tokens[handle][-1]}).tensors["token"])
        for handle in (first, second):
            assert torch.equal(torch.cat([ids, *tokens[handle]], 1), ref_tokens)
        with pytest.raises(BadRequest, match="one token per decode step"):
            conn.request("decode", {"model": fp, "session": first}, {"input_ids": ids[:, :2]})
        for handle in (first, second):
            conn.request("close_session", {"session": handle})


def test_prompt_longer_than_a_slot_decodes_eagerly(graph_server, tiny_model):
    long_ids = torch.randint(0, 8192, (1, 130), generator=torch.Generator().manual_seed(4))
    ref = tiny_model.generate(long_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with djinn.connect(graph_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn")
        assert torch.equal(remote.generate(long_ids, max_new_tokens=3), ref)


def test_compiled_step_reads_static_buffers_and_repeats_across_sessions(tiny_model):
    """The traced step (no CUDA graph on a CPU) as a slot runs it: session after session.

    Every tensor the graph reads must be a static input (parameters, the StaticCache and
    the slot's ids/position/mask buffers), so that a CUDA graph reads them in place and no
    mutated input falls outside the graph; the step compiles once per slot; and a slot
    reused by later sessions gives each the tokens and logits of the eager static step.
    """
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    from djinn.server.graphs import GraphDecoder

    compiles = []

    def inspect(gm, example_inputs):
        meta = TracingContext.get().fw_metadata
        static = set(meta.static_input_indices)
        compiles.append({"non_static": [i for i in range(len(example_inputs)) if i not in static],
                         "mutated_non_static": [i for i, info in enumerate(meta.input_info)
                                                if info.mutates_data and i not in static]})
        return gm.forward

    def session(decoder, ids, steps=6):
        logits = [decoder.prefill(ids)]
        for _ in range(steps):
            logits.append(decoder.step(logits[-1].argmax(-1, keepdim=True)))
        logits = torch.stack(logits, 1)
        return logits.argmax(-1), logits

    prompts = [torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(s)) for n, s in ((20, 5), (13, 6))]
    torch._dynamo.reset()
    try:
        eager = GraphDecoder(tiny_model, 1, 48, torch.device("cpu"), compiled=False)
        expected = [session(eager, ids) for ids in prompts]
        slot = GraphDecoder(tiny_model, 1, 48, torch.device("cpu"), backend=aot_autograd(fw_compiler=inspect))
        for ids, (ref_tokens, ref_logits) in zip([*prompts, prompts[0]], [*expected, expected[0]]):
            tokens, logits = session(slot, ids)
            assert torch.equal(tokens, ref_tokens)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()
    assert len(compiles) == 1, "the step recompiled for a later session"
    assert compiles[0] == {"non_static": [], "mutated_non_static": []}
