"""The session store: KV paging under a memory budget, limits, counters, parked sessions, expiry.

In-process (executor + session store + weight cache, no sockets) so every case runs in
milliseconds; the last test goes through a live server for the CLI flags and the stats.
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn
from djinn import host_memory, models
from djinn.client import config_dict
from djinn.decoding import greedy
from djinn.errors import BadRequest, OutOfMemory
from djinn.server.device_budget import DeviceBudget
from djinn.server.executor import Executor
from djinn.server.fault_injection import ENV, InjectedOOM
from djinn.server.process import ServerProcess
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
        device_budget = DeviceBudget(CPU, budget)
        weights = WeightCache(device_budget)
        sessions = SessionStore(600.0, "test", device_budget, swap=swap, host_limit_bytes=host_limit_bytes)
        weights.register(fingerprint, config_dict(tiny_model), torch.float32,
                         [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in state.items()])
        cached = weights.receive(fingerprint, state)
        return Executor(device_budget, weights, sessions), cached
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
            assert executor.budget.in_use() <= executor.budget.limit_bytes
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


# -- allocation failures inside a step (issue 12): the budget's accounting and the device disagree ----------
@pytest.fixture
def inject_oom(make_executor):
    """inject_oom(executor, **spec) installs a `DJINN_TEST_INJECT_OOM`-style fault; removed after the test."""
    installed = []

    def install(executor, **spec) -> InjectedOOM:
        injected = InjectedOOM(**spec)
        injected.install(executor.budget)
        installed.append(injected)
        return injected
    yield install
    for injected in installed:
        injected.remove()


def _prefill_all(executor, sessions, prompts) -> list[list[torch.Tensor]]:
    return [[_step(executor, s, p)] for s, p in zip(sessions, prompts)]


@pytest.mark.correctness
def test_allocation_failure_mid_step_pages_out_and_retries_losing_nothing(make_executor, inject_oom, tiny_model,
                                                                         prompts):
    """A device smaller than its budget: every forward fails at layer 3 while more than the weights and
    1.5 sessions' KV are resident, so a step succeeds only once the retry has paged other sessions out."""
    session_kv = (PROMPT + NEW_TOKENS) * kv_per_token(tiny_model)
    executor, cached = make_executor(1 << 30)  # the accounting never asks for paging
    sessions = [executor.sessions.open(cached, b"peer") for _ in range(4)]
    tokens = _prefill_all(executor, sessions, prompts[0])
    injected = inject_oom(executor, layer=3, while_in_use_over=cached.weight_bytes + int(1.5 * session_kv))
    for _ in range(NEW_TOKENS - 1):
        for s, out in zip(sessions, tokens):
            out.append(_step(executor, s, out[-1]))
    for p, out, ref in zip(prompts[0], tokens, prompts[1]):
        assert torch.equal(torch.cat([p, *out], dim=1), ref), "a retried step must decode what HF decodes"
    assert 0 < executor.budget.counters.ooms_recovered <= injected.raised, "steps retried, each raised at least once"
    assert executor.sessions.paging.page_outs > 0 and executor.sessions.paging.page_ins > 0
    assert all(s.state is SessionState.IDLE for s in sessions)


@pytest.mark.correctness
def test_allocation_failure_with_nothing_to_free_is_a_clean_error_and_every_session_goes_on(
        make_executor, inject_oom, tiny_model, prompts):
    executor, cached = make_executor(1 << 30, swap=False)  # nothing can be paged out
    a, b = (executor.sessions.open(cached, b"peer") for _ in range(2))
    (ta,), (tb,) = _prefill_all(executor, (a, b), prompts[0])
    injected = inject_oom(executor, layer=2)
    with pytest.raises(OutOfMemory, match=r"ran out of device memory after 1 retry,.*in use of the"):
        _step(executor, a, ta)  # a decode
    fresh = executor.sessions.open(cached, b"peer")
    with pytest.raises(OutOfMemory):
        _step(executor, fresh, prompts[0][2])  # a prefill
    assert (a.length, b.length, fresh.length) == (PROMPT, PROMPT, 0), "every failed step is rolled back"
    assert executor.budget.counters.ooms_failed == 2
    injected.remove()
    outputs = [[ta], [tb], [_step(executor, fresh, prompts[0][2])]]
    for _ in range(NEW_TOKENS - 1):
        for s, out in zip((a, b, fresh), outputs):
            out.append(_step(executor, s, out[-1]))
    for p, out, ref in zip(prompts[0][:3], outputs, prompts[1][:3]):
        assert torch.equal(torch.cat([p, *out], dim=1), ref)


