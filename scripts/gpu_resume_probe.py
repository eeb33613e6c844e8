"""Where a breakpoint resume's IO wait goes on the GPU, for ways of uploading the activation.

The server's `Executor.resume` pages a parked session's KV back and uploads the
client's (pageable, freshly received) activation; `manual_offload` in exp3 copies the
same bytes from pinned memory. This probe runs the real executor in-process on a
model shape and times `io_wait_ms` with the activation upload swapped for each
strategy, next to the pinned copy of the same bytes.

python scripts/gpu_resume_probe.py [--model llama-2-13b] [--rounds 7]  → JSON on stdout.
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


def pageable(t: torch.Tensor) -> torch.Tensor:
    """A fresh pageable host copy whose pages are touched, like a frame libzmq just filled."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.cpu())


def upload_pin(tensor, device):
    return tensor.pin_memory().to(device, non_blocking=True)


def upload_pageable(tensor, device):
    return tensor.to(device, non_blocking=True)


_POOL: dict = {}


def upload_pinned_pool(tensor, device):
    """A pinned staging buffer kept across requests: no host-allocator call per resume."""
    key = (tensor.dtype, tuple(tensor.shape))
    if key not in _POOL:
        _POOL[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return _POOL[key].copy_(tensor).to(device, non_blocking=True)


STRATEGIES = {"pin_overlap": upload_pin, "pageable": upload_pageable, "pinned_pool": upload_pinned_pool}


class Phases:
    """Host time of each part of a resume's IO wait, summed per round."""

    def __init__(self, executor):
        self.times: dict[str, float] = {}
        store = executor.sessions
        for owner, name in ((store, "page_in"), (store, "_synchronize"), (executor, "memory_in_use")):
            self._wrap(owner, name)

    def _wrap(self, owner, name):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.times[name] = self.times.get(name, 0.0) + (time.perf_counter() - started) * 1e3
        setattr(owner, name, timed)

    def wrap_upload(self, upload):
        def timed(tensor):
            started = time.perf_counter()
            try:
                return upload(tensor)
            finally:
                self.times["upload"] = self.times.get("upload", 0.0) + (time.perf_counter() - started) * 1e3
        return timed

    def take(self) -> dict:
        taken, self.times = self.times, {}
        return taken


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--layers", default="1,10,39")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = models.build(args.model, seed=0, device=args.device)
    dtype = next(model.parameters()).dtype
    weight_bytes = sum(p.nbytes for p in model.parameters())
    budget = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 64 << 30
    sessions = SessionStore(600.0, "probe", device, swap=True, host_limit_bytes=64 << 30)
    weights = WeightCache(device, budget, reserve_bytes=lambda: sessions.kv_bytes)
    cached = CachedModel("probe", model, model.config, dtype, {}, weight_bytes)
    weights.models["probe"] = cached
    executor = Executor(device, weights, sessions, budget)
    phases = Phases(executor) if device.type == "cuda" else None
    vocab = model.config.vocab_size
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    # A CPU run only smoke-tests the plumbing: pinning and streams need CUDA.
    strategies = STRATEGIES if on_gpu else {"pageable": upload_pageable}
    out = {"model": args.model, "device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__, "points": []}
    for seq_len in map(int, args.seq_lens.split(",")):
        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        for layer in map(int, args.layers.split(",")):
            point = {"seq_len": seq_len, "layer": layer}
            for name, strategy in [("manual_pinned", None)] * on_gpu + list(strategies.items()):
                times, parts = [], []
                if phases:
                    phases.take()
                for _ in range(args.rounds + 1):
                    session = sessions.open(cached, b"probe")
                    activation = executor.run_to_layer(session, ids, layer) * 0.9
                    sync()
                    if strategy is None:
                        # exp3's manual_offload: the same bytes back from pinned host memory.
                        pinned_kv = [(k.cpu().pin_memory(), v.cpu().pin_memory()) for k, v in kv.to_pairs(session.cache)]
                        pinned_act = activation.cpu().pin_memory()
                        sync()
                        started = time.perf_counter()
                        moved = [(k.to(device, non_blocking=True), v.to(device, non_blocking=True)) for k, v in pinned_kv]
                        act = pinned_act.to(device, non_blocking=True)
                        sync()
                        times.append((time.perf_counter() - started) * 1e3)
                        del moved, act
                    else:
                        executor.offload(session)
                        host_activation = pageable(activation)
                        upload = lambda t, s=strategy: s(t, device)  # noqa: E731
                        executor._upload = phases.wrap_upload(upload) if phases else upload
                        executor.resume(session, host_activation)
                        times.append(session.last_io_wait_ms)
                        if phases:
                            parts.append(phases.take())
                    sessions.close(session.handle)
                times, parts = times[1:], parts[1:]
                point[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}
                if parts:
                    point[name]["phases_median_ms"] = {k: statistics.median(p.get(k, 0.0) for p in parts)
                                                       for k in parts[0]}
            if on_gpu:
                base = point["manual_pinned"]["median_ms"]
                point["ratio_vs_manual"] = {k: point[k]["median_ms"] / base for k in strategies}
            out["points"].append(point)
            print(json.dumps({k: v if not isinstance(v, dict) or "median_ms" not in v else
                              {"ms": round(v["median_ms"], 3),
                               **{p: round(t, 3) for p, t in v.get("phases_median_ms", {}).items()}}
                              for k, v in point.items()}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
