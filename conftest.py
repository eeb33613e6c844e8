"""Fixtures shared by tests/ and benchmarks/: the server launcher, models, tokens.

Every server a test or a benchmark starts comes from one factory, `server_launcher`
(benchmarks.launcher: one argv builder, the child's whole environment, threads pinned); a
failing test's report carries the log of every server it started.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import zmq

from djinn import models
from djinn.server.process import ServerProcess

from benchmarks.launcher import ServerLauncher, cpu_server
from benchmarks.threads import THREADS, pin_client, plan_threads, usable_cores

pytest_plugins = ["pytester"]  # tests/test_launcher.py runs a failing test to see its server's log
PROMPT_SEED = 1
TESTS = Path(__file__).parent / "tests"
SERVER_LOG_TAIL_CHARS = 20_000
_LAUNCHER = pytest.StashKey[ServerLauncher]()
_CURRENT_TEST = pytest.StashKey[str]()
# How long the probe after each test waits for a message through the process's shared ZeroMQ
# context: a loopback handshake takes well under a millisecond, seconds on the busiest CI host.
CONTEXT_PROBE_TIMEOUT_MS = 10_000


def pytest_configure(config):
    """Before any model is built: this process's intra-op threads, half the cores, the count every
    server it starts gets (benchmarks.threads)."""
    plan = plan_threads(usable_cores())
    pin_client(plan)
    config.stash[THREADS] = plan


def pytest_collection_modifyitems(config, items):
    """`correctness` is what CI gates on (.ci/run runs `-m correctness`): every test in tests/
    that needs no GPU. Marked here, by one rule, rather than test by test."""
    for item in items:
        if TESTS in item.path.parents and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.correctness)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.config.stash[_CURRENT_TEST] = item.nodeid
    try:
        return (yield)
    finally:
        item.config.stash[_CURRENT_TEST] = "(session)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        launcher = item.config.stash.get(_LAUNCHER, None)
        started = [s.process for s in launcher.started_by(item.nodeid)] if launcher else []
        used = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, ServerProcess)]
        for process in dict.fromkeys(started + used):
            report.sections.append((f"djinn server log ({process.log_path})", process.log()[-SERVER_LOG_TAIL_CHARS:]))
    return report


@pytest.fixture(scope="session")
def server_launcher(pytestconfig, tmp_path_factory) -> ServerLauncher:
    """The one factory of servers, for the session."""
    config = pytestconfig
    launcher = ServerLauncher(tmp_path_factory.mktemp("djinn-servers"), config.stash[THREADS],
                              current_test=lambda: config.stash.get(_CURRENT_TEST, "(session)"))
    config.stash[_LAUNCHER] = launcher
    yield launcher
    launcher.stop_all()


@pytest.fixture
def start_server(server_launcher):
    """Start a CPU server with extra CLI options: start_server("--session-ttl-s", "1")."""
    return lambda *args: server_launcher.start("test", cpu_server(*args))


@pytest.fixture(scope="session")
def tiny_model():
    return models.build(models.TINY_MODEL, seed=0)


@pytest.fixture(scope="session")
def hf_greedy():
    """HF greedy `generate` run locally, what every mode must reproduce: (sequences, logits per step)."""
    def run(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits, dim=1)
    return run


@pytest.fixture(scope="session")
def shared_server(server_launcher):
    """One CPU server for the tests that only need a healthy one."""
    return server_launcher.start("shared", cpu_server())


@pytest.fixture
def make_prompt():
    """Seeded random token ids for a model: make_prompt(model, tokens, batch=1)."""
    def make(model: torch.nn.Module, tokens: int, batch: int = 1, seed: int = PROMPT_SEED) -> torch.Tensor:
        vocab = model.get_input_embeddings().num_embeddings
        return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    return make


class _ContextProbe:
    """A ROUTER on a context of its own, which a DEALER of the process's shared context (every
    client's, `zmq.Context.instance()`) sends one message to."""

    def __init__(self):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"

    def delivers(self) -> bool:
        with zmq.Context.instance().socket(zmq.DEALER) as dealer:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.address)
            dealer.send(b"probe")
            if not self.router.poll(CONTEXT_PROBE_TIMEOUT_MS):
                return False
            self.router.recv_multipart()
            return True


@functools.cache
def _context_probe() -> _ContextProbe:
    return _ContextProbe()


@pytest.fixture(autouse=True)
def _shared_zmq_context_still_connects():
    """After each test, that the shared ZeroMQ context still makes connections. A test that stops its
    I/O thread (a connection monitor left to fill, for one) fails every later connection in this
    pytest worker, far from its cause: it is named here instead, at its own teardown."""
    yield
    if zmq.Context._instance is None:  # the shared context was never made: nothing to stop
        return
    if not _context_probe().delivers():
        pytest.fail(f"after this test the process's shared ZeroMQ context no longer connects (no message through "
                    f"it within {CONTEXT_PROBE_TIMEOUT_MS / 1e3:.0f} s): its I/O thread is stuck; every later "
                    f"connection in this process will time out")
