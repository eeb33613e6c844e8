"""Experiment `scale` (issue 21): a pool of Djinn servers, one GPU each, under the multitenant
workload (`benchmarks/scale_workload.py`: client processes decoding full_djinn sessions).

For each pool size (1, 2, 4 servers up to the GPUs: `--djinn-scale-servers`) the pool starts
(as Ray actors, one GPU each through Ray's CUDA_VISIBLE_DEVICES, or launched by the suite with
CUDA_VISIBLE_DEVICES per server: `--djinn-scale-pool`), `--djinn-scale-clients-per-server`
clients per server decode in rounds, and the pool stops before the next size starts. Every
server loads the model itself (`--model`), so clients attach without uploading. The verdict
(`benchmarks/goals/scale.py`): aggregate tokens/s on N servers >= 0.9 x N x one server's, every
client's tokens the same at every size, sessions spread evenly. It writes
`scale/<stamp>-scale.json` under --djinn-results with each server's device named.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pytest
import torch

from djinn import models
from djinn.reproducibility import child_environment
from djinn.server.server import ServerConfig

from benchmarks.goals.scale import ScalePoint, scale_criteria
from benchmarks.launcher import ServerSpec
from benchmarks.results import device_name
from benchmarks.gpu_workers import gpu_ids
from benchmarks.scale_workload import Workload, pool_sizes, run_workload
from benchmarks.threads import THREADS

pytestmark = pytest.mark.scale
LEDGER = "scale"
PROMPT_TOKENS = 32
WARMUP_ROUNDS = 1


def _gpus(config) -> int:
    device = config.getoption("--djinn-device")
    return torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0


def pytest_generate_tests(metafunc):
    if "pool_size" in metafunc.fixturenames:
        sizes = pool_sizes(metafunc.config.getoption("--djinn-scale-servers"), _gpus(metafunc.config))
        metafunc.parametrize("pool_size", sizes, ids=[f"N{n}" for n in sizes])


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass(frozen=True)
class ScaleSetup:
    gpus: int
    model: str
    pool: str  # ray | static
    clients_per_server: int
    new_tokens: int
    rounds: int
    client_threads: int
    server_env: tuple[tuple[str, str], ...]  # the thread pin every server gets

    @property
    def on_gpu(self) -> bool:
        return self.gpus > 0


@pytest.fixture(scope="module")
def scale(pytestconfig) -> ScaleSetup:
    gpus = _gpus(pytestconfig)
    model = pytestconfig.getoption("--djinn-scale-model")
    pool = pytestconfig.getoption("--djinn-scale-pool")
    if pool == "auto":
        pool = "ray" if _ray_installed() else "static"
    elif pool == "ray" and not _ray_installed():
        pytest.fail("--djinn-scale-pool ray needs ray: pip install 'djinn[ray]'")
    threads = pytestconfig.stash[THREADS]
    return ScaleSetup(
        gpus, models.default_model_name("cuda" if gpus else "cpu") if model == "auto" else model, pool,
        pytestconfig.getoption("--djinn-scale-clients-per-server"),
        pytestconfig.getoption("--djinn-scale-new-tokens") or (32 if gpus else 8),
        pytestconfig.getoption("--djinn-scale-rounds") or (5 if gpus else 3),
        threads.client_threads, tuple(threads.server_environment().items()))


@pytest.fixture(scope="module")
def ray_cluster(scale):
    """A Ray cluster of this run's own, with this host's GPUs: only when the pool is Ray's."""
    if scale.pool != "ray":
        yield None
        return
    import ray
    from djinn.pool.ray_pool import NAMESPACE, OBJECT_STORE_BYTES
    ray.init(address="local", num_gpus=scale.gpus, include_dashboard=False, namespace=NAMESPACE,
             log_to_driver=False, object_store_memory=OBJECT_STORE_BYTES,
             _temp_dir=tempfile.mkdtemp(prefix="djinn-ray-"))
    yield ray
    ray.shutdown()


