"""A Djinn server in a child process, for tests, benchmarks and scripts.

Starts `python -m djinn.server`, waits for its ready line (no guessed sleeps),
keeps its log in a file, and stops it at exit: SIGTERM first, SIGKILL if it
does not go.
"""
from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from djinn.netns_exec import SCRIPT as NETNS_EXEC
from djinn.server.server import ServerConfig

READY_PREFIX = "djinn server listening on "
READY_TIMEOUT_S = 120.0  # building a 7B model on a cold GPU can take a while
STOP_TIMEOUT_S = 15.0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ServerStartError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed pytest leaves no
    server computing on its cores (the setting survives the server's own re-exec)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for_ready_line(process: subprocess.Popen, prefix: str, timeout_s: float, what: str) -> str | None:
    """What follows `prefix` on the child's first line that starts with it; None on timeout.

    Raises `ServerStartError` if the child exits first.
    """
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"{what} exited with {process.returncode} before it was ready")
            if selector.select(timeout=0.2):
                line = process.stdout.readline()
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
    return None


class ServerProcess:
    """`djinn-server` with `config`'s options (`ServerConfig.argv`) and then `args`; port 0 unless given.
    `netns`: run it inside that network namespace (an emulated link's server end, djinn.link)."""

    def __init__(self, *args: str, config: ServerConfig | None = None, log_path: Path,
                 ready_timeout_s: float = READY_TIMEOUT_S, env: dict | None = None, inherit_env: bool = True,
                 netns: str | None = None):
        args = [*(config.argv() if config is not None else []), *args]
        self.args = ["--port", "0", *args] if "--port" not in args else args
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        # inherit_env=False: `env` is the child's whole environment, so a launcher can keep
        # variables of this process (cuBLAS's workspace, thread counts) out of it.
        self.env = env
        self.inherit_env = inherit_env
        self.netns = netns
        self.process: subprocess.Popen | None = None
        self.address: str | None = None

    @property
    def host_port(self) -> str:
        return self.address.split("://", 1)[1]

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _environment(self) -> dict:
        return {**os.environ, **(self.env or {})} if self.inherit_env else dict(self.env or {})

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        command = [sys.executable, "-m", "djinn.server", *self.args]
        if self.netns is not None:
            command = [sys.executable, NETNS_EXEC, self.netns, "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=log, text=True, env=self._environment(),
                                        preexec_fn=_die_with_parent)
        log.close()
        try:
            self.address = wait_for_ready_line(self.process, READY_PREFIX, self.ready_timeout_s, "djinn server")
        except ServerStartError as exc:
            raise ServerStartError(f"{exc}:\n{self.log()}") from None
        if self.address is not None:
            return self
        self.stop()
        raise ServerStartError(f"djinn server not ready within {self.ready_timeout_s:.0f} s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
