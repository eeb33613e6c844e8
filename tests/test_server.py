"""The server and client against a live server process: modes, caches, sessions, bad input."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import zmq

import djinn
from djinn import models
from djinn.errors import (BadRequest, ModelNotFound, OutOfMemory, SessionNotFound, Unauthenticated,
                          UploadIncomplete)
from djinn.modes import MODES
from djinn.transport import OutgoingTensor, TensorKind

NEW_TOKENS = 12
LADDER = ["semantic_blind", "partially_aware", "remote_cache", "full_djinn"]


@pytest.fixture(scope="module")
def reference(tiny_model, hf_greedy):
    """HF greedy generate, run locally: what every mode must reproduce."""
    ids = torch.randint(0, 8192, (1, 72), generator=torch.Generator().manual_seed(7))
    return (ids, *hf_greedy(tiny_model, ids, NEW_TOKENS))


@pytest.fixture
def client(shared_server):
    with djinn.connect(shared_server.host_port, timeout_s=60) as c:
        yield c


def _session_tokens(client, model, ids, n):
    remote = client.load(model, mode="full_djinn")
    return remote.generate(ids, max_new_tokens=n)


@pytest.mark.parametrize("mode", [m.name for m in MODES])
def test_every_mode_matches_hf_generate_bit_for_bit(client, tiny_model, reference, mode):
    ids, ref_tokens, ref_logits = reference
    remote = client.load(tiny_model, mode=mode)
    tokens = remote.generate(ids, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(remote.last_logits, ref_logits), "logits must be bit-identical without a lossy codec"


@pytest.mark.parametrize("alias,mode", [("local", "native_pytorch"), ("naive", "semantic_blind"),
                                        ("sys_simulated", "full_djinn")])
def test_seed_aliases_resolve_to_the_ladder(client, tiny_model, reference, alias, mode):
    ids, ref_tokens, _ = reference
    remote = client.load(tiny_model, mode=alias)
    assert remote.mode.name == mode
    assert torch.equal(remote.generate(ids, max_new_tokens=4), ref_tokens[:, :ids.shape[1] + 4])


def test_batched_generation_matches_hf(client, tiny_model, make_prompt):
    ids = make_prompt(tiny_model, 16, batch=3)
    ref = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for mode in ("partially_aware", "full_djinn"):
        assert torch.equal(client.load(tiny_model, mode=mode).generate(ids, max_new_tokens=6), ref)


def test_decode_bytes_order_strictly_down_the_ladder(client, tiny_model, reference):
    ids = reference[0]
    per_step = {}
    for mode in LADDER:
        remote = client.load(tiny_model, mode=mode)
        remote.generate(ids, max_new_tokens=6)
        stats = remote.last_stats
        per_step[mode] = stats.decode_bytes_sent_per_token + stats.decode_bytes_received_per_token
    values = [per_step[m] for m in LADDER]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values), per_step


def test_full_djinn_decode_payload_is_two_token_ids(client, tiny_model, reference):
    remote = client.load(tiny_model, mode="full_djinn")
    remote.generate(reference[0], max_new_tokens=5)
    stats = remote.last_stats
    assert stats.decode_payload_sent_per_token == 8  # one int64 token in
    assert stats.decode_payload_received_per_token == 8  # one int64 token out


def test_full_djinn_compresses_logits_only_when_asked(client, tiny_model, reference):
    remote = client.load(tiny_model, mode="full_djinn")
    remote.generate(reference[0], max_new_tokens=4, return_logits=True)
    with_logits = remote.last_stats.decode_payload_received_per_token
    vocab_bytes = tiny_model.config.vocab_size * 4
    assert 8 < with_logits < vocab_bytes + 8, "zstd must shrink fp32 logits"


def test_stats_split_time_into_queue_compute_transfer(client, tiny_model, reference):
    remote = client.load(tiny_model, mode="remote_cache")
    remote.generate(reference[0], max_new_tokens=4)
    s = remote.last_stats
    assert s.compute_ms > 0 and s.queue_ms >= 0 and s.transfer_ms >= 0
    assert s.compute_ms + s.queue_ms <= s.total_ms


def test_weights_upload_once_per_fingerprint(shared_server, tiny_model):
    with djinn.connect(shared_server.host_port) as first, djinn.connect(shared_server.host_port) as second:
        first.load(tiny_model, mode="full_djinn")
        sent = second.counters.sent_payload
        second.load(tiny_model, mode="full_djinn")
        second.load(tiny_model, mode="partially_aware")
        assert second.counters.sent_payload == sent, "a cached model must not be uploaded again"
        assert second.stats()["cache"]["hits"] >= 2


def test_broken_upload_resumes_with_only_the_missing_tensors(shared_server):
    model = models.build(models.TINY_MODEL, seed=11)
    state = model.state_dict()
    fingerprint = models.fingerprint(state)
    names = list(state)
    with djinn.connect(shared_server.host_port) as c:
        from djinn.client import config_dict
        c.connection.request("register_model", {
            "model": fingerprint, "config": config_dict(model), "dtype": "float32",
            "tensors": [[n, "float32", list(t.shape)] for n, t in state.items()]})
        half = names[: len(names) // 2]
        c.connection.request("upload_weights", {"model": fingerprint},
                             {n: OutgoingTensor(state[n], TensorKind.WEIGHT) for n in half})
        with pytest.raises(UploadIncomplete):
            c.connection.request("open_session", {"model": fingerprint})
        before = c.counters.sent_payload
        c.upload(model)
        resent = c.counters.sent_payload - before
        rest = sum(state[n].numel() * 4 for n in names[len(half):])
        assert rest <= resent < rest + 64 * 1024, "only the missing half is sent again"
        c.connection.request("open_session", {"model": fingerprint})


def test_upload_with_wrong_bytes_is_rejected(shared_server):
    model = models.build(models.TINY_MODEL, seed=12)
    with djinn.connect(shared_server.host_port) as c:
        from djinn.client import config_dict
        state = model.state_dict()
        c.connection.request("register_model", {
            "model": "0" * 32, "config": config_dict(model), "dtype": "float32",
            "tensors": [[n, "float32", list(t.shape)] for n, t in state.items()]})
        with pytest.raises(BadRequest, match="fingerprint"):
            c.connection.request("upload_weights", {"model": "0" * 32},
                                 {n: OutgoingTensor(t, TensorKind.WEIGHT) for n, t in state.items()})


class TestBadInput:
    """Each bad request gets a clear error; the server and other sessions carry on."""

    @pytest.fixture
    def bystander(self, client, tiny_model, reference):
        """A session mid-generation whose KV must survive every bad request."""
        ids = reference[0]
        remote = client.load(tiny_model, mode="full_djinn")
        conn = client.connection
        session = conn.request("open_session", {"model": remote.fingerprint}).args["session"]
        first = conn.request("prefill", {"model": remote.fingerprint, "session": session, "returns": "token"},
                             {"input_ids": ids}).tensors["token"]
        yield remote.fingerprint, session, first
        expected = reference[1][:, ids.shape[1] + 1]
        token = conn.request("decode", {"model": remote.fingerprint, "session": session, "returns": "token"},
                             {"input_ids": first}).tensors["token"]
        assert token.item() == expected.item(), "the bystander session lost its KV cache"

    def _prefill(self, client, fingerprint, ids):
        session = client.connection.request("open_session", {"model": fingerprint}).args["session"]
        return client.connection.request("prefill", {"model": fingerprint, "session": session, "returns": "token"},
                                         {"input_ids": ids})

    def test_unknown_fingerprint(self, client, bystander):
        with pytest.raises(ModelNotFound, match="f" * 32):
            client.connection.request("open_session", {"model": "f" * 32})

    def test_unknown_session(self, client, bystander):
        fingerprint = bystander[0]
        with pytest.raises(SessionNotFound, match="unknown or expired"):
            client.connection.request("decode", {"model": fingerprint, "session": "deadbeef", "returns": "token"},
                                      {"input_ids": torch.zeros(1, 1, dtype=torch.long)})

    def test_session_of_another_model(self, client, bystander):
        other = models.build(models.TINY_MODEL, seed=5)
        other_fp = client.load(other, mode="full_djinn").fingerprint
        with pytest.raises(BadRequest, match="belongs to model"):
            client.connection.request("decode", {"model": other_fp, "session": bystander[1], "returns": "token"},
                                      {"input_ids": bystander[2]})

    @pytest.mark.parametrize("ids,match", [
        (torch.tensor([[1, 2, 8192]]), "outside the vocabulary"),
        (torch.tensor([[-1, 2]]), "outside the vocabulary"),
        (torch.tensor([1, 2, 3]), r"shape \[batch, tokens\]"),
        (torch.zeros(1, 0, dtype=torch.long), r"shape \[batch, tokens\]"),
        (torch.tensor([[1.0, 2.0]]), "int64 or int32"),
        (torch.zeros(1, 2049, dtype=torch.long), "context of 2048"),
    ], ids=["id-over-vocab", "negative-id", "1-d", "empty", "float-ids", "too-long"])
    def test_bad_token_ids(self, client, bystander, ids, match):
        with pytest.raises(BadRequest, match=match):
            self._prefill(client, bystander[0], ids)

    def test_missing_input(self, client, bystander):
        session = client.connection.request("open_session", {"model": bystander[0]}).args["session"]
        with pytest.raises(BadRequest, match="no 'input_ids'"):
            client.connection.request("prefill", {"model": bystander[0], "session": session})

    def test_decode_before_prefill(self, client, bystander):
        session = client.connection.request("open_session", {"model": bystander[0]}).args["session"]
        with pytest.raises(BadRequest, match="prefill starts a session"):
            client.connection.request("decode", {"model": bystander[0], "session": session},
                                      {"input_ids": torch.zeros(1, 1, dtype=torch.long)})

    def test_stateless_kv_of_wrong_shape(self, client, bystander):
        bad = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "kv.0.k": torch.zeros(1, 4, 3, 32)}
        for i in range(8):
            bad[f"kv.{i}.k"] = torch.zeros(1, 4, 3, 32)
            bad[f"kv.{i}.v"] = torch.zeros(1, 4, 3 if i else 2, 32)
        with pytest.raises(BadRequest, match="KV layer 0"):
            client.connection.request("forward", {"model": bystander[0]}, bad)

    def test_register_with_mismatched_tensor(self, client, tiny_model, bystander):
        from djinn.client import config_dict
        with pytest.raises(BadRequest, match="does not match"):
            client.connection.request("register_model", {
                "model": "a" * 32, "config": config_dict(tiny_model), "dtype": "float32",
                "tensors": [["model.embed_tokens.weight", "float32", [3, 3]]]})

    def test_client_that_disconnects_mid_request(self, shared_server, client, tiny_model, bystander):
        big = {"input_ids": torch.zeros(1, 1, dtype=torch.long),
               **{f"w.{n}": t for n, t in tiny_model.state_dict().items()}}
        from djinn.client import config_dict
        from djinn.transport import Header, encode_message
        ctx = zmq.Context.instance()
        rude = ctx.socket(zmq.DEALER)
        rude.connect(shared_server.address)
        frames, _, _ = encode_message(Header("forward", 1, args={"config": config_dict(tiny_model),
                                                                 "dtype": "float32"}), big)
        rude.send_multipart(frames, copy=False)
        rude.close(linger=0)  # gone before the reply
        assert client.hello()["version"]


@pytest.mark.slow
def test_idle_sessions_expire_after_the_ttl(start_server, tiny_model, reference):
    server = start_server("--session-ttl-s", "1")
    with djinn.connect(server.host_port) as c:
        fp = c.load(tiny_model, mode="full_djinn").fingerprint
        session = c.connection.request("open_session", {"model": fp}).args["session"]
        time.sleep(1.6)
        with pytest.raises(SessionNotFound, match="unknown or expired"):
            c.connection.request("prefill", {"model": fp, "session": session}, {"input_ids": reference[0]})
        assert c.stats()["sessions_expired"] == 1


def test_concurrent_clients_keep_their_own_sessions(shared_server, tiny_model, reference):
    ids, ref_tokens, _ = reference
    results, errors = {}, []

    def run(index):
        try:
            with djinn.connect(shared_server.host_port) as c:
                results[index] = _session_tokens(c, tiny_model, ids, NEW_TOKENS)
        except Exception as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 3 and all(torch.equal(r, ref_tokens) for r in results.values())


def test_budget_evicts_unused_models_and_refuses_kv_past_it(start_server, tiny_model, reference):
    weight_gb = models.parameter_bytes(models.TINY_MODEL, torch.float32) / (1 << 30)
    server = start_server("--vram-budget-gb", f"{weight_gb * 1.2:.6f}")
    other = models.build(models.TINY_MODEL, seed=3)
    with djinn.connect(server.host_port) as c:
        c.load(tiny_model, mode="full_djinn")
        c.load(other, mode="full_djinn")  # does not fit beside the first: the first is evicted
        assert c.stats()["cache"]["evictions"] == 1
        assert "evicted model" in server.log()
        remote = c.load(other, mode="full_djinn")
        with pytest.raises(OutOfMemory, match="budget"):
            remote.generate(torch.zeros(1, 2000, dtype=torch.long), max_new_tokens=1)
        assert remote.generate(reference[0], max_new_tokens=2).shape[1] == reference[0].shape[1] + 2


def test_auth_token_rejects_unauthenticated_peers(start_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = start_server("--auth-token-file", str(token))
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    for credentials in ({}, {"auth_token_file": wrong}):  # refused in the handshake: connect says so at once
        with pytest.raises(Unauthenticated, match="refused this client in the ZeroMQ handshake"):
            djinn.connect(server.host_port, timeout_s=10, **credentials)
    with djinn.connect(server.host_port, timeout_s=10, auth_token_file=token) as member:
        assert member.hello()["version"]


def test_server_address_from_environment(shared_server, monkeypatch):
    monkeypatch.delenv("DJINN_SERVER", raising=False)
    monkeypatch.setenv("GENIE_SERVER_ADDRESS", shared_server.host_port)
    with djinn.connect() as c:
        assert c.hello()["device"] == "cpu"


def test_sigterm_closes_sessions_and_exits_cleanly(start_server, tiny_model, reference):
    server = start_server()
    with djinn.connect(server.host_port) as c:
        remote = c.load(tiny_model, mode="full_djinn")
        c.connection.request("open_session", {"model": remote.fingerprint})
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(15) == 0
    assert "stopped after" in server.log()
