"""A pool of 3 CPU servers, as a static list and as Ray actors: 12 clients, every session's tokens
HF's; killing one server fails its sessions only, with an error naming it; the others go on.

The pools are the module's (a server takes ~30 s to come up on the loaded 2-core host): a test
that needs every server of one waits for them, and the static pool's tests run with one lost.
"""
from __future__ import annotations

import os
import signal
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import djinn
from djinn.errors import SessionLost, SessionNotFound
from djinn.pool import PlacementPolicy
from djinn.server.server import ServerConfig

from benchmarks.launcher import cpu_server
from benchmarks.threads import THREADS

SERVERS = 3
CLIENTS = 12
FIRST_TOKENS = 3  # decoded before the kill
LATER_TOKENS = 3  # after it
NEW_TOKENS = FIRST_TOKENS + LATER_TOKENS
RESTART_TIMEOUT_S = 120.0
SERVER_OPTIONS = ("--no-malloc-tuning",)


@dataclass
class Pool:
    target: object  # what djinn.connect takes
    kill: Callable[[str], None]  # kills the server at host:port
    ray_pool: object = None

    def wait_for_every_server(self) -> None:
        """A Ray pool may still be restarting a server another test killed; a static pool never restarts one."""
        if self.ray_pool is not None:
            assert len(self.ray_pool.wait_for(SERVERS, RESTART_TIMEOUT_S)) == SERVERS


@pytest.fixture(scope="module")
def static_pool(server_launcher):
    # Without the allocator re-exec (a second torch import each): on the loaded 2-core host a
    # server takes ~30 s to come up otherwise. One after another: a server gets SIGTERM when the
    # thread that started it ends (PR_SET_PDEATHSIG), so no pool of threads may start them.
    started = [server_launcher.start("pool", cpu_server(*SERVER_OPTIONS)) for _ in range(SERVERS)]
    servers = {s.host_port: s for s in started}
    return Pool(list(servers), lambda address: servers[address].process.kill())


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray pool needs ray (pip install 'djinn[ray]')")
    from djinn.pool.ray_pool import NAMESPACE, OBJECT_STORE_BYTES
    # A cluster of this test's own (address="local": never another helper's), small: 2 cores here.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, namespace=NAMESPACE,
             object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="djinn-ray-"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_pool(ray_cluster, pytestconfig, tmp_path_factory):
    from djinn.pool.ray_pool import RayPool
    name = f"test-{os.getpid()}"
    pool = RayPool.start(SERVERS, ServerConfig(port=0, malloc_tuning=False), name=name, env=pytestconfig.stash[THREADS].server_environment(),
                         log_dir=tmp_path_factory.mktemp("ray-pool"), detached=False)

    def kill(address: str) -> None:
        (described,) = [d for d in pool.describe() if d is not None and d["address"] == address]
        os.kill(described["server_pid"], signal.SIGKILL)

    yield Pool(f"ray:{name}", kill, pool)
    pool.shutdown()


@pytest.fixture(scope="module", params=["static", "ray"])
def pool(request):
    return request.getfixturevalue(f"{request.param}_pool")


def _in_threads(fn: Callable[[int], object]) -> list:
    """fn(i) for each client, at once, each on its own thread; an exception is returned, not raised."""
    def run(i):
        try:
            return fn(i)
        except Exception as exc:
            return exc
    with ThreadPoolExecutor(CLIENTS) as threads:
        return list(threads.map(run, range(CLIENTS)))


