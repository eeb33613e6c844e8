"""Declarative interventions (issue 18): every op at every site, several per pass, inside a
server-side generate, composed with breakpoints, paging and the ring, against the same edit
made by plain forward hooks on a local copy of the model, bit for bit.

The references are plain hooks written against HF's module tree directly (`model.model.layers[i]`,
`.self_attn`, `.mlp`, `.embed_tokens`, `.norm`), not with djinn's hook code, around the forward
every mode shares (`djinn.decoding.forward_logits`): benchmarks/local_hooks.py.
"""
from __future__ import annotations

import pytest
import torch

import djinn
from djinn import interventions as iv
from djinn import kv
from djinn.decoding import forward_logits
from djinn.errors import BadRequest
from djinn.sampling import SamplingParams
from djinn.transport import Codec

from benchmarks.launcher import cpu_server
from benchmarks.local_hooks import edit_of, greedy_generate, hooked, lens, recorder

PROMPT = 24
HIDDEN = 256  # tiny-llama
LAYERS = 8
NEW_TOKENS = 10
SITES = [("embeddings", None), ("attention", 3), ("mlp", 5), ("layer", 2), ("final_norm", None)]


@pytest.fixture(scope="module")
def prompt(tiny_model):
    return torch.randint(0, tiny_model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(18))


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(180)
    return {"add": torch.randn(HIDDEN, generator=g) * 0.5, "replace": torch.randn(1, PROMPT, HIDDEN, generator=g)}


@pytest.fixture
def remote(shared_server, tiny_model):
    with djinn.connect(shared_server.host_port, timeout_s=60) as client:
        yield client.load(tiny_model, mode="full_djinn", logits_codec=Codec.RAW)


def _spec(op: str, site: str, layer, vectors) -> tuple[iv.Intervention, object]:
    """The intervention and the value its local hook uses."""
    if op == "scale":
        return iv.scale(site, layer, 0.5), 0.5
    if op == "add":
        return iv.add(site, layer, vectors["add"]), vectors["add"]
    if op == "replace":
        return iv.replace(site, layer, vectors["replace"]), vectors["replace"]
    return iv.ablate(site, layer, op.removeprefix("ablate_")), None


# -- unit: the spec ------------------------------------------------------------------------------------
def test_the_wire_form_round_trips_and_names_its_tensor():
    given = [iv.save("layer", 3, positions=[-1], lens=True), iv.add("mlp", 1, torch.ones(4), steps=[0, 2]),
             iv.ablate("embeddings", how="mean")]
    wire, tensors = iv.to_wire(given)
    assert list(tensors) == ["intervention.1"]
    back = iv.from_wire(wire, tensors)
    assert [(b.op, b.site, b.layer, b.positions, b.steps, b.lens, b.ablation) for b in back] == \
        [(g.op, g.site, g.layer, g.positions, g.steps, g.lens, g.ablation) for g in given]
    assert back[0].key == "lens.layer.3" and torch.equal(back[1].tensor, torch.ones(4))


@pytest.mark.parametrize("bad, message", [
    (iv.Intervention("steer", "layer", 1), r"intervention 0: unknown op 'steer'"),
    (iv.Intervention("save", "residual", 1), r"unknown site 'residual'"),
    (iv.Intervention("save", "layer", None), r"site layer needs a decoder layer index"),
    (iv.Intervention("save", "final_norm", 2), r"site final_norm has no layer index"),
    (iv.Intervention("scale", "mlp", 1, factor=float("nan")), r"'factor' must be a finite number"),
    (iv.Intervention("add", "mlp", 1), r"add needs a tensor"),
    (iv.Intervention("add", "mlp", 1, tensor=torch.ones(4, dtype=torch.long)), r"must be a floating tensor"),
    (iv.Intervention("save", "mlp", 1, positions=()), r"'positions' must be a non-empty list"),
    (iv.Intervention("save", "mlp", 1, steps=(-1,)), r"'steps' must hold step numbers from 0"),
    (iv.Intervention("ablate", "mlp", 1, ablation="half"), r"'ablation' must be one of"),
    (iv.Intervention("scale", "mlp", 1, factor=2.0, lens=True), r"'lens' is a flag of save"),
])
def test_bad_specs_are_refused_naming_the_field(bad, message):
    with pytest.raises(BadRequest, match=message):
        iv.to_wire([bad])