def test_resume_that_runs_out_of_memory_is_retried_bit_identically(make_executor, inject_oom, prompts):
    executor, cached = make_executor(1 << 30)
    ids = prompts[0][0]
    s = executor.sessions.open(cached, b"peer")
    act = executor.run_to_layer(s, ids, 2).clone()
    expected = executor.resume(s, act * 0.5)
    executor.sessions.rollback(s, 0)
    act_again = executor.run_to_layer(s, ids, 2)
    assert torch.equal(act_again, act)
    injected = inject_oom(executor, layer=5, times=1)  # after the breakpoint: the parked forward dies
    other = executor.sessions.open(cached, b"peer")
    _step(executor, other, prompts[0][1])  # something to page out, so the retry has memory to gain
    got = executor.resume(s, act * 0.5)
    assert injected.raised == 1 and torch.equal(got, expected)
    assert s.length == PROMPT and s.breakpoint is None and s.state is SessionState.IDLE


def test_many_sessions_under_a_tiny_budget_in_random_order_all_complete(make_executor, tiny_model, prompts):
    session_kv = (PROMPT + NEW_TOKENS) * kv_per_token(tiny_model)
    executor, cached = make_executor(int(1.3 * session_kv))
    ids = [prompts[0][i % 4] for i in range(8)]
    refs = [prompts[1][i % 4] for i in range(8)]
    sessions = [executor.sessions.open(cached, b"peer") for _ in ids]
    order = [i for i in range(8) for _ in range(NEW_TOKENS)]
    torch.manual_seed(7)
    order = [order[j] for j in torch.randperm(len(order)).tolist()]
    tokens: list[list[torch.Tensor]] = [[] for _ in ids]
    for i in order:
        tokens[i].append(_step(executor, sessions[i], tokens[i][-1] if tokens[i] else ids[i]))
        assert executor.budget.in_use() <= executor.budget.limit_bytes
    for p, out, ref in zip(ids, tokens, refs):
        assert torch.equal(torch.cat([p, *out], dim=1), ref)
    assert executor.sessions.paging.page_outs > 0 and executor.sessions.paging.page_ins > 0


def test_host_memory_running_out_stops_paging_with_a_clear_error(make_executor, tiny_model, prompts, monkeypatch):
    """The host's own limit (its cgroup's), not only --host-swap-gb: a page-out that would leave the host
    less than its floor is refused, and nothing is lost."""
    session_kv = PROMPT * kv_per_token(tiny_model)
    executor, cached = make_executor(int(1.5 * session_kv), host_limit_bytes=None)
    first, second = (executor.sessions.open(cached, b"peer") for _ in range(2))
    token = greedy(executor.session_step(first, prompts[0][0]))
    floor = executor.sessions.host_floor_bytes()
    monkeypatch.setattr(host_memory, "available_bytes", lambda: floor + session_kv // 4)
    with pytest.raises(OutOfMemory, match=r"host memory is full.*to the rest of the host"):
        executor.session_step(second, prompts[0][1])
    assert second.length == 0 and 0 < executor.sessions.host_bytes <= session_kv // 4
    monkeypatch.undo()
    assert greedy(executor.session_step(first, token)).item() == prompts[1][0][0, PROMPT + 1].item()
    assert greedy(executor.session_step(second, prompts[0][1])).item() == prompts[1][1][0, PROMPT].item()


def test_budget_asks_the_device_when_the_accounting_is_tight(monkeypatch):
    budget = DeviceBudget(CPU, 10 << 30)
    budget.hold("weights", lambda: 8 << 30)
    monkeypatch.setattr(budget, "device_room", lambda need=0: 1 << 30)  # the device has less than the books say
    assert budget.shortfall(100 << 20) == 0, "plenty of accounted room: the device is not asked"
    assert budget.counters.reconciles == 0
    assert budget.shortfall(1536 << 20) == 512 << 20, "tight: the device's real room decides"
    assert budget.counters.reconciles == 1 and budget.counters.reconciled_shortfall_bytes == 512 << 20
    assert budget.shortfall(3 << 30) == 2 << 30


def test_oom_injection_spec_parses_and_rejects_what_it_does_not_know():
    assert InjectedOOM.parse("layer=2,times=1") == InjectedOOM(layer=2, times=1)
    assert InjectedOOM.parse("layer=0,while_in_use_over=1000").while_in_use_over == 1000
    with pytest.raises(ValueError, match="layer"):
        InjectedOOM.parse("times=1")
    with pytest.raises(ValueError, match="expected"):
        InjectedOOM.parse("layer=1,every=2")


def test_server_retries_an_injected_allocation_failure_end_to_end(tmp_path, tiny_model, prompts):
    """The env hook as the server reads it: a failed forward is retried and the reply is right."""
    env = {ENV: "layer=1,times=1"}
    with ServerProcess("--device", "cpu", log_path=tmp_path / "server.log", env=env) as server, \
            djinn.connect(server.host_port) as client:
        remote = client.load(tiny_model, mode="full_djinn")
        out = remote.generate(prompts[0][0], max_new_tokens=NEW_TOKENS)
        memory = client.stats()["memory"]
    assert torch.equal(out, prompts[1][0])
    assert memory["ooms_recovered"] == 1 and memory["ooms_failed"] == 0