def _gpu_names(ids: list[str]) -> list[str]:
    """What each server's GPU is, from NVML (no CUDA context in this process)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(int(i))) for i in ids]
    except Exception as exc:  # a GPU id that is a UUID, or no NVML: say so rather than guess
        return [f"unknown ({type(exc).__name__}: {exc})" for _ in ids]


@contextmanager
def _pool(size: int, scale: ScaleSetup, server_launcher, log_dir):
    """`size` servers, each on its own GPU (on a CPU host, all on the CPU); yields their addresses and
    how each was placed. They stop before the next size starts: the GPUs are the next pool's."""
    if scale.pool == "ray":
        from djinn.pool.ray_pool import RayPool
        config = ServerConfig(port=0, device="cuda" if scale.on_gpu else "cpu", model=(scale.model,),
                              deterministic=True)
        env = {**child_environment({}, deterministic=True), **dict(scale.server_env)}  # as the launcher's
        pool = RayPool.start(size, config, name=f"scale-{os.getpid()}-N{size}", env=env, log_dir=log_dir,
                             detached=False)
        try:
            described = pool.describe(timeout_s=60)
            for server in described:
                server["device_name"] = (_gpu_names([server["cuda_visible_devices"]])[0] if scale.on_gpu
                                         else device_name("cpu"))
            yield [d["address"] for d in described], described
        finally:
            pool.shutdown()
        return
    ids = gpu_ids(size) if scale.on_gpu else [None] * size
    names = _gpu_names(ids) if scale.on_gpu else [device_name("cpu")] * size
    servers = []
    try:
        for index, gpu in enumerate(ids):
            env = (("CUDA_VISIBLE_DEVICES", gpu),) if gpu is not None else ()
            spec = ServerSpec("cuda" if gpu is not None else "cpu", extra=("--model", scale.model), env=env)
            servers.append(server_launcher.start(f"scale-N{size}-{index}", spec))
        yield ([s.host_port for s in servers],
               [{"address": s.host_port, "server_pid": s.process.pid, "cuda_visible_devices": gpu,
                 "device_name": name, "log": str(s.log_path)} for s, gpu, name in zip(servers, ids, names)])
    finally:
        for server in servers:
            server.stop()


def test_scale_pool(pool_size, scale, ray_cluster, server_launcher, ledger, progress, tmp_path):
    clients = pool_size * scale.clients_per_server
    progress(f"{pool_size} {scale.pool} servers of {scale.model}, {clients} clients x {scale.rounds} rounds "
             f"of {scale.new_tokens} tokens")
    with _pool(pool_size, scale, server_launcher, tmp_path) as (addresses, described):
        run = run_workload(Workload(tuple(addresses), scale.model, clients, PROMPT_TOKENS, scale.new_tokens,
                                    scale.rounds, WARMUP_ROUNDS, scale.client_threads))
    point = ScalePoint(pool_size, clients, run.tokens_per_s(), run.p99_token_ms(),
                       run.sessions_per_server(addresses), tuple(c.token_digest for c in run.clients))
    progress(f"aggregate {[round(r, 1) for r in point.tokens_per_s]} tokens/s, p99 {point.p99_token_ms:.2f} ms/token, "
             f"sessions per server {list(point.sessions_per_server)}")
    ledger.record(LEDGER, pool_size, {"point": point, "servers": described})


def test_scale_criteria(scale, ledger, results_writer):
    held = ledger.results(LEDGER)
    points = [h["point"] for h in held.values()]
    verdict = scale_criteria(points, scale.on_gpu)
    data = {"experiment": "scale", "plan": asdict(scale), "points": [asdict(p) for p in points],
            "servers": {str(n): h["servers"] for n, h in held.items()}, "verdict": verdict.as_dict()}
    path = results_writer.write(f"scale/{results_writer.stamp}-scale.json", data)
    print(f"\n{verdict.summary()}\nwrote {path}")
    assert verdict.passed, "\n" + verdict.summary()
