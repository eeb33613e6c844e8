"""Where a breakpoint resume's IO wait goes on the GPU, next to exp3's manual_offload.

The server's `Executor.resume` pages a parked session's KV back and uploads the
client's activation, which a CUDA server lands straight in pinned memory;
`manual_offload` copies the same bytes from pinned memory in user code. This probe
runs the real executor in-process on a model shape, times `io_wait_ms` beside the
manual copy, and splits the IO wait at timestamps: the first KV copy issued, the
last copy issued, and the end of the wait for them. `--idle-ms` sleeps before every
timed call, as a server waiting for its next request does.

python scripts/gpu_resume_probe.py [--model llama-2-13b] [--rounds 7] [--idle-ms 0]  → JSON lines on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from djinn import kv, models
from djinn.server.executor import Executor
from djinn.server.session_store import SessionStore
from djinn.server.weight_cache import CachedModel, WeightCache


class Timeline:
    """Timestamps inside one resume: when it was entered, each KV copy issued, the sync done."""

    def __init__(self, executor: Executor):
        self.marks: list[tuple[str, float]] = []
        store = executor.sessions
        self._mark_calls(executor, "resume", "entered")
        self._mark_calls(store, "_to_device", "copy", after=True)
        self._mark_calls(store, "_synchronize", "synchronized", after=True)

    def _mark_calls(self, owner, name: str, label: str, after: bool = False) -> None:
        inner = getattr(owner, name)

        def marked(*args, **kwargs):
            if not after:
                self.marks.append((label, time.perf_counter()))
            result = inner(*args, **kwargs)
            if after:
                self.marks.append((label, time.perf_counter()))
            return result
        setattr(owner, name, marked)

    def take(self) -> dict:
        """Milliseconds from entering resume to the first copy, between first and last, then to the sync."""
        marks, self.marks = self.marks, []
        entered = next(t for label, t in marks if label == "entered")
        copies = [t for label, t in marks if label == "copy"]
        synced = [t for label, t in marks if label == "synchronized"][-1]
        return {"to_first_copy": (copies[0] - entered) * 1e3, "issuing": (copies[-1] - copies[0]) * 1e3,
                "to_synchronized": (synced - copies[-1]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--layers", default="1,10,39")
    parser.add_argument("--idle-ms", type=float, default=0.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = models.build(args.model, seed=0, device="cuda")
    dtype = next(model.parameters()).dtype
    weight_bytes = sum(p.nbytes for p in model.parameters())
    budget = torch.cuda.get_device_properties(0).total_memory
    sessions = SessionStore(600.0, "probe", device, swap=True, host_limit_bytes=64 << 30)
    weights = WeightCache(device, budget, reserve_bytes=lambda: sessions.kv_bytes)
    cached = CachedModel("probe", model, model.config, dtype, {}, weight_bytes)
    weights.models["probe"] = cached
    executor = Executor(device, weights, sessions, budget)
    timeline = Timeline(executor)
    vocab = model.config.vocab_size
    idle = args.idle_ms / 1e3
    for seq_len in map(int, args.seq_lens.split(",")):
        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        for layer in map(int, args.layers.split(",")):
            manual, djinn, parts = [], [], []
            for _ in range(args.rounds + 1):
                session = sessions.open(cached, b"probe")
                activation = executor.run_to_layer(session, ids, layer) * 0.9
                # exp3's manual_offload: the same bytes back from pinned host memory.
                pinned_kv = [(k.cpu().pin_memory(), v.cpu().pin_memory()) for k, v in kv.to_pairs(session.cache)]
                landed = activation.cpu().pin_memory()  # what the server's landing receives into
                torch.cuda.synchronize()
                time.sleep(idle)
                started = time.perf_counter()
                moved = [(k.to(device, non_blocking=True), v.to(device, non_blocking=True)) for k, v in pinned_kv]
                act = landed.to(device, non_blocking=True)
                torch.cuda.synchronize()
                manual.append((time.perf_counter() - started) * 1e3)
                del moved, act
                executor.offload(session)
                timeline.marks.clear()
                time.sleep(idle)
                executor.resume(session, landed)
                djinn.append(session.last_io_wait_ms)
                parts.append(timeline.take())
                sessions.close(session.handle)
            manual, djinn, parts = manual[1:], djinn[1:], parts[1:]
            print(json.dumps({
                "seq_len": seq_len, "layer": layer, "idle_ms": args.idle_ms,
                "manual_ms": round(statistics.median(manual), 3), "djinn_ms": round(statistics.median(djinn), 3),
                "ratio": round(statistics.median(djinn) / statistics.median(manual), 3),
                "djinn_phases_ms": {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]},
                "device": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
