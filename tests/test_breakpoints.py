"""Breakpoints: park a step after decoder layer N, resume it with a (modified) activation.

In-process on small models of several architectures (the mechanism is generic), then
against a live server: bit-identity at every layer, steering, what crosses the wire,
many parked sessions, cancel and bad requests. (Expiry and paging of parked sessions:
test_session_store.py.)
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import djinn
from djinn import kv
from djinn.decoding import forward_last
from djinn.errors import BadRequest
from djinn.server import breakpoints
from djinn.server.breakpoints import ParkedForward

NEW_TOKENS = 12
LAYERS = 8  # tiny-llama
STEER_LAYER = LAYERS // 2
STEER_SCALE = 0.9

# Architectures whose forward differs after the layer loop or per layer: GPT-2 (tuple
# outputs in older releases, ln_f), Gemma-2 (alternating sliding/full masks, logit
# soft-capping), Qwen-2 (sliding window on some layers only).
ARCHITECTURES = {
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=128, sliding_window=8,
                   final_logit_softcapping=30.0),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, use_sliding_window=True,
                  sliding_window=8, max_window_layers=2),
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_parked_forward_is_bit_identical_on_any_decoder(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))  # longer than the windows
    ref_cache = kv.from_pairs([])
    ref = forward_last(model, ids, ref_cache), forward_last(model, ids[:, :1], ref_cache)
    for layer in range(model.config.num_hidden_layers):
        cache = kv.from_pairs([])
        parked = ParkedForward(model, layer, lambda: forward_last(model, ids, cache))
        assert parked.activation.shape[:2] == ids.shape
        first = parked.resume(parked.activation)
        assert torch.equal(first, ref[0]), f"layer {layer}: resumed logits differ"
        assert torch.equal(forward_last(model, ids[:, :1], cache), ref[1]), f"layer {layer}: the KV differs"


def test_exp3_manual_offload_baseline_restores_exactly_what_it_offloaded(tiny_model, make_prompt):
    """exp3's user-code baseline: layers 0..N's KV and the activation leave the device while
    offloaded and come back bit for bit."""
    from benchmarks.exp3_restore import ManualOffload, park
    ids = make_prompt(tiny_model, 24)
    ref_cache = kv.from_pairs([])
    ref_logits = forward_last(tiny_model, ids, ref_cache)
    parked_kv_bytes = sum(k.nbytes + v.nbytes for k, v in kv.to_pairs(ref_cache)[:STEER_LAYER + 1])
    ref_next = forward_last(tiny_model, ids[:, :1], ref_cache)
    offloaded = ManualOffload.of(*park(tiny_model, ids, STEER_LAYER), scale=1.0)
    assert all(k.is_meta and v.is_meta for k, v in kv.to_pairs(offloaded.cache))
    assert offloaded.nbytes == parked_kv_bytes + offloaded.activation.nbytes
    activation = offloaded.restore("cpu")
    assert torch.equal(offloaded.parked.resume(activation), ref_logits)
    assert torch.equal(forward_last(tiny_model, ids[:, :1], offloaded.cache), ref_next)


def test_parked_forward_cancel_leaves_other_forwards_alone(tiny_model, make_prompt):
    ids = make_prompt(tiny_model, 16)
    expected = forward_last(tiny_model, ids, kv.from_pairs([]))
    parked = ParkedForward(tiny_model, 3, lambda: forward_last(tiny_model, ids, kv.from_pairs([])))
    assert torch.equal(forward_last(tiny_model, ids, kv.from_pairs([])), expected), "a parked forward leaked a hook"
    parked.cancel()
    assert not parked.parked
    with pytest.raises(BadRequest, match="not parked"):
        parked.resume(torch.zeros(1))


def test_forwards_reuse_idle_worker_threads_and_parked_ones_hold_their_own(tiny_model, make_prompt):
    """A thread's first forward pays per-thread library setup (~45 ms on an H100): workers are reused."""
    ids = make_prompt(tiny_model, 8)
    threads = []

    def forward(cache):
        threads.append(threading.current_thread())  # not the ident: the OS reuses those
        return forward_last(tiny_model, ids, cache)

    def park() -> ParkedForward:
        cache = kv.from_pairs([])
        return ParkedForward(tiny_model, 2, lambda: forward(cache))

    park().cancel()
    finished = park()
    finished.resume(finished.activation)
    assert threads[0] == threads[1], "a finished or cancelled forward's worker runs the next forward"
    held = [park() for _ in range(3)]
    assert len(set(threads[2:])) == 3, "forwards parked at once each hold a worker"
    for parked in held:
        parked.resume(parked.activation)
    again = park()
    assert again._worker.thread in threads[2:], "their workers are idle again"
    again.cancel()


def test_idle_workers_beyond_the_cap_exit(tiny_model, make_prompt, monkeypatch):
    monkeypatch.setattr(breakpoints, "MAX_IDLE_WORKERS", 1)
    ids = make_prompt(tiny_model, 8)
    parked = [ParkedForward(tiny_model, 1, lambda: forward_last(tiny_model, ids, kv.from_pairs([]))) for _ in range(4)]
    for p in parked:
        p.cancel()
    deadline = time.monotonic() + 10
    while sum(p._worker.thread.is_alive() for p in parked) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(p._worker.thread.is_alive() for p in parked) <= 1, "one idle worker is kept, the others exit"


# -- against a server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model):
    ids = torch.randint(0, 8192, (1, 72), generator=torch.Generator().manual_seed(7))
    out = tiny_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
    return ids, out.sequences, out.logits[0]