def test_two_saves_under_one_key_are_refused():
    with pytest.raises(BadRequest, match=r"several saves come back under \['layer.2'\]"):
        iv.to_wire([iv.save("layer", 2), iv.save("layer", 2, positions=[0])])
    iv.to_wire([iv.save("layer", 2), iv.save("layer", 2, positions=[0], name="last")])


# -- every op at every site, against a local hook ------------------------------------------------------
@pytest.mark.parametrize("site, layer", SITES, ids=[s for s, _ in SITES])
@pytest.mark.parametrize("op", ["save", "scale", "add", "replace", "ablate_zero", "ablate_mean"])
def test_every_op_at_every_site_equals_a_local_hook(remote, tiny_model, prompt, vectors, op, site, layer):
    local_seen: list = []
    if op == "save":
        given, hooks = [iv.save(site, layer)], [(site, layer, recorder(local_seen))]
    else:
        spec, value = _spec(op, site, layer, vectors)
        given = [spec]
        hooks = [(site, layer, edit_of(op.removeprefix("ablate_"), value))]
    with hooked(tiny_model, hooks):
        expected = forward_logits(tiny_model, prompt, kv.from_pairs([]), all_positions=True)
    with remote.session() as s:
        got = s.trace(prompt, given, logits="all")
    assert torch.equal(got.logits, expected), f"{op} at {site}: logits differ from the local hook's"
    if op == "save":
        assert torch.equal(got.saved[given[0].key], local_seen[0])
    else:
        assert not torch.equal(got.logits, forward_logits(tiny_model, prompt, kv.from_pairs([]), all_positions=True)), \
            "the edit changed nothing"


def test_several_sites_in_one_pass_in_the_order_given(remote, tiny_model, prompt, vectors):
    given = [iv.save("layer", i, positions=[-1]) for i in range(LAYERS)] + [
        iv.save("attention", 2, name="attn2.before"), iv.add("attention", 2, vectors["add"]),
        iv.save("attention", 2, name="attn2.after"), iv.scale("mlp", 6, 1.5, positions=[0, -1]),
        iv.save("layer", 7, positions=[-1], lens=True), iv.save("embeddings", positions=[3, 5])]
    seen = {i: [] for i in range(LAYERS)}
    before, after, emb = [], [], []
    hooks = [("attention", 2, recorder(before)), ("attention", 2, edit_of("add", vectors["add"])),
             ("attention", 2, recorder(after)), ("mlp", 6, edit_of("scale", 1.5, positions=[0, -1])),
             ("embeddings", None, recorder(emb, positions=[3, 5]))]
    hooks += [("layer", i, recorder(seen[i], positions=[-1])) for i in range(LAYERS)]
    with hooked(tiny_model, hooks):
        expected = forward_logits(tiny_model, prompt, kv.from_pairs([]))[:, -1]
    with remote.session() as s:
        got = s.trace(prompt, given)
    assert torch.equal(got.logits, expected)
    for i in range(LAYERS):
        assert torch.equal(got.saved[f"layer.{i}"], seen[i][0]), f"layer {i}'s save"
    assert torch.equal(got.saved["attn2.before"], before[0]) and torch.equal(got.saved["attn2.after"], after[0])
    assert not torch.equal(before[0], after[0]), "a save after an edit at one site sees the edit"
    assert torch.equal(got.saved["embeddings"], emb[0])
    assert torch.equal(got.saved["lens.layer.7"], lens(tiny_model, seen[7][0]))
    # The lens of the last layer is the model's own next-token logits.
    assert torch.equal(got.saved["lens.layer.7"][:, -1].argmax(-1), expected.argmax(-1))