def test_pool_sessions_are_hf_and_a_lost_server_fails_only_its_own(pool, tiny_model, make_prompt, hf_greedy):
    prompts = [make_prompt(tiny_model, 4 + i % 5, seed=i) for i in range(CLIENTS)]
    expected = [hf_greedy(tiny_model, p, NEW_TOKENS)[0] for p in prompts]
    pool.wait_for_every_server()
    clients = [djinn.connect(pool.target) for _ in range(CLIENTS)]
    try:
        remotes = [c.load(tiny_model, mode="full_djinn") for c in clients]
        sessions = [r.session() for r in remotes]  # opened one after another: least-loaded spreads them evenly
        homes = [c.connection.session_address(s.handle) for c, s in zip(clients, sessions)]
        assert sorted(Counter(homes).values()) == [CLIENTS // SERVERS] * SERVERS
        stats = clients[0].stats()
        assert stats["sessions_open"] == CLIENTS and len(stats["servers"]) == SERVERS
        assert [m["servers"] for m in stats["models"]] == [[s["address"] for s in stats["servers"]]]

        def first(i):
            sessions[i].prefill(prompts[i])
            return sessions[i].generate(FIRST_TOKENS)
        started = _in_threads(first)
        for i, tokens in enumerate(started):
            assert not isinstance(tokens, Exception), tokens
            assert torch.equal(tokens, expected[i][:, prompts[i].shape[1]:][:, :FIRST_TOKENS])

        victim = homes[0]
        pool.kill(victim)
        later = _in_threads(lambda i: sessions[i].generate(LATER_TOKENS))
        for i, tokens in enumerate(later):
            if homes[i] == victim:
                assert isinstance(tokens, SessionLost), tokens
                assert victim in str(tokens) and sessions[i].handle[:16] in str(tokens)
            else:
                assert not isinstance(tokens, Exception), tokens
                assert torch.equal(torch.cat([prompts[i], started[i], tokens], dim=1), expected[i])
        lost = sessions[0]
        with pytest.raises(SessionLost, match="is gone"):  # every later request of a lost session says so, at once
            lost.generate(1)
        lost.close()  # closing a lost session forgets it (it is closed already): nothing to hide the error with
        with pytest.raises(SessionNotFound):
            lost.connection.session_address(lost.handle)

        out = remotes[0].generate(prompts[0], max_new_tokens=NEW_TOKENS)  # new work goes to the live servers
        assert torch.equal(out, expected[0])
        assert victim in [s["address"] for s in clients[0].stats()["lost"]]
        for session in sessions[1:]:
            session.close()
    finally:
        for client in clients:
            client.close()


def test_a_ray_pool_restarts_a_lost_server_and_clients_find_it(ray_pool, tiny_model, make_prompt, hf_greedy):
    prompt = make_prompt(tiny_model, 6)
    expected = hf_greedy(tiny_model, prompt, 4)[0]
    before = ray_pool.ray_pool.wait_for(SERVERS, RESTART_TIMEOUT_S)  # the other test's kill may still restart
    with djinn.connect(ray_pool.target) as client:
        remote = client.load(tiny_model)
        ray_pool.kill(before[0])
        after = ray_pool.ray_pool.wait_for(SERVERS, RESTART_TIMEOUT_S, exclude=(before[0],))
        assert len(after) == SERVERS and before[0] not in after and set(before[1:]) <= set(after)
        assert client.reconnect()  # a server of the pool is another process now: it joined at its new address
        live = [m.address for m in client.connection.members.values() if m.live]
        assert sorted(live) == sorted(after)
        assert torch.equal(remote.generate(prompt, max_new_tokens=4), expected)


def test_one_replica_per_model_keeps_each_model_on_one_server(static_pool, tiny_model, make_prompt, hf_greedy):
    prompt = make_prompt(tiny_model, 5)
    with djinn.connect(static_pool.target, placement=PlacementPolicy(replicas=1)) as client:
        remote = client.load(tiny_model)
        (holder,) = client.connection.model_addresses(remote.fingerprint)
        with remote.session() as session:
            assert client.connection.session_address(session.handle) == holder
        assert torch.equal(remote.generate(prompt, max_new_tokens=3), hf_greedy(tiny_model, prompt, 3)[0])
        assert [m["servers"] for m in client.stats()["models"]] == [[holder]]


@pytest.mark.parametrize("mode", ["partially_aware", "semantic_blind"])
def test_stateless_steps_go_round_the_servers(static_pool, tiny_model, make_prompt, hf_greedy, mode):
    prompt = make_prompt(tiny_model, 5)
    with djinn.connect(static_pool.target) as client:
        served_before = [s["requests_served"] for s in client.stats()["servers"]]
        out = client.load(tiny_model, mode=mode).generate(prompt, max_new_tokens=4)
        served = [s["requests_served"] - b for s, b in zip(client.stats()["servers"], served_before)]
        assert torch.equal(out, hf_greedy(tiny_model, prompt, 4)[0])
        assert sum(1 for n in served if n > 1) >= 2  # the steps (KV in each request) were spread over servers
