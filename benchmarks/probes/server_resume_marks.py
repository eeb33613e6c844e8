"""Where a real server's resume IO wait goes, next to exp3's manual_offload (diagnostic).

This times the server process the exp3 benchmark talks to. The server is started with a `sitecustomize` that marks
entry (>) and exit (<) of each step of `Executor.resume` (ms from entering it, one JSON
line per resume); the client parks a 512-token prefill of a 4-layer llama-2-13b shape
after layer 1 (exp3's S512/L1 point: the same KV and activation bytes), offloads it and
resumes, while exp3's user-code restore (`manual_offload`) runs in this process.
`--idle-ms` sleeps before each restore, as exp3's `--exp3-idle-ms` does (the server's
wait is that and the resume request's round trip).

python -m benchmarks.probes.server_resume_marks OUT_DIR [--rounds 12] [--idle-ms 0]  → OUT_DIR/summary.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import djinn
from djinn import models
from djinn.server.process import ServerProcess
from djinn.transport import Codec

from benchmarks.exp3_restore import ManualOffload, park
from benchmarks.launcher import ServerSpec, server_argv, server_environment
from benchmarks.threads import plan_threads, usable_cores

MODEL, LAYERS, LAYER, SEQ_LEN, STEER = "llama-2-13b", 4, 1, 512, 0.9
WARMUP_ROUNDS = 2

SITECUSTOMIZE = '''
import json, os, time
from djinn.server import device_budget, executor, session_store

_marks = []
_path = os.environ["DJINN_RESUME_MARKS"]


def _mark(cls, name, last=False):
    inner = getattr(cls, name)

    def marked(*args, **kwargs):
        _marks.append((name + ">", time.perf_counter()))
        try:
            return inner(*args, **kwargs)
        finally:
            _marks.append((name + "<", time.perf_counter()))
            if last:
                entered, offsets = _marks[0][1], {}
                for label, t in _marks:
                    offsets.setdefault(label, (t - entered) * 1e3)
                offsets["_to_device<<"] = max(t - entered for label, t in _marks if label == "_to_device<") * 1e3
                with open(_path, "a") as out:
                    out.write(json.dumps(offsets) + "\\n")
                _marks.clear()
    setattr(cls, name, marked)


_mark(executor.Executor, "_upload")
for _name in ("admit", "page_in", "_to_device", "_synchronize"):
    _mark(session_store.SessionStore, _name)
_mark(device_budget.DeviceBudget, "shortfall")
_mark(executor.Executor, "resume", last=True)
_landing = executor.Executor.landing


def _landing_clears(self, spec):
    _marks.clear()  # a resume's marks start after its activation has landed
    return _landing(self, spec)


executor.Executor.landing = _landing_clears
'''


def manual_offload(model: torch.nn.Module, ids: torch.Tensor, idle_s: float) -> float:
    """exp3's manual_offload restore (benchmarks.exp3_restore), ms."""
    offloaded = ManualOffload.of(*park(model, ids, LAYER), STEER)
    torch.cuda.synchronize()
    time.sleep(idle_s)
    started = time.perf_counter()
    activation = offloaded.restore("cuda")
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - started) * 1e3
    offloaded.parked.resume(activation)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--idle-ms", type=float, default=0.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marks = args.out / "server_marks.jsonl"
    marks.unlink(missing_ok=True)
    local = models.build(MODEL, seed=0, device="cuda", num_layers=LAYERS)
    ids = torch.randint(0, local.config.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    env = {"DJINN_RESUME_MARKS": str(marks), "PYTHONPATH": f"{args.out}:{os.environ.get('PYTHONPATH', '')}"}
    manual, djinn_ms = [], []
    idle_s = args.idle_ms / 1e3
    # The server exp3 talks to (benchmarks.launcher): deterministic kernels, threads pinned.
    spec = ServerSpec("cuda")
    env = {**server_environment(spec, plan_threads(usable_cores())), **env}
    with ServerProcess(*server_argv(spec), log_path=args.out / "server.log", env=env, inherit_env=False) as server, \
            djinn.connect(server.host_port, timeout_s=600) as client:
        remote = client.load(models.to_host(local), mode="full_djinn", logits_codec=Codec.RAW)
        for _ in range(args.rounds):
            manual.append(manual_offload(local, ids.cuda(), idle_s))
            with remote.session() as s:
                steered = s.run_to_layer(ids, LAYER) * STEER
                s.offload()
                time.sleep(idle_s)
                s.resume(steered)
                djinn_ms.append(s.last_reply["io_wait_ms"])
    lines = [json.loads(line) for line in marks.read_text().splitlines()][WARMUP_ROUNDS:]
    summary = {"device": torch.cuda.get_device_name(0), "model": MODEL, "layers": LAYERS, "layer": LAYER,
               "seq_len": SEQ_LEN, "rounds": len(lines), "idle_ms": args.idle_ms,
               "manual_offload_ms": statistics.median(manual[WARMUP_ROUNDS:]),
               "djinn_io_wait_ms": statistics.median(djinn_ms[WARMUP_ROUNDS:]),
               "server_marks_ms": {k: statistics.median(line[k] for line in lines)
                                   for k in sorted(lines[0], key=lines[0].get)}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
