"""Continuous batching through the live request loop: clients in threads, the server in-process.

Each client is teacher-forced (fed fixed tokens, every step's logits returned), so its
logits under batching are judged against the same session's solo run on the same server
(`djinn.equivalence`); a barrier before each step makes the clients' decodes wait together.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

import djinn
from djinn.equivalence import Equivalence, judge
from djinn.errors import BadRequest
from djinn.server import server as server_module
from djinn.server.scheduler import default_step_token_budget
from djinn.server.server import Server, ServerConfig
from djinn.transport import OutgoingTensor, TensorKind

CLIENTS = 3
NEW_TOKENS = 5
# Generous: the clients are threads of this process, sharing its GIL with the server.
BATCH_WAIT_MS = 100.0


@contextmanager
def _serving(model, step_token_budget: int):
    """A server in a thread of this process, with `model` uploaded; (server, address, fingerprint)."""
    server = Server(ServerConfig(port=0, batch_wait_ms=BATCH_WAIT_MS, step_token_budget=step_token_budget))
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    try:
        with djinn.connect(server.address, timeout_s=60) as client:
            fingerprint = client.upload(model)
        yield server, server.address, fingerprint
    finally:
        server.stop()
        loop.join(timeout=30)


@pytest.fixture
def served(tiny_model):
    with _serving(tiny_model, step_token_budget=16) as served:
        yield served


@pytest.fixture(scope="module")
def work():
    gen = torch.Generator().manual_seed(1919)
    prompts = [torch.randint(0, 8192, (1, n), generator=gen) for n in (7, 30, 18)]
    fed = [torch.randint(0, 8192, (1, NEW_TOKENS), generator=gen) for _ in prompts]
    return prompts, fed


class Tenant:
    """One client's session, stepped by hand: prefill, then decodes of the fed tokens; every step's logits."""

    def __init__(self, address: str, fingerprint: str):
        self.client = djinn.connect(address, timeout_s=60)
        self.fingerprint = fingerprint
        self.handle = self.request("open_session").args["session"]

    def request(self, op: str, ids: torch.Tensor | None = None, **args):
        tensors = {} if ids is None else {"input_ids": OutgoingTensor(ids, TensorKind.TOKEN_IDS)}
        return self.client.connection.request(op, {"model": self.fingerprint, **({"session": self.handle}
                                                   if hasattr(self, "handle") else {}), **args}, tensors)

    def step(self, op: str, ids: torch.Tensor) -> torch.Tensor:
        reply = self.request(op, ids, returns=["token", "logits"], logits_codec="raw")
        self.last_server = reply.args["server"]
        return reply.tensors["logits"]

    def run(self, prompt: torch.Tensor, fed: torch.Tensor, before_step=lambda i: None) -> torch.Tensor:
        logits = [self.step("prefill", prompt)]
        self.batches = []
        for i in range(fed.shape[1]):
            before_step(i)
            logits.append(self.step("decode", fed[:, i:i + 1]))
            self.batches.append(self.last_server["batch"])
        return torch.stack(logits, dim=1)

    def close(self):
        self.request("close_session")
        self.client.close()


def _together(targets) -> list:
    """Run each callable in its own thread; their results (a thread's exception is raised here)."""
    results, errors = [None] * len(targets), []

    def run(i, target):
        try:
            results[i] = target()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _solo(address, fingerprint, prompts, fed) -> list[torch.Tensor]:
    out = []
    for prompt, tokens in zip(prompts, fed):
        tenant = Tenant(address, fingerprint)
        out.append(tenant.run(prompt, tokens))
        assert tenant.batches == [1] * NEW_TOKENS, "alone, every step runs by itself"
        tenant.close()
    return out


def _assert_equivalent(reference, candidate, what):
    verdict = judge(reference, candidate)
    assert verdict.verdict is not Equivalence.SILENTLY_WRONG and verdict.top1_agreement == 1.0, f"{what}: {verdict}"


def test_concurrent_sessions_decode_in_batches_and_each_matches_its_solo_run(served, work):
    server, address, fingerprint = served
    prompts, fed = work
    solo = _solo(address, fingerprint, prompts, fed)
    tenants = [Tenant(address, fingerprint) for _ in prompts]
    barrier = threading.Barrier(len(tenants))
    got = _together([lambda t=t, p=p, f=f: t.run(p, f, lambda i: barrier.wait(30))
                     for t, p, f in zip(tenants, prompts, fed)])
    for i, (ref, logits) in enumerate(zip(solo, got)):
        assert torch.equal(ref[:, 0], logits[:, 0]), "prefills run alone: bit for bit"
        _assert_equivalent(ref, logits, f"tenant {i}")
    assert max(max(t.batches) for t in tenants) > 1, "the decodes ran batched"
    stats = tenants[0].client.stats()
    assert stats["scheduler"]["batches"] > 0 and stats["scheduler"]["largest_batch"] > 1
    assert stats["latency"]["batched_steps"] > 0 and stats["latency"]["compute_ms"] > 0
    latency = tenants[0].client.connection.request("session_stats", {"model": fingerprint,
                                                                     "session": tenants[0].handle}).args["latency"]
    assert latency["steps"] == NEW_TOKENS + 1 and latency["queue_ms"] >= 0 and latency["compute_ms"] > 0
    for t in tenants:
        t.close()


def test_a_bad_request_in_one_session_fails_only_that_session(served, work):
    server, address, fingerprint = served
    prompts, fed = work
    solo = _solo(address, fingerprint, prompts, fed)
    tenants = [Tenant(address, fingerprint) for _ in prompts]
    barrier = threading.Barrier(len(tenants))
    errors = []

    def spoiler(i):  # tenant 0 sends an out-of-vocabulary token into the batch at step 2, then goes on
        barrier.wait(30)
        if i == 2:
            with pytest.raises(BadRequest, match="outside the vocabulary") as caught:
                tenants[0].step("decode", torch.tensor([[10 ** 6]]))
            errors.append(caught.value)

    got = _together([lambda: tenants[0].run(prompts[0], fed[0], spoiler),
                     *[lambda t=t, p=p, f=f: t.run(p, f, lambda i: barrier.wait(30))
                       for t, p, f in zip(tenants[1:], prompts[1:], fed[1:])]])
    assert errors, "the bad token was refused"
    for i, (ref, logits) in enumerate(zip(solo, got)):
        _assert_equivalent(ref, logits, f"tenant {i}")  # tenant 0 too: its failed step changed nothing
    for t in tenants:
        t.close()


def test_a_parked_session_stays_out_of_the_batch(served, work):
    server, address, fingerprint = served
    prompts, fed = work
    solo = _solo(address, fingerprint, prompts[1:], fed[1:])
    parked = Tenant(address, fingerprint)
    parked.step("prefill", prompts[0])
    parked.request("run_to_layer", fed[0][:, :1], layer=1)
    tenants = [Tenant(address, fingerprint) for _ in prompts[1:]]
    barrier = threading.Barrier(len(tenants) + 1)
    refused = []

    def knock():  # the parked session's decode arrives with the others' at every step
        for _ in range(NEW_TOKENS):
            barrier.wait(30)
            with pytest.raises(BadRequest, match="parked"):
                parked.step("decode", fed[0][:, :1])
            refused.append(True)

    got = _together([knock, *[lambda t=t, p=p, f=f: t.run(p, f, lambda i: barrier.wait(30))
                              for t, p, f in zip(tenants, prompts[1:], fed[1:])]])
    assert len(refused) == NEW_TOKENS
    for i, (ref, logits) in enumerate(zip(solo, got[1:])):
        _assert_equivalent(ref, logits, f"tenant {i}")
    assert server.sessions.sessions[parked.handle].breakpoint is not None, "still parked, untouched"
    for t in [*tenants, parked]:
        t.close()


def test_a_long_prefill_is_chunked_while_another_session_decodes(served, work):
    server, address, fingerprint = served
    prompts, fed = work
    long_prompt = torch.randint(0, 8192, (1, 70), generator=torch.Generator().manual_seed(5))
    solo = _solo(address, fingerprint, [long_prompt], fed[:1])[0]
    decoder = Tenant(address, fingerprint)
    decoder.step("prefill", prompts[1])
    started, done = threading.Event(), threading.Event()

    def keep_decoding():
        steps = 0
        while not done.is_set() or steps < 3:
            decoder.step("decode", fed[1][:, :1] if steps == 0 else torch.tensor([[steps % 8192]]))
            steps += 1
            started.set()
        return steps

    def prefill_long():
        started.wait(30)
        try:
            return Tenant(address, fingerprint).run(long_prompt, fed[0])
        finally:
            done.set()
    steps, got = _together([keep_decoding, prefill_long])
    counters = server.scheduler.counters
    assert counters.chunked_prefills >= 1 and counters.prefill_chunks >= 70 // 16
    _assert_equivalent(solo, got, "the chunked prefill's session")
    assert steps >= 3
    decoder.close()


def test_prompts_that_arrive_together_are_prefilled_as_one_forward(tiny_model, work, monkeypatch):
    prompts, fed = work
    with _serving(tiny_model, step_token_budget=128) as (server, address, fingerprint):
        solo = _solo(address, fingerprint, prompts, fed)
        blocker, tenants = Tenant(address, fingerprint), [Tenant(address, fingerprint) for _ in prompts]
        blocker.step("prefill", prompts[0])
        # The loop sleeps inside the blocker's step while the prompts arrive; steps after it do not.
        monkeypatch.setattr(server_module, "TEST_STEP_SLEEP_S", 0.6)
        hold = threading.Thread(target=blocker.step, args=("decode", fed[0][:, :1]))
        hold.start()
        time.sleep(0.1)
        threading.Timer(0.2, monkeypatch.setattr, (server_module, "TEST_STEP_SLEEP_S", 0.0)).start()
        got = _together([lambda t=t, p=p, f=f: t.run(p, f) for t, p, f in zip(tenants, prompts, fed)])
        hold.join(30)
        counters = server.scheduler.counters
        assert counters.prefill_batches == 1 and counters.batched_prefills == len(prompts), counters
        for i, (ref, logits) in enumerate(zip(solo, got)):
            _assert_equivalent(ref, logits, f"tenant {i}: its prompt batched with the others', padded")
            assert server.sessions.sessions[tenants[i].handle].length == prompts[i].shape[1] + NEW_TOKENS
        for t in [blocker, *tenants]:
            t.close()


def test_a_traced_prefill_is_never_chunked_nor_batched(served, work):
    # Its hooks act on the whole forward: a chunk would run without them (the saves silently missing).
    server, address, fingerprint = served
    prompts, fed = work
    decoder, traced = Tenant(address, fingerprint), Tenant(address, fingerprint)
    decoder.step("prefill", prompts[0])
    decoder.step("decode", fed[0][:, :1])  # somebody is decoding: a plain 30-token prompt would be chunked
    reply = traced.request("prefill", prompts[1], returns=["token"],
                           interventions=[{"op": "save", "site": "layer", "layer": 0}])
    assert any(name.startswith("saved.") for name in reply.tensors), "the save came back"
    assert server.scheduler.counters.chunked_prefills == 0
    for t in (decoder, traced):
        t.close()


def test_the_batching_limits_are_server_options():
    config = ServerConfig.from_args(ServerConfig.parser().parse_args(
        ["--max-batch", "4", "--step-token-budget", "64", "--batch-wait-ms", "0.5"]))
    assert (config.max_batch, config.step_token_budget, config.batch_wait_ms) == (4, 64, 0.5)
    assert config.argv()[-6:] == ["--max-batch", "4", "--step-token-budget", "64", "--batch-wait-ms", "0.5"]
    with pytest.raises(ValueError, match="batching needs"):
        Server(ServerConfig(port=0, max_batch=0))


def test_an_unset_step_token_budget_is_the_devices_default():
    """A GPU's default admits 16 tenants' 72-token prompts in one forward; a CPU's stays small."""
    assert ServerConfig().step_token_budget is None and "--step-token-budget" not in ServerConfig().argv()
    assert default_step_token_budget("cuda") >= 16 * 72 > default_step_token_budget("cpu")
    server = Server(ServerConfig(port=0, device="cpu"))
    try:
        assert server.scheduler.policy.step_token_budget == default_step_token_budget("cpu")
    finally:
        server.close()
