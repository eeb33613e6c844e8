"""Djinn servers started and supervised as Ray actors: one per GPU, each its own `djinn-server`.

Ray places the servers and restarts them; it never carries a tensor. Each actor asks for one
GPU (`num_gpus=1` where the cluster has GPUs: Ray sets the actor's `CUDA_VISIBLE_DEVICES`, which
its server inherits, so every server sees its own device as `cuda:0`), starts `djinn-server`
as a child (`ServerProcess`: the CLI, its ready line and its log as anywhere else) and serves
its address; clients reach the server's ZeroMQ endpoint directly (`djinn.connect("ray:NAME")`).
This is NDIF's cut: Ray actors own the model replicas' placement and lifetime, the request's
data path is the service's own.

Supervision: an actor whose server exits exits too, and Ray restarts it (`max_restarts`), which
starts a fresh server, at a new address that the pool's directory then lists. The child dies
with its actor (`PR_SET_PDEATHSIG`), so no server outlives the actor Ray accounts for. The
actors are named `NAME-server-I` in namespace `djinn` and detached by default: they outlive
the driver that started them, and any process of the cluster finds the pool by its name.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import ray
except ImportError as exc:  # the optional extra
    raise ImportError("a Ray pool of Djinn servers needs ray: pip install 'djinn[ray]'") from exc

import djinn
from djinn.server.process import READY_TIMEOUT_S, ServerProcess
from djinn.server.server import ServerConfig

NAMESPACE = "djinn"
ACTOR_SUFFIX = "-server-"
ADDRESS_WAIT_S = 1.0  # how long the directory waits for a restarting server before listing the pool without it
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2  # how often `wait_for` asks again
WILDCARD_HOSTS = ("0.0.0.0", "::", "*")
# The pool never puts a tensor in Ray's object store (each server's ZeroMQ endpoint carries them):
# a cluster started for it needs no more than this, above Ray's floor of 75 MiB.
OBJECT_STORE_BYTES = 100 << 20


class ServerSupervisor:
    """The actor: one `djinn-server` child, its address, and its exit taken as the actor's."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: str, name: str):
        self._stopping = False
        log = Path(log_dir) / f"{name}-{os.getpid()}.log"  # a restarted actor's server logs beside the old one's
        self.server = ServerProcess(*argv, log_path=log, env=env).start()
        threading.Thread(target=self._exit_with_server, name="djinn-server-watch", daemon=True).start()

    def _exit_with_server(self) -> None:
        code = self.server.process.wait()
        if not self._stopping:
            print(f"djinn server {self.server.address} exited with {code}: its actor exits so that Ray restarts "
                  f"both", file=sys.stderr, flush=True)
            os._exit(1)

    def address(self) -> str:
        """host:port to reach the server at: the node's IP where it listens on every interface."""
        host, port = self.server.host_port.rsplit(":", 1)
        if host in WILDCARD_HOSTS:
            host = ray.util.get_node_ip_address()
        return f"{host}:{port}"

    def describe(self) -> dict:
        return {"address": self.address(), "server_pid": self.server.process.pid, "actor_pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "log": str(self.server.log_path)}

    def stop(self) -> int | None:
        self._stopping = True
        return self.server.stop()


def _gpus_per_server(servers: int, gpus_per_server: float | None) -> float:
    """One GPU each where the cluster has GPUs (refused when it has fewer than the servers), else none."""
    available = ray.cluster_resources().get("GPU", 0)
    if gpus_per_server is None:
        gpus_per_server = 1.0 if available >= 1 else 0.0
    if gpus_per_server and servers * gpus_per_server > available:
        raise ValueError(f"{servers} servers x {gpus_per_server:g} GPU need {servers * gpus_per_server:g} GPUs; "
                         f"the Ray cluster has {available:g}")
    return gpus_per_server


def _runtime_env() -> dict:
    """The actor imports this djinn, the driver's: a checkout run from its root (pytest's rootdir on
    sys.path) is on no Ray worker's path otherwise."""
    source = str(Path(djinn.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def ensure_ray() -> None:
    """Join the running Ray cluster (RAY_ADDRESS, else the local one) unless this process already has."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=False)


@dataclass
class RayPool:
    """A pool's server actors, in order; `addresses()` is what a client connects to."""
    name: str
    actors: list = field(default_factory=list)

    @classmethod
    def start(cls, servers: int, config: ServerConfig = ServerConfig(port=0), *, name: str = "djinn",
              gpus_per_server: float | None = None, env: dict[str, str] | None = None,
              log_dir: str | os.PathLike = "/tmp/djinn-pool", max_restarts: int = -1,
              detached: bool = True) -> "RayPool":
        """`servers` actors, each a `djinn-server` with `config`'s options (each on a free port);
        returns once every server is ready. `env` is added to each server's environment."""
        if servers < 1:
            raise ValueError(f"a pool needs at least one server, got {servers}")
        ensure_ray()
        gpus = _gpus_per_server(servers, gpus_per_server)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        actor_class = ray.remote(ServerSupervisor)
        argv = config.argv() if config.port == 0 else ["--port", "0", *config.argv()]  # each its own free port
        actors = []
        for index in range(servers):
            actor_name = f"{name}{ACTOR_SUFFIX}{index}"
            options = {"name": actor_name, "namespace": NAMESPACE, "num_gpus": gpus, "num_cpus": 0,
                       "max_restarts": max_restarts, "max_task_retries": -1, "runtime_env": _runtime_env(),
                       **({"lifetime": "detached"} if detached else {})}
            actors.append(actor_class.options(**options).remote(argv, dict(env or {}), os.fspath(log_dir),
                                                                actor_name))
        pool = cls(name, actors)
        pool.addresses(timeout_s=READY_TIMEOUT_S, wait_all=True)  # each server's ready line, or its failure
        return pool

    @classmethod
    def attach(cls, name: str) -> "RayPool":
        """The pool started under `name` in this Ray cluster."""
        ensure_ray()
        prefix = f"{name}{ACTOR_SUFFIX}"
        found = sorted((int(a["name"][len(prefix):]), a["name"]) for a in ray.util.list_named_actors(True)
                       if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
                       and a["name"][len(prefix):].isdigit())
        if not found:
            raise LookupError(f"no Ray pool of Djinn servers named {name!r} in namespace {NAMESPACE!r} "
                              f"(started with djinn.pool.ray_pool.RayPool.start(..., name={name!r})?)")
        return cls(name, [ray.get_actor(actor_name, namespace=NAMESPACE) for _, actor_name in found])

    def addresses(self, timeout_s: float = ADDRESS_WAIT_S, wait_all: bool = False) -> list[str]:
        """The address of each server that answers within `timeout_s` (a restarting one may not yet);
        `wait_all`: every server's, or an error naming those that did not come up."""
        described = self._describe(timeout_s, wait_all)
        return [d["address"] for d in described if d is not None]

    def describe(self, timeout_s: float = ADDRESS_WAIT_S) -> list[dict | None]:
        """Each server's address, pids, node, GPU ids and log; None for one that did not answer."""
        return self._describe(timeout_s, False)

    def _describe(self, timeout_s: float, wait_all: bool) -> list[dict | None]:
        refs = [actor.describe.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        described = []
        for index, ref in enumerate(refs):
            try:
                described.append(ray.get(ref) if ref in done else None)
            except ray.exceptions.RayError as exc:
                if wait_all:
                    raise RuntimeError(f"server {index} of the Ray pool {self.name!r} did not start: {exc}") from exc
                described.append(None)
        if wait_all and None in described:
            raise TimeoutError(f"servers {[i for i, d in enumerate(described) if d is None]} of the Ray pool "
                               f"{self.name!r} were not ready within {timeout_s:.0f} s")
        return described

    def wait_for(self, servers: int, timeout_s: float, exclude: tuple[str, ...] = ()) -> list[str]:
        """Addresses once `servers` of them answer, none of them in `exclude` (a restart's old address)."""
        deadline = time.monotonic() + timeout_s
        while True:
            addresses = [a for a in self.addresses() if a not in exclude]
            if len(addresses) >= servers or time.monotonic() > deadline:
                return addresses
            time.sleep(POLL_S)

    def shutdown(self) -> None:
        """Stop every server, then its actor (never restarted)."""
        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass  # an actor already gone has no server to stop
            ray.kill(actor, no_restart=True)
        self.actors = []


@dataclass(frozen=True)
class RayDirectory:
    """The live servers of the Ray pool `name` (`djinn.connect("ray:NAME")`)."""
    name: str

    def addresses(self) -> list[str]:
        return RayPool.attach(self.name).addresses()

    def describe(self) -> str:
        return f"the Ray pool {self.name!r}"
