"""The fast decode path (djinn.server.fast_decode) on a CPU: the same compact forward and slot
bookkeeping a GPU runs (there under one CUDA graph per step), checked against HF.

Teacher-forced over a long sequence for a tiny Llama and a tiny Mistral (GQA) in fp32; through a
server, the fast path's sessions page out, park at breakpoints and outgrow their slot and come
back; `decode="exact"` keeps HF's exact logits; gpt2 falls back to HF and the stats say why.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import djinn
from djinn import kv, models
from djinn.decoding import forward_last
from djinn.equivalence import Equivalence, judge
from djinn.server.fast_decode import FAST_EAGER, HF_EAGER, FastModel, unsupported_reason

from benchmarks.launcher import cpu_server

TEACHER_FORCED_TOKENS = 300  # past a few hundred positions: RoPE tables and the mask over a long static cache
MAX_ABS_DIFF_FP32 = 1e-4  # fp32 logits of magnitude ~1: the two forwards differ only in reduction order
NEW_TOKENS = 12


def tiny_mistral() -> torch.nn.Module:
    config = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                           sliding_window=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _teacher_forced(model: torch.nn.Module, max_len: int, prompt_len: int = 40):
    """HF's and the fast forward's logits at every step, both fed the same random tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    tokens = torch.randint(0, vocab, (1, TEACHER_FORCED_TOKENS), generator=gen)
    cache = kv.from_pairs([])
    ref = [forward_last(model, prompt, cache)]
    for i in range(tokens.shape[1]):
        ref.append(forward_last(model, tokens[:, i:i + 1], cache))
    fast = FastModel(model, max_len)
    caches = [torch.zeros(fast.kv_shape(1)) for _ in range(2 * len(fast.layers))]
    with torch.no_grad():
        out = [fast(prompt, torch.arange(prompt_len), caches)]
        for i in range(tokens.shape[1]):
            out.append(fast(tokens[:, i:i + 1], torch.tensor([prompt_len + i]), caches))
    return torch.stack(ref, dim=1), torch.stack(out, dim=1)


@pytest.mark.parametrize("build", [lambda: models.build(models.TINY_MODEL, seed=0), tiny_mistral],
                         ids=["tiny-llama", "tiny-mistral"])
def test_fast_forward_matches_hf_teacher_forced(build):
    reference, fast = _teacher_forced(build(), max_len=512)
    result = judge(reference, fast)
    assert result.max_abs_diff < MAX_ABS_DIFF_FP32, result
    assert result.top1_agreement == 1.0 and result.verdict is not Equivalence.SILENTLY_WRONG


def test_fused_weights_back_hfs_projections_and_leave_its_logits_bit_identical():
    model = models.build(models.TINY_MODEL, seed=0)
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(1))
    before = forward_last(model, ids, kv.from_pairs([]))
    weight_bytes = sum(p.nbytes for p in model.parameters())
    fast = FastModel(model, 64)
    attn = model.model.layers[0].self_attn
    # No second copy: HF's q/k/v weights are row slices of the fused one, in order.
    assert attn.q_proj.weight.data_ptr() == fast.layers[0].wqkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == fast.layers[0].wqkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert sum(p.nbytes for p in model.parameters()) == weight_bytes
    assert torch.equal(forward_last(model, ids, kv.from_pairs([])), before)


def test_unsupported_architectures_say_why():
    assert "gpt2 has no compact forward" in unsupported_reason(models.build("gpt2", num_layers=1))
    assert unsupported_reason(models.build(models.TINY_MODEL)) is None
    assert unsupported_reason(tiny_mistral()) is None


# -- through a server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_server(server_launcher):
    server = server_launcher.start("fast", cpu_server("--fast-max-len", "64"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model, hf_greedy):
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(3))
    return (ids, *hf_greedy(tiny_model, ids, NEW_TOKENS))


def _paths(client) -> dict:
    return client.stats()["decode_paths"]


def _steps_by_path(client, run) -> dict:
    before = dict(_paths(client)["steps"])
    run()
    after = _paths(client)["steps"]
    return {path: n - before.get(path, 0) for path, n in after.items() if n - before.get(path, 0)}


def test_fast_load_decodes_hfs_tokens_on_the_fast_forward(fast_server, tiny_model, reference):
    ids, ref_tokens, ref_logits = reference
    with djinn.connect(fast_server.host_port) as client:
        assert client.hello()["decode_default"] == "exact"  # a CPU decodes exactly unless a load asks
        remote = client.load(tiny_model, mode="full_djinn", decode="fast")
        tokens = []
        steps = _steps_by_path(client, lambda: tokens.append(
            remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True)))
        assert steps == {FAST_EAGER: NEW_TOKENS}
        assert torch.equal(tokens[0], ref_tokens)
        torch.testing.assert_close(remote.last_logits, ref_logits, rtol=0, atol=MAX_ABS_DIFF_FP32)


def test_exact_load_is_hf_bit_for_bit(fast_server, tiny_model, reference):
    ids, ref_tokens, ref_logits = reference
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn", decode="exact")
        steps = _steps_by_path(client, lambda: remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True))
        assert steps == {HF_EAGER: NEW_TOKENS}
        assert torch.equal(remote.last_logits, ref_logits)
        # After a fast session fused the server's copy of the weights, exact decoding is still HF's.
        client.load(tiny_model, mode="full_djinn", decode="fast").generate(ids, max_new_tokens=2)
        tokens = remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert torch.equal(tokens, ref_tokens) and torch.equal(remote.last_logits, ref_logits)


