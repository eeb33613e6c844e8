"""The fast decode path through a server on a GPU, against issue 16's goals. One JSON file.

- ms/token of the fast path (the server's CUDA default) for llama-2-7b and llama-2-13b, bs 1,
  exp2.1's 72-token prompt, 50 tokens, median of the timed runs after warm-up (the first
  warm-up run compiles the step: a minute or more per model), with the decode path the
  server's counters saw, the wire bytes per token, and bytes read per step over the step as
  a fraction of the measured HBM copy bandwidth and of the datasheet's;
- TTFT of a 512-token prompt (the prefill request's wall time);
- eager parity: an `--exact` server's full_djinn against in-process HF eager (load_local) in
  interleaved rounds (A B A B ...), both on the default kernels, the paired ratio's interval;
- teacher-forced equivalence of the fast path with in-process HF over a 512-token reference,
  on the shipped prompt and on seeded random ids (max |Δlogit|, top-1 agreement).

python -m benchmarks.probes.fast_decode_server --out $OUT/fast_decode_server.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import djinn
from djinn import models
from djinn.client import load_local
from djinn.equivalence import judge, stepper, teacher_forced_logits
from djinn.reproducibility import child_environment, current_kernel_config
from djinn.server.process import ServerProcess
from djinn.telemetry.hbm import bytes_read_per_step, measure_hbm

from benchmarks.goals.exp2_1 import FAST_MAX_MS_PER_TOKEN, FAST_MIN_TOP1_AGREEMENT
from benchmarks.stats import Spread, paired_ratio

PROMPT_FILE = Path(__file__).parents[1] / "data" / "prompt.json"
NEW_TOKENS = 50
TTFT_PROMPT_TOKENS = 512
TEACHER_FORCED_TOKENS = 512
RANDOM_PROMPT_SEED = 16  # as exp2.1's test_fast_teacher_forced
READY_TIMEOUT_S = 300.0  # two catalogue models built on the GPU at start
REQUEST_TIMEOUT_S = 900.0  # the first decode step compiles the model's step


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _server(log_dir: Path, name: str, device: str, *args: str) -> ServerProcess:
    # A server as a user starts one: the default kernels (no cuBLAS variable of this process).
    return ServerProcess("--device", device, *args, log_path=log_dir / f"{name}.log", ready_timeout_s=READY_TIMEOUT_S,
                         env=child_environment(os.environ, deterministic=False), inherit_env=False).start()


def _path_steps(client) -> dict:
    return dict(client.stats()["decode_paths"]["steps"])


def fast_decode(client, name: str, prompt: torch.Tensor, runs: int, warmup: int, hbm) -> dict:
    remote = client.load(name, mode="full_djinn", decode="fast")  # the server's own model: no upload
    started = time.perf_counter()
    remote.generate(prompt, max_new_tokens=NEW_TOKENS)
    first_run_s = time.perf_counter() - started
    _log(f"{name}: first run (compile and capture) {first_run_s:.1f} s")
    for _ in range(warmup - 1):
        remote.generate(prompt, max_new_tokens=NEW_TOKENS)
    before = _path_steps(client)
    stats = []
    for _ in range(runs):
        remote.generate(prompt, max_new_tokens=NEW_TOKENS)
        stats.append(remote.last_stats)
    after = _path_steps(client)
    steps = {p: n - before.get(p, 0) for p, n in after.items() if n - before.get(p, 0)}
    per_token = [s.per_token_ms for s in stats]
    step_median = [statistics.median(x.wall_ms for x in s.steps[1:]) for s in stats]
    ttft = []
    long_prompt = torch.randint(0, remote.model.config.vocab_size, (1, TTFT_PROMPT_TOKENS), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        remote.generate(long_prompt, max_new_tokens=1)
        ttft.append(remote.last_stats.prefill_ms)
    config, dtype = remote.model.config, next(remote.model.parameters()).dtype
    max_len = client.stats()["decode_paths"]["max_len"]
    read = bytes_read_per_step(models.parameter_bytes(name, dtype), models.kv_bytes_per_token(config, dtype),
                               max_len, 1)
    ms = statistics.median(per_token)
    gbps = read / (ms / 1e3) / 1e9
    goal = FAST_MAX_MS_PER_TOKEN.get(name)
    result = {"model": name, "first_run_s": first_run_s, "steps_by_decode_path": steps,
              **Spread.of(per_token).as_dict("per_token", "ms"), **Spread.of(step_median).as_dict("step", "ms"),
              "goal_ms_per_token": goal, "meets_goal": goal is not None and ms <= goal,
              "ttft_512_ms": Spread.of(ttft).as_dict("ttft", "ms"),
              "wire_payload_bytes_per_token": statistics.fmean(
                  s.decode_payload_sent_per_token + s.decode_payload_received_per_token for s in stats),
              "wire_bytes_per_token": statistics.fmean(
                  s.decode_bytes_sent_per_token + s.decode_bytes_received_per_token for s in stats),
              "bytes_read_per_step": read, "achieved_gbps": gbps,
              "fraction_of_copy": gbps / hbm.copy_gbps if hbm else None,
              "fraction_of_spec": gbps / hbm.spec_gbps if hbm and hbm.spec_gbps else None}
    _log(f"{name}: {ms:.2f} ms/token (goal {goal}), {gbps:.0f} GB/s, paths {steps}, TTFT(512) "
         f"{statistics.median(ttft):.1f} ms")
    return result


def eager_parity(exact_client, name: str, native_model, prompt: torch.Tensor, rounds: int) -> dict:
    remotes = {"native_pytorch": load_local(native_model),
               "full_djinn": exact_client.load(name, mode="full_djinn", decode="exact")}
    samples: dict[str, list[float]] = {b: [] for b in remotes}
    for i in range(rounds + 2):  # two warm-up rounds
        for baseline, remote in remotes.items():
            remote.generate(prompt, max_new_tokens=NEW_TOKENS)
            if i >= 2:
                samples[baseline].append(statistics.median(s.wall_ms for s in remote.last_stats.steps[1:]))
    ratio = paired_ratio(samples["full_djinn"], samples["native_pytorch"])
    _log(f"eager parity full_djinn/native: {ratio}")
    return {"rounds": rounds, "kernels": current_kernel_config().as_dict(),
            "step_ms_median_per_round": samples, "ratio_full_djinn_vs_native": ratio.as_dict()}


def equivalence(fast_client, name: str, native_model, prompts: dict[str, torch.Tensor], tokens: int) -> dict:
    out = {}
    native = load_local(native_model)
    fast = fast_client.load(name, mode="full_djinn", decode="fast")
    for name, ids in prompts.items():
        reference = native.generate(ids, max_new_tokens=tokens)[:, ids.shape[1]:]
        logits = {}
        for side, remote in (("native", native), ("fast", fast)):
            with stepper(remote, ids) as step:
                logits[side] = teacher_forced_logits(step, ids, reference[:, :-1])
        result = judge(logits["native"], logits["fast"], min_top1_agreement=FAST_MIN_TOP1_AGREEMENT)
        out[name] = result.as_dict()
        _log(f"teacher-forced {name}: {result.verdict.value}, max |Δ| {result.max_abs_diff:.3g}, "
             f"top-1 {result.top1_agreement:.2%}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="llama-2-7b,llama-2-13b")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the eager parity")
    parser.add_argument("--teacher-forced-tokens", type=int, default=TEACHER_FORCED_TOKENS)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the probe itself (tiny-llama)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("fast_decode_server needs a CUDA device: this torch sees none")
    # Killed by a time limit (`timeout`): stop the servers and write what was measured so far.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("fast_decode_server: terminated, partial results written"))
    names = args.models.split(",")
    prompt = torch.tensor([json.loads(PROMPT_FILE.read_text())["token_ids"]])
    random_prompt = torch.randint(0, models.CATALOGUE[names[0]].config().vocab_size, prompt.shape,
                                  generator=torch.Generator().manual_seed(RANDOM_PROMPT_SEED))
    hbm = measure_hbm(args.device) if args.device.startswith("cuda") else None
    if hbm:
        _log(f"{hbm.device_name}: HBM copy {hbm.copy_gbps:.0f} GB/s, spec {hbm.spec_gbps}")
    report = {"probe": "fast_decode_server", "device": hbm.device_name if hbm else args.device,
              "torch": torch.__version__, "hbm": vars(hbm) if hbm else None, "prompt_tokens": prompt.shape[1],
              "new_tokens": NEW_TOKENS}
    logs = Path(tempfile.mkdtemp(prefix="djinn-fast-probe-"))
    started = time.perf_counter()
    fast_server = _server(logs, "fast", args.device, *(a for n in names for a in ("--model", n)))
    exact_server = _server(logs, "exact", args.device, "--exact", "--model", names[0])
    _log(f"servers ready in {time.perf_counter() - started:.0f} s")
    try:
        with djinn.connect(fast_server.host_port, timeout_s=REQUEST_TIMEOUT_S) as fast, \
                djinn.connect(exact_server.host_port, timeout_s=REQUEST_TIMEOUT_S) as exact:
            report["hello"] = {k: v for k, v in fast.hello().items() if k in ("version", "decode_default")}
            report["fast"] = [fast_decode(fast, n, prompt, args.runs, args.warmup, hbm) for n in names]
            native_model = models.build(names[0], seed=0, device=args.device)  # the servers' seeded weights
            report["eager_parity"] = eager_parity(exact, names[0], native_model, prompt, args.rounds)
            report["teacher_forced"] = equivalence(fast, names[0], native_model,
                                                   {"prompt_file": prompt, "random_ids": random_prompt},
                                                   args.teacher_forced_tokens)
            report["server_decode_paths"] = fast.stats()["decode_paths"]
    finally:
        for server in (fast_server, exact_server):
            server.stop()
        report["server_logs_tail"] = {p.name: p.read_text()[-3000:] for p in logs.glob("*.log")}
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
