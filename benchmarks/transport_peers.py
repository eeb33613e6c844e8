"""The far ends of the transport benchmark, each in a child process of its own.

`djinn`: a minimal sink loop on `djinn.transport.ServerSocket` (not the Djinn
server: the benchmark measures the wire, not ops). `sink` answers with the byte
count it received, `ping` with nothing. `torch_rpc`: a torch.distributed.rpc
worker (TensorPipe backend, rank 1 of 2) that the benchmark process calls
`sink` and `noop` on.

    python -m benchmarks.transport_peers djinn tcp://127.0.0.1:0
    python -m benchmarks.transport_peers torch_rpc tcp://127.0.0.1:PORT

Each prints `READY <address>` on stdout once it can be reached. `PeerProcess` is
the parent's side: start, wait for that line, stop.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from djinn.server.process import wait_for_ready_line
from djinn.transport.tuning import tuned_environment

READY = "READY "
RPC_PEER_NAME = "transport-peer"
RPC_CALLER_NAME = "transport-bench"
RPC_TIMEOUT_S = 120.0  # a 1 GB tensor over a slow loopback stays well inside this
SINK_OPS = ("sink", "ping")


def sink(tensor) -> int:
    """torch RPC's one-way target: takes the tensor, returns a tiny value."""
    return tensor.numel()


def noop() -> None:
    """torch RPC's round-trip target."""


def rpc_options(init_method: str):
    from torch.distributed import rpc
    return rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=RPC_TIMEOUT_S)


def serve_djinn(address: str) -> None:
    from djinn.transport import ServerSocket

    server = ServerSocket(address, SINK_OPS)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(READY + server.address, flush=True)
    while not stopping:
        incoming = server.receive(timeout_ms=200)
        if incoming is None:
            continue
        if incoming.error is not None:
            server.reply_error(incoming.peer, incoming.request_id, incoming.error)
        elif incoming.message.op == "sink":
            server.reply(incoming.peer, incoming.request_id, {"nbytes": incoming.message.payload_bytes})
        else:
            server.reply(incoming.peer, incoming.request_id)
    server.close()


def serve_torch_rpc(init_method: str) -> None:
    from torch.distributed import rpc

    print(READY + init_method, flush=True)  # reachable once the caller joins: init_rpc waits for it
    rpc.init_rpc(RPC_PEER_NAME, rank=1, world_size=2, rpc_backend_options=rpc_options(init_method))
    rpc.shutdown()  # graceful: returns once the caller has shut down too


class PeerProcess:
    """A peer in a child process; a context manager that is entered once the peer is up."""

    def __init__(self, kind: str, address: str, *, ready_timeout_s: float = 120.0):
        self.kind, self.requested = kind, address
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.address: str | None = None

    def start(self) -> "PeerProcess":
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        if self.kind == "djinn":
            # The sink stands in for the Djinn server, which runs with these allocator settings.
            env = tuned_environment(env)
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.transport_peers", self.kind, self.requested],
                                        stdout=subprocess.PIPE, text=True, cwd=root, env=env)
        return self

    def wait_ready(self) -> "PeerProcess":
        self.address = wait_for_ready_line(self.process, READY, self.ready_timeout_s, f"{self.kind} peer")
        if self.address is not None:
            return self
        self.stop()
        raise RuntimeError(f"{self.kind} peer not ready within {self.ready_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.kind == "djinn":
            self.process.terminate()
        for last_resort in (self.process.terminate, self.process.kill):
            try:  # the rpc peer leaves by itself once the caller has shut rpc down
                self.process.wait(timeout_s)
                return
            except subprocess.TimeoutExpired:
                last_resort()
        self.process.wait()

    def __enter__(self) -> "PeerProcess":
        if self.process is None:
            self.start()
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["djinn", "torch_rpc"])
    parser.add_argument("address", help="ZeroMQ endpoint to bind (djinn) or the rpc init_method (torch_rpc)")
    args = parser.parse_args()
    (serve_djinn if args.kind == "djinn" else serve_torch_rpc)(args.address)


if __name__ == "__main__":
    main()
