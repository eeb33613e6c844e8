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


def upload_side_stream(tensor, device):
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        out = tensor.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def upload_register(tensor, device):
    cudart = torch.cuda.cudart()
    cudart.cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0)
    out = tensor.to(device, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    cudart.cudaHostUnregister(tensor.data_ptr())
    return out


STRATEGIES = {"pin_overlap": upload_pin, "pageable": upload_pageable, "side_stream": upload_side_stream,
              "register": upload_register}


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
                        executor._upload = lambda t, s=strategy: s(t, device)
                        executor.resume(session, host_activation)
                        times.append(session.last_io_wait_ms)
                    sessions.close(session.handle)
                times = times[1:]
                point[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}
            if on_gpu:
                base = point["manual_pinned"]["median_ms"]
                point["ratio_vs_manual"] = {k: point[k]["median_ms"] / base for k in strategies}
            out["points"].append(point)
            print(json.dumps({k: (v if not isinstance(v, dict) or "median_ms" not in v else round(v["median_ms"], 3))
                              for k, v in point.items()}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
