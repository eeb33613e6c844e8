"""`RemoteModel.generate` against HF's `generate`, in every mode, on four architectures.

tiny-llama and a 1-layer GPT-2 (tied embeddings) from the catalogue, and small Qwen2 and
Mistral checkpoints written with `save_pretrained`: the Qwen2 one preloaded by the server
(`--model PATH`, attached by name), the Mistral one loaded by path and uploaded. Each mode
must give HF's sequences, logits and scores bit for bit for a left-padded batch of 3
with an eos that finishes one row early, and for seeded sampling (top-k, top-p,
temperature, repetition penalty): on a CPU every side samples from the same generator
stream HF draws from after `torch.manual_seed`.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

import djinn
from djinn import models
from djinn.errors import BadRequest, ModelNotFound, UnsupportedArgument
from djinn.modes import MODES
from djinn.server.process import ServerProcess
from djinn.server.server import ServerConfig
from djinn.transport import Codec

NEW_TOKENS = 5
PAD = 0
SEED = 5
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.3)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
SUBJECTS = ["tiny-llama", "gpt2", "qwen2", "mistral"]


def _save(config, path) -> str:
    torch.manual_seed(0)  # HF's own initialisation, seeded: the checkpoint is what matters, not its values
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"qwen2": _save(Qwen2Config(**SMALL), root / "qwen2"),
            "mistral": _save(MistralConfig(**SMALL, sliding_window=64), root / "mistral")}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    config = ServerConfig(device="cpu", model=(checkpoints["qwen2"],))
    with ServerProcess(config=config, log_path=tmp_path_factory.mktemp("hf") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with djinn.connect(server.host_port, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def subjects(checkpoints, tiny_model):
    """name -> (the HF model that is the reference, what `client.load` is given)."""
    gpt2 = models.build("gpt2", seed=0, num_layers=1)  # its 50257-token tied embedding is the point
    qwen2, mistral = (AutoModelForCausalLM.from_pretrained(checkpoints[n]).eval() for n in ("qwen2", "mistral"))
    return {"tiny-llama": (tiny_model, tiny_model), "gpt2": (gpt2, gpt2),
            "qwen2": (qwen2, checkpoints["qwen2"]),  # preloaded by the server: attached by name
            "mistral": (mistral, checkpoints["mistral"])}  # a local checkpoint: built here, uploaded


def _padded_prompt(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _assert_same_output(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for name in ("logits", "scores"):
        mine, theirs = getattr(out, name), getattr(ref, name)
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs)), name


@pytest.mark.correctness
@pytest.mark.parametrize("mode", [m.name for m in MODES])
@pytest.mark.parametrize("name", SUBJECTS)
def test_padded_batch_with_eos_matches_hf(client, subjects, name, mode):
    model, target = subjects[name]
    ids, mask = _padded_prompt(model.config.vocab_size)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    eos = int(plain[1, ids.shape[1] + 1])  # row 1's second new token: that row finishes there
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD, eos_token_id=[eos, 3],
                  return_dict_in_generate=True, output_logits=True, output_scores=True)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    assert (ref.sequences[1, ids.shape[1] + 2:] == PAD).all(), "the eos must finish row 1 early"
    _assert_same_output(client.load(target, mode=mode).generate(ids, attention_mask=mask, **kwargs), ref)


@pytest.mark.correctness
@pytest.mark.parametrize("mode", [m.name for m in MODES])
@pytest.mark.parametrize("name", SUBJECTS)
def test_seeded_sampling_matches_hf(client, subjects, name, mode):
    model, target = subjects[name]
    ids, mask = _padded_prompt(model.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW_TOKENS, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                  **SAMPLING)
    torch.manual_seed(SEED)  # HF draws from torch's global generator
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    _assert_same_output(client.load(target, mode=mode).generate(ids, attention_mask=mask, seed=SEED, **kwargs), ref)


def test_sampling_reproduces_and_its_greedy_limits_are_greedy(client, tiny_model):
    remote = client.load(tiny_model, mode="full_djinn")
    ids, mask = _padded_prompt(tiny_model.config.vocab_size)
    run = lambda **kw: remote.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, **kw)
    sampled = run(do_sample=True, seed=SEED)
    assert torch.equal(sampled, run(do_sample=True, seed=SEED))
    assert not torch.equal(sampled, run(do_sample=True, seed=SEED + 1))
    greedy = run()
    assert not torch.equal(sampled, greedy)
    assert torch.equal(run(do_sample=True, top_k=1, seed=SEED), greedy)
    assert torch.equal(run(do_sample=True, temperature=1e-6, seed=SEED), greedy)


def test_full_djinn_samples_on_the_server_and_sends_only_the_token(client, tiny_model):
    remote = client.load(tiny_model, mode="full_djinn")
    ids, mask = _padded_prompt(tiny_model.config.vocab_size)
    remote.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, seed=SEED, **SAMPLING)
    assert remote.last_stats.decode_payload_sent_per_token == 3 * 8  # one int64 token a row, in
    assert remote.last_stats.decode_payload_received_per_token == 3 * 8  # and out


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer made here (nothing downloaded): the user's own tokenizer in a real setting."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab_size)]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])


@pytest.mark.parametrize("mode", ["partially_aware", "full_djinn"])
def test_text_in_text_out_with_a_tokenizer(client, tiny_model, mode):
    tokenizer = _tokenizer(tiny_model.config.vocab_size)
    texts = ["w10 w11 w12 w13 w14", "w20 w21"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    ref = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    out = client.load(tiny_model, mode=mode).generate(**tokenizer(texts, padding=True, return_tensors="pt"),
                                                      max_new_tokens=4)
    assert torch.equal(out, ref)
    assert tokenizer.batch_decode(out, skip_special_tokens=True) == tokenizer.batch_decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("kwargs,named", [
    (dict(num_beams=2), "num_beams"), (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(streamer=object()), "streamer"), (dict(logits_processor=[]), "logits_processor"),
    (dict(no_such_argument=1), "no_such_argument"), (dict(use_cache=False), "use_cache")])
def test_unsupported_arguments_are_named(client, tiny_model, kwargs, named):
    remote = client.load(tiny_model, mode="full_djinn")
    with pytest.raises(UnsupportedArgument, match=named):
        remote.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, **kwargs)


def test_a_generation_at_the_context_stops_there_and_keeps_its_tokens(client, subjects):
    model, target = subjects["qwen2"]
    context = model.config.max_position_embeddings
    ids = torch.randint(3, 512, (1, context - 3), generator=torch.Generator().manual_seed(2))
    remote = client.load(target, mode="full_djinn")
    with pytest.warns(UserWarning, match="context"):
        out = remote.generate(ids, max_new_tokens=10)
    assert out.shape[1] == context and remote.last_stats.stop_reason == "context_limit"
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))


def test_attach_by_name_sends_no_weights(server, checkpoints, subjects):
    path = checkpoints["qwen2"]
    with djinn.connect(server.host_port) as c:
        loaded = {m["name"]: m["fingerprint"] for m in c.hello()["models"]}
        assert loaded == {path: models.fingerprint(subjects["qwen2"][0])}, "the fingerprint guards identity"
        remote = c.load(path, mode="full_djinn")
        assert remote.fingerprint == loaded[path]
        assert c.counters.sent_payload < 64 * 1024, "weights crossed the wire"
        with pytest.raises(ModelNotFound, match="no model named"):
            c.load("no-such-model", mode="full_djinn")


def test_weights_changed_after_load_warn_and_a_new_load_registers_them(client):
    model = models.build(models.TINY_MODEL, seed=21)
    remote = client.load(model, mode="full_djinn")
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.warns(UserWarning, match="changed since client.load"):
        remote.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=1)
    again = client.load(model, mode="full_djinn")
    assert again.fingerprint != remote.fingerprint == models.fingerprint(models.build(models.TINY_MODEL, seed=21))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=1)


def test_a_bad_option_leaves_the_session_as_it_was(client, tiny_model, make_prompt, hf_greedy):
    ids = make_prompt(tiny_model, 12)
    ref = hf_greedy(tiny_model, ids, 2)[0][:, ids.shape[1]:]
    fingerprint = client.load(tiny_model, mode="full_djinn").fingerprint
    conn = client.connection
    session = conn.request("open_session", {"model": fingerprint}).args["session"]
    args = {"model": fingerprint, "session": session, "returns": "token"}
    with pytest.raises(BadRequest, match="'returns'"):
        conn.request("prefill", {**args, "returns": "everything"}, {"input_ids": ids})
    with pytest.raises(BadRequest, match="'returns'"):  # a list among the names had been an `internal` reply
        conn.request("prefill", {**args, "returns": ["token", ["logits"]]}, {"input_ids": ids})
    first = conn.request("prefill", args, {"input_ids": ids}).tensors["token"]  # still a fresh session
    with pytest.raises(BadRequest, match="logits codec"):
        conn.request("decode", {**args, "logits_codec": "gzip9"}, {"input_ids": first})
    with pytest.raises(BadRequest, match="prefill that starts the session"):
        conn.request("decode", {**args, "sampling": {"do_sample": True, "seed": 1}}, {"input_ids": first})
    second = conn.request("decode", args, {"input_ids": first}).tensors["token"]  # the token was fed once
    assert torch.equal(torch.cat([first, second], dim=1), ref)
    assert conn.request("session_stats", {"model": fingerprint, "session": session}).args["length"] == 13
    conn.request("close_session", {"session": session})


def test_remote_cache_logits_stay_raw(client, tiny_model):
    remote = client.load(tiny_model, mode="remote_cache", logits_codec=Codec.ZSTD)
    remote.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
    assert remote.last_stats.decode_payload_received_per_token == tiny_model.config.vocab_size * 4 + 8


def test_generate_on_a_parked_session_says_it_is_parked(client, tiny_model):
    with client.load(tiny_model, mode="full_djinn").session() as s:
        s.run_to_layer(torch.ones(1, 4, dtype=torch.long), layer=2)
        with pytest.raises(ValueError, match="parked at decoder layer 2"):
            s.generate(max_new_tokens=1)