def test_stateless_forward_in_every_remote_mode_and_locally(shared_server, tiny_model, prompt, vectors):
    given = [iv.add("layer", 1, vectors["add"]), iv.save("mlp", 4, positions=[-2, -1])]
    seen: list = []
    with hooked(tiny_model, [("layer", 1, edit_of("add", vectors["add"])), ("mlp", 4, recorder(seen, [-2, -1]))]):
        expected = forward_logits(tiny_model, prompt, kv.from_pairs([]), all_positions=True)
    local = djinn.client.load_local(tiny_model).trace(prompt, given, logits="all")
    assert torch.equal(local.logits, expected) and torch.equal(local.saved["mlp.4"], seen[0])
    with djinn.connect(shared_server.host_port, timeout_s=60) as client:
        for mode in ("semantic_blind", "partially_aware", "full_djinn"):
            counters = client.counters.snapshot()
            got = client.load(tiny_model, mode=mode).trace(prompt, given, logits="all")
            assert torch.equal(got.logits, expected), mode
            assert torch.equal(got.saved["mlp.4"], seen[0]), mode
            received = client.counters.since(counters).received_payload
            if mode != "semantic_blind":  # no KV comes back from a trace
                assert received == expected.nbytes + seen[0].nbytes, mode


# -- generate on the server ------------------------------------------------------------------------
def test_generate_with_steering_at_every_step_is_one_request_and_equals_a_local_loop(remote, tiny_model, prompt,
                                                                                       vectors):
    vector = vectors["add"]
    given = [iv.add("layer", 3, vector), iv.scale("mlp", 5, 0.8, steps=[0, 2, 4]),
             iv.save("layer", 6, positions=[-1]), iv.save("final_norm", positions=[-1], lens=True)]
    seen, normed = [], []

    def hooks_at(step):
        hooks = [("layer", 3, edit_of("add", vector)), ("layer", 6, recorder(seen, [-1])),
                 ("final_norm", None, recorder(normed, [-1]))]
        return hooks + ([("mlp", 5, edit_of("scale", 0.8))] if step in (0, 2, 4) else [])
    tokens, logits, _ = greedy_generate(tiny_model, prompt, NEW_TOKENS, hooks_at)
    client = remote.client
    with remote.session() as s:
        before = client.counters.snapshot()
        got = s.trace_generate(prompt, NEW_TOKENS, given, return_logits=True)
        wire = client.counters.since(before)
        assert s.last_reply["steps"] == NEW_TOKENS
        # and the session goes on from there, unsteered
        more = s.generate(3)
    assert wire.messages_sent == 1 and wire.messages_received == 1, "steering every step is one request"
    assert torch.equal(got.tokens, tokens)
    assert torch.equal(got.logits, logits)
    assert torch.equal(got.saved["layer.6"], torch.cat(seen, dim=1))
    assert got.saved["layer.6"].shape == (1, NEW_TOKENS, HIDDEN)
    assert torch.equal(got.saved["lens.final_norm"], lens(tiny_model, torch.cat(normed, dim=1)))
    # The steered KV stays: three more plain steps from it, as a local loop would make them.
    cont, _, _ = local_generate_from(tiny_model, prompt, tokens, hooks_at, 3)
    assert torch.equal(more, cont)


