"""Check the ring-buffer streamer on a CUDA machine and print one JSON object to stdout.

1. Equivalence: a truncated model (default 4 layers of llama-2-13b), fully resident vs
   streamed through a ring of ~2.5 layers: forward logits and greedy generate must be
   bit-identical (torch.equal).
2. Bandwidth: the full model (default llama-2-13b, fp16, built on the GPU, then packed
   into pinned host memory by the streamer) streamed through a 10 GiB ring; for each
   chunk size, layer bytes streamed over the wall time of back-to-back forwards of a
   short prompt (cuda-synchronised around them), against the pinned PCIe peak. The
   seed-003 goal is >= 90% of that peak.

A human-readable table goes to stderr. Usage: python scripts/gpu_streamer_check.py
(`--device cpu --model tiny-llama --ring-gib 0.01` dry-runs the same steps on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from djinn.models import CATALOGUE, build, default_dtype  # noqa: E402
from djinn.server.streamer import find_decoder_layers, stream_model  # noqa: E402
from djinn.telemetry.pcie import cuda_unavailable_reason, measure_pcie_peak  # noqa: E402

GOAL_FRACTION_OF_PEAK = 0.9


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def layer_bytes(model: torch.nn.Module) -> int:
    return max(sum(p.numel() * p.element_size() for p in layer.parameters())
               for layer in find_decoder_layers(model))


@torch.no_grad()
def check_equivalence(name: str, device: str, num_layers: int, prompt: torch.Tensor, new_tokens: int) -> dict:
    reference = build(name, device=device, num_layers=num_layers)
    expected = reference(prompt, use_cache=False).logits
    gen_kwargs = dict(max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                      return_dict_in_generate=True, output_logits=True)
    expected_gen = reference.generate(prompt, **gen_kwargs)
    del reference
    free_cache(device)

    model = build(name, device=device, num_layers=num_layers)
    capacity = int(layer_bytes(model) * 2.5)
    with stream_model(model, device=device, capacity_bytes=capacity, chunk_bytes=64 << 20) as handle:
        got = model(prompt, use_cache=False).logits
        got_gen = model.generate(prompt, **gen_kwargs)
        stats = handle.stats
    result = dict(
        model=name, num_layers=num_layers, ring_bytes=capacity,
        forward_logits_identical=bool(torch.equal(got, expected)),
        forward_max_abs_diff=float((got.float() - expected.float()).abs().max()),
        generate_tokens_identical=bool(torch.equal(got_gen.sequences, expected_gen.sequences)),
        generate_logits_identical=all(torch.equal(a, b) for a, b in zip(got_gen.logits, expected_gen.logits)),
        layer_loads=stats.layer_loads, wraps=stats.wraps, waits=stats.waits,
    )
    del model, got, got_gen, expected, expected_gen
    free_cache(device)
    return result


@torch.no_grad()
def measure_bandwidth(name: str, device: str, ring_bytes: int, chunks_mb: list[int], prompt: torch.Tensor,
                      forwards: int, prefetch_depth: int) -> dict:
    t0 = time.perf_counter()
    model = build(name, device=device)
    sync(device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    handle = stream_model(model, device=device, capacity_bytes=ring_bytes,
                          chunk_bytes=chunks_mb[0] << 20, prefetch_depth=prefetch_depth)
    sync(device)
    free_cache(device)  # the layers' device copies are gone; hand the memory back
    setup_s = time.perf_counter() - t0
    per_forward = sum(handle.layer_bytes)
    log(f"{name}: built in {build_s:.1f}s, packed into pinned host memory in {setup_s:.1f}s; "
        f"{len(handle.layer_bytes)} layers, {per_forward / 1e9:.2f} GB streamed per forward, "
        f"ring {ring_bytes / 2**30:.1f} GiB holds {ring_bytes // max(handle.layer_bytes)} layers")
    rows = []
    try:
        for chunk_mb in chunks_mb:
            handle.chunk_bytes = chunk_mb << 20
            model(prompt, use_cache=False)  # warm-up; also puts the next pass's first loads in flight
            sync(device)
            before = handle.stats
            t0 = time.perf_counter()
            for _ in range(forwards):
                model(prompt, use_cache=False)
            sync(device)
            wall = time.perf_counter() - t0
            after = handle.stats
            # Loads issued before the window had finished at the first sync, loads issued in
            # it (next-pass prefetches included) by the last one: bytes_copied is exactly
            # what moved inside the window.
            copied = after.bytes_copied - before.bytes_copied
            streamed = after.bytes_streamed - before.bytes_streamed
            copy_s = after.copy_seconds - before.copy_seconds
            rows.append(dict(
                chunk_mb=chunk_mb, forwards=forwards, bytes_copied=copied, bytes_streamed=streamed,
                seconds_per_forward=wall / forwards,
                effective_gbps=copied / wall / 1e9,  # what back-to-back forwards see, compute included
                copy_engine_gbps=streamed / copy_s / 1e9 if copy_s else None,  # DMA time of used loads
                wraps=after.wraps - before.wraps, waits=after.waits - before.waits,
                deferrals=after.deferrals - before.deferrals,
            ))
        peak_memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    finally:
        handle.remove()  # copies the layers back to the GPU they were built on (fits beside nothing else)
        del handle, model
        free_cache(device)
    return dict(model=name, dtype=str(default_dtype(device)), ring_bytes=ring_bytes, prefetch_depth=prefetch_depth,
                prompt_tokens=prompt.shape[1], bytes_per_forward=per_forward,
                build_seconds=build_s, setup_seconds=setup_s,
                max_memory_allocated=peak_memory, sweep=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-13b", choices=sorted(CATALOGUE))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ring-gib", type=float, default=10.0)
    parser.add_argument("--chunks-mb", type=int, nargs="+", default=[16, 64, 128, 512])
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--check-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()

    device = args.device
    on_cuda = device.startswith("cuda")
    reason = cuda_unavailable_reason() if on_cuda else None
    if reason is not None:
        print(json.dumps({"skipped": reason}))
        return 0

    vocab = CATALOGUE[args.model].config().vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).to(device)
    report = dict(device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__,
                  cuda=torch.version.cuda, transformers=transformers.__version__)
    log("equivalence on a truncated model ...")
    report["equivalence"] = check_equivalence(args.model, device, args.check_layers, prompt, args.new_tokens)
    log(json.dumps(report["equivalence"]))
    peak_gbps = None
    if on_cuda:
        log("pinned PCIe peak ...")
        peak_gbps = measure_pcie_peak(device=device).h2d_pinned_gbps
    report["pcie_h2d_pinned_gbps"] = peak_gbps
    log("bandwidth sweep ...")
    bandwidth = measure_bandwidth(args.model, device, int(args.ring_gib * 2**30), args.chunks_mb, prompt,
                                  args.forwards, args.prefetch_depth)
    for row in bandwidth["sweep"]:
        row["fraction_of_peak"] = row["effective_gbps"] / peak_gbps if peak_gbps else None
    report["bandwidth"] = bandwidth
    best = max(row["effective_gbps"] for row in bandwidth["sweep"])
    report["goal"] = dict(fraction_of_peak=GOAL_FRACTION_OF_PEAK, best_effective_gbps=best,
                          met=bool(peak_gbps) and best >= GOAL_FRACTION_OF_PEAK * peak_gbps)
    eq = report["equivalence"]
    report["ok"] = bool(eq["forward_logits_identical"] and eq["generate_tokens_identical"]
                        and report["goal"]["met"])

    log(f"\n{'chunk MB':>9} {'s/forward':>10} {'effective GB/s':>15} {'copy GB/s':>10} {'of peak':>8}")
    for row in bandwidth["sweep"]:
        copy = f"{row['copy_engine_gbps']:.1f}" if row["copy_engine_gbps"] else "-"
        share = f"{row['fraction_of_peak']:.1%}" if row["fraction_of_peak"] is not None else "-"
        log(f"{row['chunk_mb']:>9} {row['seconds_per_forward']:>10.3f} {row['effective_gbps']:>15.1f} "
            f"{copy:>10} {share:>8}")
    log(f"pinned PCIe peak {peak_gbps} GB/s; bit-identical forward "
        f"{eq['forward_logits_identical']}, generate {eq['generate_tokens_identical']}")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
