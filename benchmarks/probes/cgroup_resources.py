"""Issue 13's resource probes under a memory cgroup: a CPU server confined to LIMIT GiB
(cgroup v1 `memory` or v2, created here; needs root), then each finding that had ended in
an OOM kill, sent by a client outside the cgroup. Every case must be refused with a clear
error and the server must stay alive with 0 OOM kills in its cgroup.

    python benchmarks/probes/cgroup_resources.py [--limit-gb 3]

Prints one line per case (the reply's code and message) and a verdict; exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import torch
import zmq
from transformers import AutoConfig

import djinn
from djinn import models
from djinn.client import config_dict
from djinn.errors import DjinnError

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists() else Path("/sys/fs/cgroup")


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A fresh memory cgroup of `limit` bytes: (its directory, the file whose oom_kill counts)."""
    name = f"djinn-probe-{os.getpid()}"
    if (V1 / "memory.limit_in_bytes").exists():
        group = V1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group, "memory.oom_control"
    group = V2 / name
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    return group, "memory.events"


def oom_kills(group: Path, events: str) -> int:
    for line in (group / events).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def raw_request(address: str, head: dict, frames: list[bytes]) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send_multipart([msgpack.packb(head), *frames])
    if not sock.poll(60_000):
        return {"code": "no reply within 60 s"}
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    sock.close()
    return reply["args"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gb", type=float, default=3.0)
    args = parser.parse_args()
    group, events = make_cgroup(int(args.limit_gb * 2**30))
    log = Path(tempfile.mkdtemp()) / "server.log"
    # The server joins the cgroup before exec: everything it allocates counts there.
    server = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -m djinn.server --device cpu --port 0 '
                     f'--log-level WARNING', sys.executable], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    ready = server.stdout.readline()
    address = ready.rsplit(" ", 1)[-1].strip()
    print(f"server in {group} ({args.limit_gb} GiB): {ready.strip()}")
    results = {}
    model = models.build(models.TINY_MODEL, seed=0)
    with djinn.connect(address.removeprefix("tcp://"), timeout_s=120) as client:
        conn = client.connection

        def case(name, fn):
            try:
                fn()
                results[name] = ("accepted", "")
            except DjinnError as exc:
                results[name] = (exc.code, str(exc)[:160])
            print(f"{name}: {results[name][0]}: {results[name][1]}", flush=True)

        config = config_dict(model)
        case("register tensors=[] with a large config", lambda: conn.request(
            "register_model", {"model": "1" * 32, "config": {**config, "vocab_size": 4_000_000, "hidden_size": 8192},
                               "dtype": "float32", "tensors": []}))
        # Declaring every tensor its config implies (as the client does), so that only the host-memory
        # check can refuse it: with `tensors: []` it was refused for the declaration instead.
        huge = {**config, "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                "num_hidden_layers": 16, "num_attention_heads": 64, "num_key_value_heads": 8}
        skeleton = models.build_skeleton(AutoConfig.for_model(**huge), torch.float32, "meta")
        declared = [[name, "float32", list(t.shape)] for name, t in skeleton.state_dict().items()]
        huge_gib = sum(t.numel() for t in skeleton.state_dict().values()) * 4 / 2**30  # more than the host holds
        case(f"register a {huge_gib:.1f} GiB model (streamed from host memory)", lambda: conn.request(
            "register_model", {"model": "2" * 32, "config": huge, "dtype": "float32", "tensors": declared}))
        import zstandard
        bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
        reply = raw_request(address, {"v": 1, "op": "forward", "id": 1, "args": {}, "auth": None, "tensors": [
            [f"t{i}", "int64", [1, (2 << 30) // 8], "zstd", len(bomb), "token_ids"] for i in range(3)]},
            [bomb, bomb, bomb])
        results["zstd bomb: 3 x 2 GiB declared"] = (reply.get("code", "accepted"), reply.get("message", "")[:160])
        print(f"zstd bomb: {results['zstd bomb: 3 x 2 GiB declared']}", flush=True)

        def many_sessions():
            remote = client.load(model, mode="full_djinn")
            for _ in range(50_001):
                conn.request("open_session", {"model": remote.fingerprint})
        case("50,001 sessions from one client", many_sessions)

        def many_models():
            for seed in range(1, 81):
                client.load(models.build(models.TINY_MODEL, seed=seed), mode="full_djinn")
        case("80 distinct models", many_models)
        stats = client.stats()
        print(f"evictions: {stats['cache']['evictions']}; budget: {stats['memory']}")
    alive = server.poll() is None
    kills = oom_kills(group, events)
    refused = {name: code for name, (code, _) in results.items() if code == "accepted"}
    server.terminate()
    server.wait(30)
    group.rmdir()
    ok = alive and kills == 0 and all(code != "accepted" or name == "80 distinct models"
                                      for name, (code, _) in results.items())
    print(f"server alive: {alive}; OOM kills in its cgroup: {kills}; accepted: {sorted(refused)}; "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
