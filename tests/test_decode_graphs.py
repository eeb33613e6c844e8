"""Graph-slot decoding (`--decode-graphs`) through a live server.

On a CPU the slot runs the same static-cache step eagerly (the CUDA graph is the
GPU's part), so the slot bookkeeping and the static-cache equivalence are tested here.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn.errors import BadRequest

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def graph_server(tmp_path_factory):
    from djinn.server.process import ServerProcess
    with ServerProcess("--decode-graphs", "--graph-max-len", "128",
                       log_path=tmp_path_factory.mktemp("graphs") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_model):
    ids = torch.randint(0, 8192, (1, 40), generator=torch.Generator().manual_seed(3))
    out = tiny_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
    return ids, out.sequences, torch.stack(out.logits, 1)


@pytest.mark.correctness
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