def local_generate_from(model, prompt, tokens, hooks_at, more: int):
    """The local loop of `tokens.shape[1]` hooked steps, then `more` steps without hooks."""
    done, _, cache = greedy_generate(model, prompt, tokens.shape[1], hooks_at)
    feed, out = done[:, -1:], []
    for _ in range(more):
        feed = forward_logits(model, feed, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(feed)
    return torch.cat(out, dim=1), None, cache


def test_generate_saves_per_step_and_on_chosen_steps(remote, tiny_model, prompt):
    given = [iv.save("attention", 1, steps=[0, 3]), iv.save("layer", 4, positions=[-1])]
    with remote.session() as s:
        got = s.trace_generate(prompt, 5, given, per_step=True)
    assert sorted(got.per_step["attention.1"]) == [0, 3] and sorted(got.per_step["layer.4"]) == [0, 1, 2, 3, 4]
    assert got.per_step["attention.1"][0].shape == (1, PROMPT, HIDDEN)
    assert got.per_step["attention.1"][3].shape == (1, 1, HIDDEN)
    assert not got.saved


def test_kv_after_an_edited_prefill_is_the_edited_one(remote, tiny_model, prompt, vectors):
    edit = edit_of("add", vectors["add"])
    with hooked(tiny_model, [("layer", 2, edit)]):
        cache = kv.from_pairs([])
        first = forward_logits(tiny_model, prompt, cache)[:, -1]
    feed, expected = first.argmax(-1, keepdim=True), [first.argmax(-1, keepdim=True)]
    for _ in range(4):
        feed = forward_logits(tiny_model, feed, cache)[:, -1].argmax(-1, keepdim=True)
        expected.append(feed)
    with remote.session() as s:
        traced = s.trace(prompt, [iv.add("layer", 2, vectors["add"])])
        assert torch.equal(traced.logits, first)
        assert torch.equal(s.generate(5), torch.cat(expected, dim=1))


# -- composition ------------------------------------------------------------------------------------
def test_edits_before_a_breakpoint_and_after_it(remote, tiny_model, prompt, vectors):
    parked_at = 5
    seen: list = []
    hooks = [("layer", 2, edit_of("add", vectors["add"])), ("mlp", 1, recorder(seen)),
             ("layer", 6, edit_of("scale", 0.7))]
    with hooked(tiny_model, hooks + [("layer", parked_at, recorder(parked := []))]):
        expected = forward_logits(tiny_model, prompt, kv.from_pairs([]))[:, -1]
    with remote.session() as s:
        act = s.run_to_layer(prompt, parked_at, [iv.add("layer", 2, vectors["add"]), iv.save("mlp", 1)])
        assert torch.equal(act, parked[0]) and torch.equal(s.last_saved["mlp.1"], seen[0])
        with pytest.raises(BadRequest, match=r"intervention 0 \(scale at the layer of decoder layer 3\): ran before "
                                             r"decoder layer 5's breakpoint"):
            s.resume(act, [iv.scale("layer", 3, 0.7)])
        assert torch.equal(s.resume(act, [iv.scale("layer", 6, 0.7)]), expected)
    with remote.session() as s:
        with pytest.raises(BadRequest, match=r"runs after decoder layer 5, where this step parks"):
            s.run_to_layer(prompt, parked_at, [iv.save("final_norm")])
        assert s.stats()["length"] == 0


def test_a_paged_out_session_is_edited_as_a_resident_one(remote, tiny_model, prompt, vectors):
    hooks_at = lambda step: [("mlp", 3, edit_of("add", vectors["add"]))] if step == 1 else []  # noqa: E731
    tokens, logits, _ = greedy_generate(tiny_model, prompt, 3, hooks_at)
    with remote.session() as s:
        first = s.trace(prompt)
        assert s.offload() > 0
        got = s.trace_generate(None, 2, [iv.add("mlp", 3, vectors["add"], steps=[0])], return_logits=True)
        assert s.stats()["page_ins"] > 0
    assert torch.equal(first.logits, logits[:, 0])
    assert torch.equal(got.tokens, tokens[:, 1:]) and torch.equal(got.logits, logits[:, 1:])


@pytest.fixture(scope="module")
def streaming_server(server_launcher, tiny_model):
    from djinn import models
    model_bytes = models.parameter_bytes(models.TINY_MODEL, torch.float32)
    server = server_launcher.start("interventions-ring", cpu_server(
        "--vram-budget-gb", f"{model_bytes * 0.8 / 2**30:.9f}", "--ring-buffer-gb", f"{(6 << 20) / 2**30:.9f}",
        # the residency plan reserves KV for this many tokens (the model's whole context would not fit)
        "--stream-kv-tokens", "64", "--disable-kv-swap"))
    yield server
    server.stop()


def test_interventions_reach_a_streamed_models_layers(streaming_server, tiny_model, prompt, vectors):
    vector = vectors["add"]
    given = [iv.add("layer", 3, vector), iv.save("attention", 6, positions=[-1]), iv.ablate("mlp", 1)]
    seen: list = []

    def hooks_at(step):
        return [("layer", 3, edit_of("add", vector)), ("attention", 6, recorder(seen, [-1])),
                ("mlp", 1, edit_of("zero", None))]
    tokens, logits, _ = greedy_generate(tiny_model, prompt, 4, hooks_at)
    with djinn.connect(streaming_server.host_port, timeout_s=60) as client:
        remote = client.load(tiny_model, mode="full_djinn", logits_codec=Codec.RAW)
        assert next(m for m in client.stats()["models"] if m["fingerprint"] == remote.fingerprint)["streamed"]
        with remote.session() as s:
            got = s.trace_generate(prompt, 4, given, return_logits=True)
    assert torch.equal(got.tokens, tokens) and torch.equal(got.logits, logits)
    assert torch.equal(got.saved["attention.6"], torch.cat(seen, dim=1))


# -- the wire and bad requests ------------------------------------------------------------------------
def test_only_saved_tensors_and_tokens_cross_the_wire(remote, prompt, vectors):
    client = remote.client
    given = [iv.add("layer", 3, vectors["add"]), iv.save("layer", 5, positions=[-1]),
             iv.save("layer", 1, positions=[-1], lens=True)]
    with remote.session() as s:
        before = client.counters.snapshot()
        got = s.trace_generate(prompt, NEW_TOKENS, given)
        wire = client.counters.since(before)
    saved = sum(t.nbytes for t in got.saved.values())
    assert got.saved["lens.layer.1"].shape == (1, NEW_TOKENS, 8192)
    assert wire.received_payload == got.tokens.nbytes + saved
    assert wire.sent_payload == prompt.nbytes + vectors["add"].nbytes
    # Compressed by kind on request: the same values, fewer bytes.
    with remote.session() as s:
        before = client.counters.snapshot()
        zstd = s.trace_generate(prompt, NEW_TOKENS, given, saves_codec=Codec.ZSTD)
        assert client.counters.since(before).received_payload < wire.received_payload
    assert all(torch.equal(zstd.saved[k], got.saved[k]) for k in got.saved)


def test_a_forward_for_its_saves_alone_returns_nothing_else(remote, tiny_model, prompt):
    """logits="none": a logit lens at every layer brings back the lens rows and nothing more."""
    given = [iv.save("layer", i, positions=[-1], lens=True) for i in range(LAYERS)]
    seen = {i: [] for i in range(LAYERS)}
    with hooked(tiny_model, [("layer", i, recorder(seen[i], [-1])) for i in range(LAYERS)]):
        forward_logits(tiny_model, prompt, kv.from_pairs([]))
    client = remote.client
    before = client.counters.snapshot()
    got = remote.trace(prompt, given, logits="none")
    wire = client.counters.since(before)
    assert got.logits is None
    assert all(torch.equal(got.saved[f"lens.layer.{i}"], lens(tiny_model, seen[i][0])) for i in range(LAYERS))
    assert wire.received_payload == sum(t.nbytes for t in got.saved.values()) == LAYERS * 8192 * 4
    assert wire.sent_payload == prompt.nbytes
    with remote.session() as s:  # in a session the picked token comes back, and decoding goes on from it
        traced = s.trace(prompt, given, logits="none")
        assert traced.tokens.shape == (1, 1) and s.generate(2)[:, :1].equal(traced.tokens)


@pytest.mark.parametrize("given, message", [
    ([iv.save("layer", LAYERS)], rf"intervention 0 \(save at the layer of decoder layer {LAYERS}\): decoder layer "
                                 rf"{LAYERS} is outside 0..{LAYERS - 1}"),
    ([iv.save("mlp", 1), iv.add("attention", -1, torch.ones(HIDDEN))], r"intervention 1 .*decoder layer -1 is outside"),
    ([iv.replace("layer", 2, torch.ones(1, 3, HIDDEN))], r"intervention 0 \(replace at the layer of decoder layer 2\): "
                                                          rf"its tensor \[1, 3, {HIDDEN}\] does not broadcast to the "
                                                          rf"site's \[batch, positions, hidden\] = \[1, {PROMPT}, "
                                                          rf"{HIDDEN}\] at step 0"),
    ([iv.add("mlp", 2, torch.ones(HIDDEN + 1))], rf"its tensor \[{HIDDEN + 1}\] must end in the hidden size {HIDDEN}"),
    ([iv.save("embeddings", positions=[PROMPT])], rf"position {PROMPT} is outside step 0's {PROMPT} tokens"),
    ([iv.save("final_norm", steps=[1])], r"applies at steps \[1\], this request runs 1 step"),
])
def test_bad_interventions_fail_clearly_and_leave_the_session_and_server_alone(remote, prompt, given, message):
    with remote.session() as s:
        with pytest.raises(BadRequest, match=message):
            s.trace(prompt, given)
        assert s.stats()["length"] == 0
        assert s.trace(prompt, [iv.save("layer", 0)]).saved["layer.0"].shape == (1, PROMPT, HIDDEN)


def test_a_hostile_header_is_refused_naming_the_field(remote, prompt):
    conn = remote.client.connection
    with remote.session() as s:
        args = {"model": remote.fingerprint, "session": s.handle}
        ids = {"input_ids": prompt}
        for raw, message in [("x", r"'interventions' must be a list"), ([5], r"intervention 0 must be a map"),
                             ([{"op": "save", "site": "layer", "layer": 1, "code": "import os"}],
                              r"intervention 0 has unknown fields \['code'\]"),
                             ([{"op": "add", "site": "layer", "layer": 1, "tensor": True}],
                              r"intervention 0 declares a tensor, the message carries none"),
                             ([{"op": "save", "site": "layer", "layer": True}], r"needs a decoder layer index")]:
            with pytest.raises(BadRequest, match=message):
                conn.request("prefill", {**args, "interventions": raw}, ids)
        with pytest.raises(BadRequest, match=r"'logits' must be one of"):
            conn.request("prefill", {**args, "logits": "some"}, ids)
        with pytest.raises(BadRequest, match=r"'max_new_tokens' must be at least 1 and fit the model's context"):
            conn.request("generate", {**args, "max_new_tokens": 10**6}, ids)
        assert s.stats()["length"] == 0


def test_generate_stops_at_eos_and_pads_finished_rows(remote, tiny_model, prompt):
    """A batch of two where a token of the first row that the second never makes is its eos: the first
    row is padded after it, as HF's _sample pads it, the other goes on; with an eos for each, the request
    stops once both have finished."""
    batch = torch.cat([prompt, prompt.flip(1)], dim=0)
    with remote.session() as s:
        free = s.trace_generate(batch, 6).tokens
    rows = [r.tolist() for r in free]
    eos = next(t for t in rows[0] if t not in rows[1])
    first = rows[0].index(eos)
    with remote.session() as s:
        got = s.trace_generate(batch, 6, eos_token_id=[eos], pad_token_id=7)
        assert s.last_reply["stop_reason"] == "max_new_tokens"
    assert got.tokens[0].tolist() == rows[0][:first + 1] + [7] * (5 - first)
    assert torch.equal(got.tokens[1], free[1])
    other = rows[1][0]  # the second row's first token ends it at once
    assert other not in rows[0][:first], "the seeded rows' tokens overlap: pick another pair"
    with remote.session() as s:
        got = s.trace_generate(batch, 6, eos_token_id=[eos, other])
        assert s.last_reply["stop_reason"] == ("eos" if first < 5 else "max_new_tokens")
        assert got.tokens.shape == (2, first + 1)


def test_a_rolled_back_generate_leaves_the_sampler_where_it_was(remote, prompt):
    """Seeded sampling with a repetition penalty: a generate that fails at its second step has drawn
    once and grown the history; both go back with the KV, so going on gives the unbroken run's tokens."""
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=50, repetition_penalty=1.3, seed=5)
    with remote.session() as ref:
        expected = ref.trace_generate(prompt, 6, sampling=params).tokens
    with remote.session() as s:
        first = s.trace_generate(prompt, 3, sampling=params).tokens
        with pytest.raises(BadRequest, match=r"position -2 is outside step 1's 1 token"):
            s.trace_generate(None, 3, [iv.save("layer", 1, positions=[-2], steps=[1])])
        rest = s.trace_generate(None, 3).tokens
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


def test_a_failing_step_of_a_generate_takes_the_whole_request_back(remote, prompt):
    """Step 0 runs, step 1's position check fails: the session holds what it held before."""
    with remote.session() as s:
        with pytest.raises(BadRequest, match=r"position -2 is outside step 1's 1 token"):
            s.trace_generate(prompt, 3, [iv.save("layer", 1, positions=[-2])])
        assert s.stats()["length"] == 0
        assert s.trace_generate(prompt, 2).tokens.shape == (1, 2)
