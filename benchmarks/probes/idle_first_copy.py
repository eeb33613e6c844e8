"""How a GPU's idle time before a restore changes the restore (diagnostic behind exp3's idle time).

Restores exp3's smallest point, 512 tokens parked at layer 1 of the llama-2-13b shape (four
5.2 MB KV tensors and a 5.2 MB activation, pinned), with `.to(device, non_blocking=True)`
as `manual_offload` and the server's page-in do, after different spells before the first
copy call: none, sleeping, busy-spinning (the CPU stays awake), waiting on an event set by
another thread (as a server woken by its socket), a 5 MB host copy (a frame landing), a
64 MB host pass (evicts the caches), and a stream query between the spell and the restore.
The conditions take turns round by round, so drift hits each alike.

python -m benchmarks.probes.idle_first_copy [--rounds 15]  → one JSON line per condition (medians, ms):
first_call_ms (the first copy call returning), issued_ms (all five issued), ready_ms (synchronised).
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Callable

import torch

TENSOR_BYTES = 512 * 5120 * 2  # one layer's K (or V), or the activation, at exp3's S512/L1 point
KV_TENSORS = 4  # K and V of layers 0 and 1
SCRATCH_BYTES = 64 << 20


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def event_wait(seconds: float) -> None:
    woken = threading.Event()
    threading.Timer(seconds, woken.set).start()
    woken.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cuda")
    pinned = [torch.empty(TENSOR_BYTES // 2, dtype=torch.float16, pin_memory=True).normal_()
              for _ in range(KV_TENSORS + 1)]
    frame = torch.empty(TENSOR_BYTES, dtype=torch.uint8).random_()
    landing = torch.empty(TENSOR_BYTES, dtype=torch.uint8, pin_memory=True)
    scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8).random_()
    stream = torch.cuda.current_stream()
    conditions: dict[str, Callable[[], None]] = {
        "none": lambda: None,
        "sleep_1ms": lambda: time.sleep(0.001),
        "sleep_5ms": lambda: time.sleep(0.005),
        "sleep_20ms": lambda: time.sleep(0.02),
        "sleep_50ms": lambda: time.sleep(0.05),
        "spin_20ms": lambda: spin(0.02),
        "event_wait_20ms": lambda: event_wait(0.02),
        "land_5MB": lambda: landing.copy_(frame),
        "sleep_20ms_land_5MB": lambda: (time.sleep(0.02), landing.copy_(frame)),
        "host_pass_64MB": lambda: scratch.add_(1),
        "sleep_20ms_stream_query": lambda: (time.sleep(0.02), stream.query()),
    }

    def restore(before: Callable[[], None]) -> dict:
        torch.cuda.synchronize()
        before()
        started = time.perf_counter()
        moved = [pinned[0].to(device, non_blocking=True)]
        first = time.perf_counter()
        moved += [t.to(device, non_blocking=True) for t in pinned[1:]]
        issued = time.perf_counter()
        torch.cuda.synchronize()
        ready = time.perf_counter()
        return {"first_call_ms": (first - started) * 1e3, "issued_ms": (issued - started) * 1e3,
                "ready_ms": (ready - started) * 1e3}

    for _ in range(3):
        restore(conditions["none"])
    runs: dict[str, list[dict]] = {name: [] for name in conditions}
    for _ in range(args.rounds):
        for name, before in conditions.items():
            runs[name].append(restore(before))
    for name, measured in runs.items():
        print(json.dumps({"before": name, "rounds": args.rounds,
                          **{key: round(statistics.median(m[key] for m in measured), 4) for key in measured[0]}}))
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "restored_bytes": sum(t.nbytes for t in pinned)}))


if __name__ == "__main__":
    main()
