"""The multitenant experiment's machinery: its plan from the device, and a pool of tenant processes.

Every tenant is its own client process (`benchmarks.multitenant_worker`), started once for
the largest N and reused for every N: a round of N takes the first N of them, prepares
each, then releases them together, so the server sees N clients decoding at once.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.multitenant_worker import MARK

REPO = Path(__file__).resolve().parent.parent
# A tenant process importing torch and attaching takes seconds; 32 of them at once on a
# loaded host, a minute or two.
START_TIMEOUT_S = 300.0
# One command's reply: a generation of 64 tokens among 32 tenants, a 13B-shaped upload.
REPLY_TIMEOUT_S = 400.0


@dataclass(frozen=True)
class MultitenantPlan:
    """Sizes from the device: the issue's N on a GPU, fewer on a CPU so the run takes minutes."""
    tenants: tuple[int, ...]
    new_tokens: int
    rounds: int  # timed rounds per N, interleaved across N (round r runs every N before round r+1)
    prompt_tokens: int  # the longest prompt; tenant j's is shorter by (j % 4) * 4 tokens: ragged KV
    upload_model: str  # the shape the "upload does not stall decode" tenant uploads
    upload_layers: int | None
    upload_dtype: str

    @classmethod
    def for_device(cls, device: str) -> "MultitenantPlan":
        if device.startswith("cuda"):
            # 8 of the 13B shape's 40 layers: its tensors, ~5 GB, a ~10 s upload to decode beside.
            return cls((1, 2, 4, 8, 16, 32), 64, 3, 72, "llama-2-13b", 8, "float16")
        # The 2-core CPU: the server's one thread and four tenants share it.
        return cls((1, 2, 4), 24, 3, 72, "gpt2", None, "float32")

    def prompt(self, base: torch.Tensor, tenant: int) -> torch.Tensor:
        """Tenant `tenant`'s prompt: the experiment's prompt, rotated and shortened per tenant."""
        ids = torch.roll(base[:, :self.prompt_tokens], shifts=tenant, dims=1)
        return ids[:, :self.prompt_tokens - (tenant % 4) * 4]


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of one tenant in a timed round, as its client and the server timed it."""
    round: int
    tenant: int
    step: int  # its index in the generation: 1 is the first decode after the prefill
    wall_ms: float
    queue_ms: float
    compute_ms: float
    gc_ms: float  # the server's garbage-collection pauses since the step before


def decode_steps(round_index: int, replies: list[dict]) -> list[DecodeStep]:
    """Every decode step of a round's generate replies (their first step, the prefill, left out)."""
    return [DecodeStep(round_index, tenant, step, *times)
            for tenant, reply in enumerate(replies)
            for step, times in enumerate(zip(reply["wall_ms"], reply["queue_ms"], reply["compute_ms"],
                                             reply["gc_ms"])) if step]


def tail_steps(steps: list[DecodeStep], percentile: float) -> list[DecodeStep]:
    """The steps whose wall time is at or above the percentile's, slowest first: which steps make a
    tail (the first after a prefill? one turn's whole batch? one tenant?) and whether the server's
    queue, its compute, a garbage-collection pause of the server or none of them (the wire, the
    client) holds their time."""
    if not steps:
        return []
    bound = float(np.percentile([s.wall_ms for s in steps], percentile))
    return sorted((s for s in steps if s.wall_ms >= bound), key=lambda s: -s.wall_ms)


class Tenant:
    """One worker process and its line protocol."""

    def __init__(self, index: int, address: str, model: str, log_dir: Path):
        self.index = index
        self.log_path = log_dir / f"tenant-{index:02d}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}  # a tenant computes nothing: no CUDA context per process on the GPU
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.multitenant_worker", address, model],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        env=env, cwd=REPO, bufsize=1)

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout_s: float) -> dict:
        """The next protocol line; fails loudly (with the tenant's log) on an error, an exit or a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"tenant {self.index} sent nothing for {timeout_s:.0f} s: {self._tail()}")
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"tenant {self.index} exited ({self.process.poll()}): {self._tail()}")
            if line.startswith(MARK):
                reply = json.loads(line[len(MARK):])
                if "error" in reply:
                    raise RuntimeError(f"tenant {self.index}: {reply['error']}")
                return reply

    def _tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-2000:] or "(its log is empty)"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()


class Tenants:
    """The pool: `run(commands)` gives the first len(commands) tenants one command each, started together."""

    def __init__(self, count: int, address: str, model: str, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.tenants = [Tenant(i, address, model, log_dir) for i in range(count)]
        try:
            self.fingerprint = [t.reply(START_TIMEOUT_S)["hello"] for t in self.tenants][0]
        except BaseException:
            self.close()
            raise

    def run(self, commands: list[dict]) -> list[dict]:
        tenants = self.tenants[:len(commands)]
        for tenant, command in zip(tenants, commands):
            tenant.send(command)
        for tenant in tenants:
            tenant.reply(REPLY_TIMEOUT_S)  # ready
        for tenant in tenants:
            tenant.send({"cmd": "go"})
        return [tenant.reply(REPLY_TIMEOUT_S) for tenant in tenants]

    def close(self) -> None:
        for tenant in self.tenants:
            tenant.close()
