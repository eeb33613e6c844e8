"""Which kernel configuration decodes bit for bit, and what does each cost? One JSON file.

For the llama-2-7b shape in fp16 (exp2.1's 72-token prompt, 50 greedy tokens, batch 1), each
cuBLAS setting runs in fresh processes, because cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` once,
when a process makes its first handle: the default workspace, `:4096:8`, `:32768:2`, and
`torch.use_deterministic_algorithms(True)` with each fixed workspace (it refuses cuBLAS
without one). Inside each process every attention backend is tried in turn (SDPA's own
choice, math, flash, memory-efficient, cuDNN; a backend that cannot run the shape is recorded
with its error). For each configuration: ms/token (decode steps only, median of the timed
runs after one warm-up run), whether the warm-up and the timed runs gave bit-identical
logits, and whether a second process gave the same logits again.

`recommended` is the fastest configuration that repeated bit for bit (both within a process
and across the two) among those that are deterministic by construction (fixed workspace);
`djinn.reproducibility.DETERMINISTIC` is what `--deterministic` means, and the line to paste
there is printed as `recommended.constant`.

python -m benchmarks.probes.decode_determinism --out $OUT/decode_determinism.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from pathlib import Path

from djinn.reproducibility import CUBLAS_VARIABLE

MODEL = "llama-2-7b"
PROMPT_FILE = Path(__file__).parents[1] / "data" / "prompt.json"  # exp2.1's prompt
NEW_TOKENS = 50  # exp2.1's
TIMED_RUNS = 2  # after one warm-up run: three runs compared for bit-identity
CHILD_TIMEOUT_S = 240  # a 7B build and 5 backends x 3 runs take well under a minute on an H200

# One per process: (name, CUBLAS_WORKSPACE_CONFIG or None for cuBLAS's default, deterministic algorithms).
PROCESS_SETTINGS = (
    ("default", None, False),
    ("ws_4096_8", ":4096:8", False),
    ("ws_32768_2", ":32768:2", False),
    ("det_ws_4096_8", ":4096:8", True),
    ("det_ws_32768_2", ":32768:2", True),
)
# Attention backends tried in each process: "auto" is SDPA's own choice among all of them.
BACKENDS = ("auto", "math", "flash", "mem_efficient", "cudnn")


@dataclass(frozen=True)
class ConfigResult:
    setting: str
    cublas_workspace_config: str | None
    deterministic_algorithms: bool
    attention: str
    ms_per_token_runs: tuple[float, ...]
    ms_per_token_median: float | None
    repeats_in_process: bool | None  # warm-up and timed runs gave bit-identical logits
    same_across_processes: bool | None
    logits_sha256: str | None
    error: str | None = None


def _digest(logits) -> str:
    return hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()[:16]


def child(setting: str, deterministic: bool, backends: tuple[str, ...], runs: int) -> list[dict]:
    """Runs in the fresh process: every backend under this process's cuBLAS setting."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from djinn import kv, models
    from djinn.decoding import forward_last, greedy
    from djinn.reproducibility import DeterministicKernels, use_deterministic_kernels

    if deterministic:  # as --deterministic sets it (warn-only); the backends are each run's own below
        use_deterministic_kernels(DeterministicKernels(os.environ[CUBLAS_VARIABLE], algorithms=True,
                                                       fused_attention=("flash", "mem_efficient", "cudnn")))
    model = models.build(MODEL, seed=0, dtype=torch.float16, device="cuda")
    prompt = torch.tensor([json.loads(PROMPT_FILE.read_text())["token_ids"]], device="cuda")
    kernels = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "mem_efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}

    @torch.no_grad()
    def run() -> tuple[float, torch.Tensor]:
        cache, ids, logits = kv.from_pairs([]), prompt, []
        step = forward_last(model, ids, cache)
        ids = greedy(step)
        logits.append(step)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            step = forward_last(model, ids, cache)
            ids = greedy(step)
            logits.append(step)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1e3 / (NEW_TOKENS - 1), torch.stack(logits)

    out = []
    for backend in backends:
        try:
            with sdpa_kernel(list(kernels.values()) if backend == "auto" else [kernels[backend]]):
                results = [run() for _ in range(runs + 1)]
        except RuntimeError as exc:  # a backend that cannot run this shape or under these flags
            out.append({"attention": backend, "error": str(exc).splitlines()[0][:300]})
            continue
        digests = [_digest(logits) for _, logits in results]
        out.append({"attention": backend, "ms_per_token_runs": [ms for ms, _ in results[1:]],
                    "digests": digests})
    return out


