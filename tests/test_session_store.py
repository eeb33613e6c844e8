"""The session store: KV paging under a memory budget, limits, counters, parked sessions, expiry.

In-process (executor + session store + weight cache, no sockets) so every case runs in
milliseconds; the last test goes through a live server for the CLI flags and the stats.
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn
from djinn import models
from djinn.client import config_dict
from djinn.decoding import greedy
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.executor import Executor
from djinn.server.session_store import SessionState, SessionStore
from djinn.server.weight_cache import TensorEntry, WeightCache

PROMPT = 64
NEW_TOKENS = 4
CPU = torch.device("cpu")


def kv_per_token(model) -> int:
    return models.kv_bytes_per_token(model.config, torch.float32)


@pytest.fixture(scope="module")
def fingerprinted(tiny_model):
    state = tiny_model.state_dict()
    return models.fingerprint(state), state


@pytest.fixture
def make_executor(tiny_model, fingerprinted):
    """make_executor(kv_budget_bytes, swap=True, host_limit_bytes=1 GiB) -> (executor, cached model)."""
    fingerprint, state = fingerprinted

    def make(kv_budget_bytes: int, swap: bool = True, host_limit_bytes: int = 1 << 30):
        budget = sum(t.numel() * t.element_size() for t in state.values()) + kv_budget_bytes
        sessions = SessionStore(600.0, "test", CPU, swap=swap, host_limit_bytes=host_limit_bytes)
        weights = WeightCache(CPU, budget, reserve_bytes=lambda: sessions.kv_bytes)
        weights.register(fingerprint, config_dict(tiny_model), torch.float32,
                         [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()])
        cached = weights.receive(fingerprint, state)
        return Executor(CPU, weights, sessions, budget), cached
    return make


@pytest.fixture(scope="module")
def prompts(tiny_model):
    ids = [torch.randint(0, 8192, (1, PROMPT), generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
    refs = [tiny_model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0) for p in ids]
    return ids, refs


def _step(executor, session, ids) -> torch.Tensor:
    """A request as the server serves it: the session is looked up (marked used), then stepped."""
    executor.sessions.get(session.handle, session.model.fingerprint)
    return greedy(executor.session_step(session, ids))


def _decode_round_robin(executor, sessions, prompts) -> list[torch.Tensor]:
    tokens = [[_step(executor, s, p)] for s, p in zip(sessions, prompts)]
    for _ in range(NEW_TOKENS - 1):
        for s, out in zip(sessions, tokens):
            out.append(_step(executor, s, out[-1]))
            assert executor.memory_in_use() <= executor.budget_bytes
    return [torch.cat([p, *out], dim=1) for p, out in zip(prompts, tokens)]


def test_sessions_over_the_budget_page_lru_and_decode_bit_identically(make_executor, tiny_model, prompts):
    session_kv = (PROMPT + NEW_TOKENS) * kv_per_token(tiny_model)
    executor, cached = make_executor(int(2.5 * session_kv))  # 4 sessions, room for 2.5
    sessions = [executor.sessions.open(cached, b"peer") for _ in range(4)]
    outputs = _decode_round_robin(executor, sessions, prompts[0])
    for out, ref in zip(outputs, prompts[1]):
        assert torch.equal(out, ref), "paged KV must come back bit for bit"
    paging = executor.sessions.paging
    assert paging.page_outs > 0 and paging.page_ins > 0
    assert all(s.paging.page_ins > 0 for s in sessions), "round robin over the budget pages every session"
    assert paging.page_out_ms > 0 and paging.page_in_ms > 0
    assert executor.sessions.host_bytes == sum(s.host_bytes for s in sessions) > 0


def test_least_recently_used_pages_first_and_only_what_is_needed(make_executor, tiny_model, prompts):
    per_token = kv_per_token(tiny_model)
    executor, cached = make_executor(3 * PROMPT * per_token)
    a, b, c = (executor.sessions.open(cached, b"peer") for _ in range(3))
    for s, p in zip((a, b, c), prompts[0]):
        _step(executor, s, p)
    executor.sessions.get(a.handle, cached.fingerprint)  # a is now the most recently used
    d = executor.sessions.open(cached, b"peer")
    _step(executor, d, prompts[0][3][:, :PROMPT // 4])  # needs a quarter of a session's KV
    assert b.host and not a.host and not c.host, "b was the least recently used"
    assert 0 < len(b.host) < 8, "pages move per layer: only as many layers as needed"
    assert b.host_bytes >= PROMPT // 4 * per_token


def test_partly_resident_session_restores_only_the_missing_layers(make_executor, tiny_model, prompts):
    per_layer = PROMPT * kv_per_token(tiny_model) // 8
    executor, cached = make_executor(1 << 30)
    s = executor.sessions.open(cached, b"peer")
    token = greedy(executor.session_step(s, prompts[0][0]))
    freed = executor.sessions.page_out(s, want_bytes=3 * per_layer)
    assert freed == 3 * per_layer and sorted(s.host) == [5, 6, 7], "deepest layers first"
    assert s.length == PROMPT and s.kv_bytes == 5 * per_layer
    executor.session_step(s, token)
    assert s.paging.bytes_in == 3 * per_layer and s.paging.page_ins == 3 and not s.host
    assert s.state is SessionState.IDLE and s.last_io_wait_ms > 0


def test_tracked_device_kv_matches_the_tensors_after_every_kind_of_change(make_executor, prompts):
    """Admission reads each session's tracked `kv_bytes`; a change that skipped it would skew the budget."""
    executor, cached = make_executor(1 << 30)
    store = executor.sessions
    a, b = store.open(cached, b"peer"), store.open(cached, b"peer")
    checked = []

    def check(after: str) -> None:
        for s in (a, b):
            assert s.kv_bytes == s.count_kv_bytes(), f"session {s.handle[:4]} after {after}"
        assert store.kv_bytes == sum(s.count_kv_bytes() for s in store.sessions.values()), after
        checked.append(after)

    token = greedy(executor.session_step(a, prompts[0][0]))
    check("prefill")
    token = greedy(executor.session_step(a, token))
    check("decode")
    store.page_out(a, want_bytes=1)
    check("a partial page-out")
    executor.session_step(a, token)
    check("a page-in")
    act = executor.run_to_layer(b, prompts[0][1], 3)
    check("a parked prefill")
    executor.offload(b)
    check("offloading a parked session")
    token_b = greedy(executor.resume(b, act))
    check("a resume")
    executor.run_to_layer(b, token_b, 2)
    store.page_out(b, want_bytes=1)
    executor.cancel(b)
    check("cancelling a parked, partly paged decode step")
    with pytest.raises(BadRequest):
        executor.resume(b, act)  # not parked any more
    check("a refused request")
    store.close(a.handle)
    assert a.kv_bytes == 0 and store.kv_bytes == b.count_kv_bytes() > 0
    assert len(checked) == 9