@pytest.fixture
def remote(shared_server, tiny_model):
    with djinn.connect(shared_server.host_port, timeout_s=60) as client:
        yield client.load(tiny_model, mode="full_djinn")


@pytest.mark.parametrize("layer", range(LAYERS))
def test_resume_unmodified_is_bit_identical_and_decoding_goes_on(remote, reference, layer):
    ids, ref_tokens, ref_logits = reference
    with remote.session() as s:
        act = s.run_to_layer(ids, layer=layer)
        assert act.shape == (1, ids.shape[1], 256) and s.parked_layer == layer
        logits = s.resume(act)
        assert torch.equal(logits, ref_logits), "logits must be bit-identical to an uninterrupted forward"
        tokens = s.generate(max_new_tokens=NEW_TOKENS)
    assert torch.equal(torch.cat([ids, tokens], dim=1), ref_tokens), "100% token accuracy"


def test_steering_changes_the_output_by_a_small_amount(remote, reference, record_property):
    ids, ref_tokens, ref_logits = reference
    with remote.session() as s:
        logits = s.resume(s.run_to_layer(ids, layer=STEER_LAYER) * STEER_SCALE)
        tokens = s.generate(max_new_tokens=NEW_TOKENS)
    change = float((logits - ref_logits).norm() / ref_logits.norm())
    agreement = float((tokens == ref_tokens[:, ids.shape[1]:]).float().mean())
    record_property("steering_logit_change", change)
    record_property("steering_token_agreement", agreement)
    assert 0 < change < 0.5, f"scaling layer {STEER_LAYER} by {STEER_SCALE} changed the logits by {change:.2%}"


def test_only_the_activation_and_the_logits_cross_the_wire(remote, reference):
    ids = reference[0]
    counters = remote.client.counters
    with remote.session() as s:
        before = counters.snapshot()
        act = s.run_to_layer(ids, layer=2)
        parked = counters.since(before)
        before = counters.snapshot()
        logits = s.resume(act)
        resumed = counters.since(before)
    assert parked.received_payload == act.numel() * act.element_size()
    assert parked.sent_payload == ids.numel() * ids.element_size()
    assert resumed.sent_payload == act.numel() * act.element_size()
    assert resumed.received_payload <= logits.numel() * logits.element_size(), "the KV never comes back"


def test_many_sessions_parked_at_once_and_a_bystander_decodes(remote, reference):
    ids, ref_tokens, ref_logits = reference
    sessions = [remote.session() for _ in range(3)]
    try:
        acts = [s.run_to_layer(ids, layer=layer) for s, layer in zip(sessions, (1, 4, 7))]
        assert torch.equal(remote.generate(ids, max_new_tokens=NEW_TOKENS), ref_tokens)
        for s, act in reversed(list(zip(sessions, acts))):
            assert torch.equal(s.resume(act), ref_logits)
            assert torch.equal(s.generate(max_new_tokens=3), ref_tokens[:, ids.shape[1]:ids.shape[1] + 3])
    finally:
        for s in sessions:
            s.close()


def test_cancel_drops_the_parked_step_and_decoding_goes_on(remote, reference):
    ids, ref_tokens, _ = reference
    prompt = ids.shape[1]
    with remote.session() as s:
        s.prefill(ids)
        first = s.generate(max_new_tokens=2)  # the second token is not fed to the model yet
        assert torch.equal(first, ref_tokens[:, prompt:prompt + 2])
        s.run_to_layer(first[:, -1:], layer=5)  # the next decode step, parked
        assert s.stats()["state"] == "parked"
        s.cancel()
        stats = s.stats()
        assert stats["state"] == "idle" and stats["length"] == prompt + 1
        # The same step again, uninterrupted in effect: the KV holds exactly what it held before.
        s.resume(s.run_to_layer(first[:, -1:], layer=6))
        assert torch.equal(s.generate(max_new_tokens=3), ref_tokens[:, prompt + 2:prompt + 5])


class TestBadBreakpoints:
    @pytest.mark.parametrize("layer", [-1, LAYERS, 100])
    def test_layer_outside_the_model(self, remote, reference, layer):
        with remote.session() as s:
            with pytest.raises(BadRequest, match=rf"outside 0\.\.{LAYERS - 1}: the model has {LAYERS} decoder layers"):
                s.run_to_layer(reference[0], layer=layer)
            assert s.stats()["length"] == 0

    def test_resume_or_cancel_without_a_breakpoint(self, remote, reference):
        with remote.session() as s:
            with pytest.raises(BadRequest, match="not parked"):
                s.resume(torch.zeros(1, 72, 256))
            with pytest.raises(BadRequest, match="not parked"):
                s.cancel()

    def test_resume_with_an_activation_of_another_shape_or_dtype(self, remote, reference):
        with remote.session() as s:
            act = s.run_to_layer(reference[0], layer=3)
            with pytest.raises(BadRequest, match="decoder layer 3 produced"):
                s.resume(act[:, 1:])
            with pytest.raises(BadRequest, match="decoder layer 3 produced"):
                s.resume(act.double())
            assert torch.equal(s.resume(act), reference[2]), "a refused resume leaves the step parked"

    def test_steps_on_a_parked_session_are_refused(self, remote, reference):
        with remote.session() as s:
            s.run_to_layer(reference[0], layer=3)
            conn, args = s.connection, {"model": remote.fingerprint, "session": s.handle}
            for op in ("prefill", "decode"):
                with pytest.raises(BadRequest, match="parked at decoder layer 3: resume or cancel"):
                    conn.request(op, args, {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
            with pytest.raises(BadRequest, match="parked at decoder layer 3"):
                s.run_to_layer(reference[0][:, :1], layer=1)