def _spawn(name: str, workspace: str | None, deterministic: bool, backends: tuple[str, ...], runs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != CUBLAS_VARIABLE}
    if workspace is not None:
        env[CUBLAS_VARIABLE] = workspace
    argv = [sys.executable, "-m", "benchmarks.probes.decode_determinism", "--child", name,
            "--backends", ",".join(backends), "--runs", str(runs)]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        error = f"the {name} process ran past {CHILD_TIMEOUT_S} s"
    else:
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        error = f"the {name} process failed (exit {done.returncode}): {done.stderr[-1500:]}"
    print(error, file=sys.stderr, flush=True)  # recorded for each backend; the other settings still run
    return [{"attention": backend, "error": error} for backend in backends]


def combine(name: str, workspace: str | None, deterministic: bool, first: list[dict],
            second: list[dict]) -> list[ConfigResult]:
    """One process's timed runs and a second process's run, as one result per backend."""
    again = {r["attention"]: r for r in second}
    results = []
    for r in first:
        if "error" in r:
            results.append(ConfigResult(name, workspace, deterministic, r["attention"], (), None, None, None, None,
                                        r["error"]))
            continue
        other = again.get(r["attention"], {}).get("digests")
        runs = tuple(r["ms_per_token_runs"])
        results.append(ConfigResult(
            name, workspace, deterministic, r["attention"], runs, statistics.median(runs),
            len(set(r["digests"])) == 1, None if not other else set(other) == set(r["digests"][:1]),
            r["digests"][0]))
    return results


def recommend(results: list[ConfigResult]) -> dict | None:
    """The fastest configuration with a fixed workspace whose logits repeated within and across
    processes; None when none did. Its `constant` is `djinn.reproducibility.DETERMINISTIC`'s line."""
    candidates = [r for r in results if r.cublas_workspace_config is not None and r.repeats_in_process
                  and r.same_across_processes and r.ms_per_token_median is not None]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r.ms_per_token_median)
    default = next((r for r in results if r.cublas_workspace_config is None and r.attention == "auto"
                    and r.ms_per_token_median is not None), None)
    fused = "()" if best.attention == "math" else (
        '("flash", "mem_efficient", "cudnn")' if best.attention == "auto" else f'("{best.attention}",)')
    # Issue 16's goal: deterministic eager decoding at most 1.2x the default kernels' time.
    return {**asdict(best), "ms_vs_default_kernels": best.ms_per_token_median / default.ms_per_token_median
            if default else None, "constant": (
        f'DETERMINISTIC = DeterministicKernels(cublas_workspace_config="{best.cublas_workspace_config}", '
        f'algorithms={best.deterministic_algorithms}, fused_attention={fused})')}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (default: stdout only)")
    parser.add_argument("--settings", default=",".join(s[0] for s in PROCESS_SETTINGS),
                        help="process settings to run, comma-separated")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--runs", type=int, default=TIMED_RUNS, help="timed runs after the warm-up run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backends = tuple(args.backends.split(","))
    settings = {name: (workspace, det) for name, workspace, det in PROCESS_SETTINGS}
    if args.child:
        print(json.dumps(child(args.child, settings[args.child][1], backends, args.runs)))
        return
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("decode_determinism needs a CUDA device: this torch sees none")
    results: list[ConfigResult] = []

    def write() -> str:
        report = {"probe": "decode_determinism", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "model": MODEL, "dtype": "float16", "prompt_tokens": 72, "new_tokens": NEW_TOKENS, "batch": 1,
                  "results": [asdict(r) for r in results], "recommended": recommend(results)}
        text = json.dumps(report, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    for name in args.settings.split(","):
        workspace, det = settings[name]
        started = time.perf_counter()
        first = _spawn(name, workspace, det, backends, args.runs)
        second = _spawn(name, workspace, det, backends, 0)  # one run: the cross-process check
        results.extend(combine(name, workspace, det, first, second))
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for r in results[-len(backends):]:
            print(f"  {r.attention:14s} {r.ms_per_token_median or float('nan'):7.2f} ms/token  repeats "
                  f"{r.repeats_in_process}  across processes {r.same_across_processes}"
                  f"{'  ' + r.error if r.error else ''}", file=sys.stderr, flush=True)
        write()  # after each setting: a run cut short by a time limit keeps what it measured
    print(write())


if __name__ == "__main__":
    main()