def test_swap_disabled_exceeding_the_budget_is_out_of_memory(make_executor, tiny_model, prompts):
    executor, cached = make_executor(int(1.5 * PROMPT * kv_per_token(tiny_model)), swap=False)
    first, second = (executor.sessions.open(cached, b"peer") for _ in range(2))
    executor.session_step(first, prompts[0][0])
    with pytest.raises(OutOfMemory, match="KV swap is disabled"):
        executor.session_step(second, prompts[0][1])
    assert second.length == 0 and not first.host
    with pytest.raises(BadRequest, match="swap is disabled"):
        executor.offload(first)


def test_host_limit_is_a_clear_error_not_a_crash(make_executor, tiny_model, prompts):
    session_kv = PROMPT * kv_per_token(tiny_model)
    executor, cached = make_executor(int(1.5 * session_kv), host_limit_bytes=session_kv // 4)
    first, second = (executor.sessions.open(cached, b"peer") for _ in range(2))
    token = greedy(executor.session_step(first, prompts[0][0]))
    with pytest.raises(OutOfMemory, match=r"host swap is full.*--host-swap-gb"):
        executor.session_step(second, prompts[0][1])
    assert 0 < executor.sessions.host_bytes <= session_kv // 4
    assert second.length == 0
    # first, partly paged, still decodes what an uninterrupted run decodes
    assert greedy(executor.session_step(first, token)).item() == prompts[1][0][0, PROMPT + 1].item()


def test_io_wait_ends_when_the_pages_are_on_the_device_not_after_the_bookkeeping(make_executor, prompts,
                                                                                 monkeypatch):
    executor, cached = make_executor(1 << 30)
    s = executor.sessions.open(cached, b"peer")
    act = executor.run_to_layer(s, prompts[0][0], 5).clone()
    executor.offload(s)
    store = executor.sessions
    wait_s, bookkeeping_s = 0.05, 0.2
    synchronize, time_paging = store._synchronize, store._time
    monkeypatch.setattr(store, "_synchronize", lambda: (time.sleep(wait_s), synchronize()))
    monkeypatch.setattr(store, "_time", lambda *args: (time.sleep(bookkeeping_s), time_paging(*args)))
    executor.resume(s, act)
    assert wait_s * 1e3 <= s.last_io_wait_ms < bookkeeping_s * 1e3


def test_parked_session_pages_out_and_resumes_bit_identically(make_executor, tiny_model, prompts):
    executor, cached = make_executor(1 << 30)
    ids, ref = prompts[0][0], prompts[1][0]
    s = executor.sessions.open(cached, b"peer")
    act = executor.run_to_layer(s, ids, 5).clone()
    moved = executor.offload(s)
    assert moved == 6 * PROMPT * kv_per_token(tiny_model) // 8, "layers 0..5 hold the parked step's KV"
    assert s.kv_bytes == 0 and s.state is SessionState.PARKED
    logits = executor.resume(s, act)
    assert s.paging.bytes_in == moved and s.last_io_wait_ms > 0
    assert greedy(logits).item() == ref[0, PROMPT].item()
    assert greedy(executor.session_step(s, greedy(logits))).item() == ref[0, PROMPT + 1].item()


def test_parked_session_expires_with_the_ttl_and_frees_its_kv(make_executor, prompts):
    executor, cached = make_executor(1 << 30)
    s = executor.sessions.open(cached, b"peer")
    executor.run_to_layer(s, prompts[0][0], 4)
    parked = s.breakpoint.forward
    executor.sessions.page_out(s, want_bytes=1)
    assert executor.sessions.expire(now=time.monotonic() + 601) == 1
    assert not parked.parked, "expiry cancels the parked forward"
    assert executor.sessions.kv_bytes == executor.sessions.host_bytes == 0 and cached.users == 0


# -- through a server ------------------------------------------------------------------------
def _server_budget_gb(kv_bytes: int) -> str:
    return f"{(models.parameter_bytes(models.TINY_MODEL, torch.float32) + kv_bytes) / (1 << 30):.9f}"


def test_server_pages_idle_sessions_reports_it_and_survives_a_full_host(start_server, tiny_model, prompts):
    session_kv = (PROMPT + 3) * kv_per_token(tiny_model)
    server = start_server("--vram-budget-gb", _server_budget_gb(int(1.5 * session_kv)),
                          "--host-swap-gb", f"{session_kv / (1 << 30):.9f}")
    ids, refs = prompts
    with djinn.connect(server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn")
        a, b, c = (remote.session() for _ in range(3))
        a.prefill(ids[0])
        b.prefill(ids[1])
        with pytest.raises(OutOfMemory, match="host swap is full"):
            c.prefill(ids[2])  # 3 sessions' KV > 1.5 on the device + 1 on the host
        for s, p, ref in ((a, ids[0], refs[0]), (b, ids[1], refs[1])):  # exchanges work with a full host
            assert torch.equal(torch.cat([p, s.generate(max_new_tokens=3)], dim=1), ref[:, :PROMPT + 3])
        assert a.stats()["page_ins"] > 0 and b.stats()["page_ins"] > 0 and "last_io_wait_ms" in a.stats()
        stats = client.stats()
        assert stats["paging"]["page_outs"] > 0 and stats["memory"]["kv_host_bytes"] > 0
        assert stats["memory"]["kv_bytes"] + stats["memory"]["weights_bytes"] <= stats["memory"]["budget_bytes"]
        for s in (a, b, c):
            s.close()
        assert client.stats()["memory"]["kv_host_bytes"] == 0, "closing a session frees its host pages"
