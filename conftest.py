"""Fixtures shared by tests/ and benchmarks/: servers in child processes, models, tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from djinn import models
from djinn.server.process import ServerProcess

PROMPT_SEED = 1
TESTS = Path(__file__).parent / "tests"


def pytest_collection_modifyitems(config, items):
    """`correctness` is what CI gates on (.ci/run runs `-m correctness`): every test in tests/
    that needs no GPU. Marked here, by one rule, rather than test by test."""
    for item in items:
        if TESTS in item.path.parents and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.correctness)


@pytest.fixture
def start_server(tmp_path_factory, request):
    """Start a server with extra CLI options; its log is printed when the test fails."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        started.append(ServerProcess(*args, log_path=log).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(f"--- djinn server log ({server.log_path}) ---\n{server.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


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
def shared_server(tmp_path_factory):
    """One CPU server for the tests that only need a healthy one."""
    with ServerProcess("--device", "cpu", log_path=tmp_path_factory.mktemp("shared") / "server.log") as server:
        yield server


@pytest.fixture
def make_prompt():
    """Seeded random token ids for a model: make_prompt(model, tokens, batch=1)."""
    def make(model: torch.nn.Module, tokens: int, batch: int = 1, seed: int = PROMPT_SEED) -> torch.Tensor:
        vocab = model.get_input_embeddings().num_embeddings
        return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    return make
