"""What a forward costs on a fresh thread, against the same forward on the main thread and
on a parked forward's reused worker (llama-2-13b shape on the GPU; medians of 7, in ms).

- full: `forward_last` on the main thread;
- full_thread: the same forward on a new `threading.Thread`;
- park1: `ParkedForward` to decoder layer 1 (a reused worker since the worker pool);
- fdl: `find_decoder_layers` alone.

python -m benchmarks.probes.thread_overhead  → results/exp3/thread_overhead_h100.txt
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from djinn import kv, models
from djinn.decoding import forward_last
from djinn.server.breakpoints import ParkedForward
from djinn.server.streamer import find_decoder_layers

ROUNDS = 7


def timed(work) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    model = models.build("llama-2-13b", seed=0, device="cuda")
    print("attn", model.config._attn_implementation, flush=True)
    for seq_len in (512, 2048):
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device="cuda")

        def full():
            forward_last(model, ids, kv.from_pairs([]))

        def full_thread():
            thread = threading.Thread(target=full)
            thread.start()
            thread.join()

        def park1():
            cache = kv.from_pairs([])
            parked = []
            ms = timed(lambda: parked.append(ParkedForward(model, 1, lambda: forward_last(model, ids, cache))))
            parked[0].resume(parked[0].activation)
            return ms

        cases = {"full": lambda: timed(full), "full_thread": lambda: timed(full_thread), "park1": park1,
                 "fdl": lambda: timed(lambda: find_decoder_layers(model))}
        for name in ("full", "full_thread", "park1", "fdl", "full", "park1"):
            print(seq_len, name, round(statistics.median(cases[name]() for _ in range(ROUNDS)), 2), flush=True)


if __name__ == "__main__":
    main()