def test_an_unsupported_architecture_falls_back_and_the_stats_say_so(fast_server):
    gpt2 = models.build("gpt2", num_layers=2)
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    expected = gpt2.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(gpt2, mode="full_djinn", decode="fast")
        steps = _steps_by_path(client, lambda: remote.generate(ids, max_new_tokens=4))
        assert steps == {HF_EAGER: 4} and torch.equal(remote.generate(ids, max_new_tokens=4), expected)
        assert any("gpt2 has no compact forward" in reason for reason in _paths(client)["fallbacks"])


def test_a_paged_out_fast_session_comes_back_and_goes_on(fast_server, tiny_model, reference):
    ids, ref_tokens, _ = reference
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn", decode="fast")
        with remote.session() as s:
            s.prefill(ids)
            first = s.generate(max_new_tokens=4)
            assert s.stats()["decode_path"] == FAST_EAGER
            assert s.offload() > 0  # its KV leaves the slot for host memory
            assert s.stats()["layers_paged"] == tiny_model.config.num_hidden_layers
            rest = s.generate(max_new_tokens=NEW_TOKENS - 4)  # paged back in, and onto the fast path again
            assert s.stats()["decode_path"] == FAST_EAGER and s.stats()["layers_paged"] == 0
        assert torch.equal(torch.cat([ids, first, rest], dim=1), ref_tokens)


def test_a_fast_session_parks_at_a_breakpoint_and_resumes(fast_server, tiny_model, reference):
    ids, ref_tokens, _ = reference
    prompt_len = ids.shape[1]
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn", decode="fast")
        with remote.session() as s:
            s.prefill(ids)
            first = s.generate(max_new_tokens=3)
            # The next step, parked after layer 3 and resumed unchanged: the token HF picks there.
            act = s.run_to_layer(ref_tokens[:, prompt_len + 2:prompt_len + 3], layer=3)
            logits = s.resume(act)
            assert int(logits.argmax(-1)) == int(ref_tokens[0, prompt_len + 3])
            rest = s.generate(max_new_tokens=NEW_TOKENS - 3)  # from the resumed step's token on
            assert s.stats()["decode_path"] == FAST_EAGER  # back on the fast path after the breakpoint
        assert torch.equal(first, ref_tokens[:, prompt_len:prompt_len + 3])
        assert torch.equal(rest, ref_tokens[:, prompt_len + 3:])


def test_a_session_past_its_slot_goes_on_with_hf(fast_server, tiny_model, hf_greedy):
    ids = torch.randint(0, 8192, (1, 56), generator=torch.Generator().manual_seed(4))
    ref_tokens, _ = hf_greedy(tiny_model, ids, 16)  # 56 + 16 tokens > the slot's 64
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn", decode="fast")
        steps = _steps_by_path(client, lambda: remote.generate(ids, max_new_tokens=16))
        assert steps[FAST_EAGER] == 64 - 56 + 1 and steps[HF_EAGER] == 16 - (64 - 56 + 1)
        assert torch.equal(remote.generate(ids, max_new_tokens=16), ref_tokens)


def test_a_busy_slot_leaves_the_other_session_on_hf(fast_server, tiny_model, reference):
    ids, ref_tokens, _ = reference
    with djinn.connect(fast_server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn", decode="fast")
        with remote.session() as first, remote.session() as second:
            first.prefill(ids)
            second.prefill(ids)
            a, b = first.generate(max_new_tokens=NEW_TOKENS - 1), second.generate(max_new_tokens=NEW_TOKENS - 1)
            assert first.stats()["decode_path"] == FAST_EAGER and second.stats()["decode_path"] == HF_EAGER
        assert torch.equal(a, b)
        assert any("busy" in reason for reason in _paths(client)["fallbacks"])


def test_a_bad_decode_choice_is_refused(fast_server, tiny_model):
    with pytest.raises(ValueError, match="decode='fastest'"):
        djinn.connect(fast_server.host_port).load(tiny_model, decode="fastest")


# -- the slot's transaction, in-process ----------------------------------------------------------
def test_a_fast_step_that_runs_out_of_memory_is_rolled_back_and_retried(tiny_model, reference):
    """An allocation failure after the slot took the step's keys: the slot's length goes back and the
    retried step decodes HF's next token, as an eager session's would."""
    from djinn.server.device_budget import DeviceBudget
    from djinn.server.executor import Executor
    from djinn.server.fast_decode import FastPath
    from djinn.server.session_store import SessionStore
    from djinn.server.weight_cache import WeightCache

    ids, ref_tokens, _ = reference
    budget = DeviceBudget(torch.device("cpu"), 4 << 30)
    weights = WeightCache(budget)
    fast = FastPath(budget, weights, 64, default_on=False)
    sessions = SessionStore(60.0, "test", budget, swap=True, fast=fast)
    executor = Executor(budget, weights, sessions)
    cached = weights.preload("tiny", models.build(models.TINY_MODEL, seed=0))
    session = sessions.open(cached, b"peer")
    session.decode = "fast"
    token = executor.session_step(session, ids).argmax(-1, keepdim=True)
    slot = session.decoder
    step, failures = slot.step, []

    def failing_step(token_ids):
        logits = step(token_ids)  # the keys and values are written, the length advanced
        if not failures:
            failures.append(slot.length)
            raise torch.OutOfMemoryError("injected after the slot's write")
        return logits

    slot.step = failing_step
    tokens = [token]
    for _ in range(3):
        tokens.append(executor.session_step(session, tokens[-1]).argmax(-1, keepdim=True))
    assert failures == [ids.shape[1] + 1] and session.oom_retries == 1
    assert session.length == ids.shape[1] + 3 and session.path == FAST_EAGER
    assert torch.equal(torch.cat([ids, *tokens], 1), ref_tokens[:, :ids.shape[1] + 4])
    sessions.close(session.handle)
    assert not fast.of(cached).lent, "closing the session gives its slot back"
