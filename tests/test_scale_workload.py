"""The scale experiment's pieces: pool sizes, round rates, xdist workers pinned to GPUs, and the
multitenant workload itself driving a one-server pool on the CPU."""
from __future__ import annotations

import pytest

from benchmarks.gpu_workers import (WORKER_VARIABLE, XDIST_GPUS_VARIABLE, gpu_ids, pin_worker, worker_gpu,
                                    xdist_refusal)
from benchmarks.launcher import cpu_server
from benchmarks.scale_workload import Workload, pool_sizes, round_rates, run_workload


@pytest.mark.parametrize("requested, gpus, sizes", [
    ("auto", 0, (1, 2)), ("auto", 1, (1,)), ("auto", 2, (1, 2)), ("auto", 4, (1, 2, 4)), ("auto", 8, (1, 2, 4)),
    ("4,1,2", 4, (1, 2, 4)), ("3", 0, (3,)),
])
def test_pool_sizes(requested, gpus, sizes):
    assert pool_sizes(requested, gpus) == sizes


@pytest.mark.parametrize("requested, gpus, message", [
    ("1,4", 2, "this host has 2"), ("0,1", 2, "positive"), ("two", 2, "comma list")])
def test_bad_pool_sizes_say_why(requested, gpus, message):
    with pytest.raises(ValueError, match=message):
        pool_sizes(requested, gpus)


def test_a_round_is_every_clients_tokens_over_its_whole_span():
    # two clients, two rounds: round 0 spans 0..2 s, round 1 spans 10..14 s
    assert round_rates([[(0.0, 1.0), (10.0, 14.0)], [(0.5, 2.0), (10.0, 12.0)]], 8) == (8.0, 4.0)


def test_round_rates_need_a_client():
    with pytest.raises(ValueError, match="no client"):
        round_rates([], 8)


def test_gpu_ids_follow_the_visible_devices():
    assert gpu_ids(2, {}) == ["0", "1"]
    assert gpu_ids(2, {"CUDA_VISIBLE_DEVICES": "3, 5,7"}) == ["3", "5"]


@pytest.mark.parametrize("workers, gpus, refused", [(2, 0, "serially"), (4, 2, "has 2"), (2, 2, None), (1, 4, None)])
def test_xdist_needs_a_gpu_per_worker(workers, gpus, refused):
    refusal = xdist_refusal(workers, gpus)
    assert refusal is None if refused is None else refused in refusal


def test_each_xdist_worker_gets_its_own_gpu():
    assert [worker_gpu(f"gw{i}", "4,5,6") for i in range(3)] == ["4", "5", "6"]
    with pytest.raises(RuntimeError, match="no GPU"):
        worker_gpu("gw3", "4,5,6")


def test_pin_worker_sets_only_an_xdist_workers_devices():
    environ = {WORKER_VARIABLE: "gw1", XDIST_GPUS_VARIABLE: "2,3"}
    assert pin_worker(environ) == "3" and environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert pin_worker({WORKER_VARIABLE: "gw1"}) is None  # xdist over tests/, not over GPUs
    assert pin_worker({}) is None


@pytest.fixture(scope="module")
def server(server_launcher):
    """One server for the live tests (without the allocator re-exec: a second torch import)."""
    return server_launcher.start("scale", cpu_server("--model", "tiny-llama", "--no-malloc-tuning"))


def test_the_workload_decodes_every_clients_session_in_rounds(server):
    workload = Workload((server.host_port,), "tiny-llama", clients=2, prompt_tokens=5, new_tokens=3, rounds=2,
                        warmup_rounds=1, client_threads=1)
    run = run_workload(workload)
    assert [c.client for c in run.clients] == [0, 1]
    assert all(len(c.rounds) == 2 and len(c.step_ms) == 6 for c in run.clients)
    assert len(run.tokens_per_s()) == 2 and all(r > 0 for r in run.tokens_per_s())
    assert run.sessions_per_server([server.host_port]) == (2,)
    assert run.clients[0].token_digest != run.clients[1].token_digest  # each its own prompt


def test_a_failing_client_fails_the_workload_with_its_traceback(server):
    workload = Workload((server.host_port,), "no-such-model", clients=2, prompt_tokens=5, new_tokens=1, rounds=1,
                        warmup_rounds=0, client_threads=1)
    with pytest.raises(RuntimeError, match="scale clients failed(.|\n)*no-such-model"):
        run_workload(workload)
