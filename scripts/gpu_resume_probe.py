"""Where a breakpoint resume's IO wait goes on the GPU, next to exp3's manual_offload.

The server's `Executor.resume` pages a parked session's KV back and uploads the
client's activation, which a CUDA server lands straight in pinned memory;
`manual_offload` copies the same bytes from pinned memory in user code. This probe
runs the real executor in-process on a model shape, times `io_wait_ms` beside the
manual copy, and marks when each step of the resume is entered (>) and left (<),
in ms from entering it. `--idle-ms` sleeps before every timed call, as a server
waiting for its next request does.

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
    """Timestamps inside one resume, in milliseconds from entering `Executor.resume`."""

    def __init__(self, executor: Executor):
        self.marks: list[tuple[str, float]] = []
        store = executor.sessions
        for owner, name in ((executor, "resume"), (executor, "memory_in_use"), (store, "page_in"),
                            (store, "_to_device"), (executor, "_upload"), (store, "_synchronize"),
                            (executor, "synchronize")):
            self._mark_calls(owner, name)

    def _mark_calls(self, owner, name: str) -> None:
        inner = getattr(owner, name)

        def marked(*args, **kwargs):
            self.marks.append((f"{name}>", time.perf_counter()))
            try:
                return inner(*args, **kwargs)
            finally:
                self.marks.append((f"{name}<", time.perf_counter()))
        setattr(owner, name, marked)

    def take(self) -> dict:
        """Each call's first entry (>) and exit (<), and the last KV copy's exit (_to_device<<)."""
        marks, self.marks = self.marks, []
        entered = marks[0][1]
        offsets: dict[str, float] = {}
        for label, t in marks:
            offsets.setdefault(label, (t - entered) * 1e3)
        offsets["_to_device<<"] = ([t for label, t in marks if label == "_to_device<"][-1] - entered) * 1e3
        return offsets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--layers", default="1,10,39")
    parser.add_argument("--idle-ms", type=float, default=0.0)
    parser.add_argument("--land-copy", action="store_true",
                        help="copy the activation into its pinned buffer right before the resume, as the "
                             "server's landing does after the idle wait")
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
            manual, manual_first, djinn, parts = [], [], [], []
            for _ in range(args.rounds + 1):
                session = sessions.open(cached, b"probe")
                activation = executor.run_to_layer(session, ids, layer) * 0.9
                # exp3's manual_offload: the same bytes back from pinned host memory.
                pinned_kv = [(k.cpu().pin_memory(), v.cpu().pin_memory()) for k, v in kv.to_pairs(session.cache)]
                landed = activation.cpu().pin_memory()  # what the server's landing receives into
                frame = activation.cpu()  # the received frame in libzmq's (pageable) memory
                torch.cuda.synchronize()
                time.sleep(idle)
                started = time.perf_counter()
                moved = [(pinned_kv[0][0].to(device, non_blocking=True), pinned_kv[0][1].to(device, non_blocking=True))]
                manual_first.append((time.perf_counter() - started) * 1e3)
                moved += [(k.to(device, non_blocking=True), v.to(device, non_blocking=True)) for k, v in pinned_kv[1:]]
                act = landed.to(device, non_blocking=True)
                torch.cuda.synchronize()
                manual.append((time.perf_counter() - started) * 1e3)
                del moved, act
                executor.offload(session)
                timeline.marks.clear()
                time.sleep(idle)
                if args.land_copy:
                    landed.copy_(frame)
                executor.resume(session, landed)
                djinn.append(session.last_io_wait_ms)
                parts.append(timeline.take())
                sessions.close(session.handle)
            manual, manual_first, djinn, parts = manual[1:], manual_first[1:], djinn[1:], parts[1:]
            print(json.dumps({
                "seq_len": seq_len, "layer": layer, "idle_ms": args.idle_ms, "land_copy": args.land_copy,
                "manual_ms": round(statistics.median(manual), 3),
                "manual_first_layer_issued_ms": round(statistics.median(manual_first), 3), "djinn_ms": round(statistics.median(djinn), 3),
                "ratio": round(statistics.median(djinn) / statistics.median(manual), 3),
                "djinn_marks_ms": {k: round(statistics.median(p[k] for p in parts), 3)
                                   for k in sorted(parts[0], key=parts[0].get)},
                "device": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
