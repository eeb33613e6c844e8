"""The one way the suite starts servers: argv from one function, the child's whole environment
built here, every server's log kept for the test that started it.

`server_argv` is the single place a server's command line is written; when `ServerConfig`
builds the CLI it becomes a `ServerConfig(...)` and its argv. The child's environment is this
process's with the kernel configuration of the server (`djinn.reproducibility.child_environment`)
and its thread pin (`benchmarks.threads`), so nothing set for the pytest process's own side of a
comparison leaks into a server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from djinn.link.emulated import EmulatedLink
from djinn.reproducibility import CUBLAS_VARIABLE, child_environment
from djinn.server.process import ServerProcess

from benchmarks.threads import ThreadPlan


@dataclass(frozen=True)
class ServerSpec:
    """What a benchmark asks of a server; every field is one CLI option."""
    device: str
    # Every benchmark server decodes on deterministic kernels, the same as the pytest side.
    deterministic: bool = True
    # And with HF's exact forward (on CUDA the default is the fast path), but the fast path's baseline.
    exact: bool = True
    vram_budget_gb: float | None = None
    ring_buffer_gb: float | None = None
    stream_kv_tokens: int | None = None
    disable_kv_swap: bool = False
    log_level: str = "INFO"
    extra: tuple[str, ...] = ()  # options a test adds (tests of the CLI itself)
    env: tuple[tuple[str, str], ...] = ()  # variables of this server only (a pool's CUDA_VISIBLE_DEVICES)


def cpu_server(*args: str) -> ServerSpec:
    """A test's CPU server: the CLI's defaults (no --deterministic unless asked) plus `args`."""
    return ServerSpec("cpu", deterministic="--deterministic" in args, exact="--exact" in args,
                      extra=tuple(a for a in args if a not in ("--deterministic", "--exact")))


def server_argv(spec: ServerSpec) -> list[str]:
    argv = ["--device", spec.device, "--log-level", spec.log_level]
    if spec.deterministic:
        argv.append("--deterministic")
    if spec.exact:
        argv.append("--exact")
    if spec.vram_budget_gb is not None:
        argv += ["--vram-budget-gb", repr(spec.vram_budget_gb)]
    if spec.ring_buffer_gb is not None:
        argv += ["--ring-buffer-gb", repr(spec.ring_buffer_gb)]
    if spec.stream_kv_tokens is not None:
        argv += ["--stream-kv-tokens", str(spec.stream_kv_tokens)]
    if spec.disable_kv_swap:
        argv.append("--disable-kv-swap")
    return [*argv, *spec.extra]


def server_environment(spec: ServerSpec, threads: ThreadPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    env = child_environment(os.environ if base is None else base, spec.deterministic)
    return {**env, **threads.server_environment(), **dict(spec.env)}


@dataclass
class StartedServer:
    name: str
    spec: ServerSpec
    process: ServerProcess
    started_by: str  # the test (node id) whose fixture or body started it
    link: dict | None = None  # the emulated link it serves behind (EmulatedLink.describe), None on loopback


@dataclass
class ServerLauncher:
    """Starts servers for the whole session and remembers which test started each."""
    log_dir: Path
    threads: ThreadPlan
    current_test: Callable[[], str] = lambda: "(session)"  # the node id of the test running now
    servers: list[StartedServer] = field(default_factory=list)

    def start(self, name: str, spec: ServerSpec, link: EmulatedLink | None = None) -> ServerProcess:
        """A server of `spec`; with `link`, inside the link's server namespace, listening on its address."""
        log = self.log_dir / f"{len(self.servers):02d}-{name}.log"
        on_link = ["--host", link.server_address] if link is not None else []
        process = ServerProcess(*server_argv(spec), *on_link, log_path=log, env=server_environment(spec, self.threads),
                                inherit_env=False, netns=link.server_netns if link is not None else None)
        self.servers.append(StartedServer(name, spec, process, self.current_test(),
                                          link.describe() if link is not None else None))
        return process.start()

    def started_by(self, nodeid: str) -> list[StartedServer]:
        return [s for s in self.servers if s.started_by == nodeid]

    def describe(self) -> list[dict]:
        return [{"name": s.name, "argv": server_argv(s.spec), "threads": self.threads.server_threads,
                 "kernels": {"deterministic": s.spec.deterministic,
                             CUBLAS_VARIABLE: s.process.env.get(CUBLAS_VARIABLE)},
                 "link": s.link, "log": str(s.process.log_path)} for s in self.servers]

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.process.stop()
