"""The semantic translation gap (seeds 001/002): prefill and decode × four modes.

For each phase and mode, N trials (`--gap-trials`, the seed's 3 by default) measure
latency, bytes on the wire (the transport's counters, and the packet capture where
it can run) and average GPU utilisation. `test_gap_table` prints the seeds' final
table and writes it as CSV and markdown.
"""
from __future__ import annotations

import statistics
from dataclasses import astuple

import pytest
import torch

from benchmarks.plans import run_plan

PHASES = {"prefill": 1, "decode": 50}  # new tokens: prefill produces the first, decode goes on to 50
MODES = ("local", "naive", "remote_cache", "sys_simulated")  # the seeds' names, aliases of the ladder
ROWS: dict[tuple[str, str], dict] = {}
TOKENS: dict[tuple[str, str], torch.Tensor] = {}

pytestmark = pytest.mark.gap


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _sample_std(telemetry) -> float | None:
    """Spread of the SM utilisation samples over the measured trials."""
    if telemetry.nvml is None:
        return None
    return _std([s.sm_util_pct for s in telemetry.nvml.samples])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
def test_gap(phase, mode, benchmark, bench_model, djinn_client, prompt_ids, collectors, progress, pytestconfig):
    benchmark.group = f"gap-{phase}-{bench_model.name}"
    remote = bench_model.load(mode, djinn_client)
    new_tokens, trials, warmup = astuple(run_plan(
        mode, bench_model.weight_bytes, pytestconfig, new_tokens=PHASES[phase],
        runs=pytestconfig.getoption("--djinn-gap-trials"), warmup=1))
    outputs = []

    def trial():
        tokens = remote.generate(prompt_ids, max_new_tokens=new_tokens)
        outputs.append((tokens, remote.last_stats))

    for _ in range(warmup):
        remote.generate(prompt_ids, max_new_tokens=new_tokens)
    with collectors.region(watch_wire=mode != "local") as telemetry:
        benchmark.pedantic(trial, rounds=trials, warmup_rounds=0, iterations=1)

    latencies = [stats.total_ms / 1e3 for _, stats in outputs]
    network = [float(stats.bytes_sent + stats.bytes_received) for _, stats in outputs]
    # Utilisation is averaged over the trials' region; the capture's total is split evenly
    # between trials, which carry the same bytes (same tokens, same shapes).
    captured = telemetry.wire.wire_bytes / trials if telemetry.wire is not None else None
    row = {
        "experiment": "gap", "phase": phase, "mode": mode, "model": bench_model.name, "trials": trials,
        "new_tokens": new_tokens, "latency_s_mean": statistics.fmean(latencies), "latency_s_std": _std(latencies),
        "network_bytes_mean": statistics.fmean(network), "network_bytes_std": _std(network),
        "wire_capture_bytes_mean": captured,
        "gpu_sm_util_pct_mean": telemetry.sm_util_pct,
        "gpu_sm_util_pct_std": _sample_std(telemetry),
    }
    benchmark.extra_info.update(row)
    ROWS[(phase, mode)] = row
    TOKENS[(phase, mode)] = outputs[0][0]
    progress(f"{row['latency_s_mean'] * 1e3:.1f} ms, {row['network_bytes_mean']:.0f} B on the wire")
    if captured is not None and mode != "local":
        # The capture sees every TCP byte of the server's port; the transport counts what it framed.
        assert captured >= statistics.fmean(network), "the wire cannot carry fewer bytes than were framed"


def test_gap_table(bench_model, results_writer, progress):
    missing = [f"{p}/{m}" for p in PHASES for m in MODES if (p, m) not in ROWS]
    if missing:
        pytest.skip(f"the table compares the modes of one run; not measured in this run: {', '.join(missing)}")
    from benchmarks.report import write_gap_table

    rows = [ROWS[(p, m)] for p in PHASES for m in MODES]
    paths = write_gap_table(rows, results_writer.root / "gap" / results_writer.stamp)
    for line in paths.markdown.read_text().splitlines():
        progress(line)
    for phase in PHASES:
        local = TOKENS[(phase, "local")]
        for mode in MODES[1:]:
            produced = TOKENS[(phase, mode)]
            assert torch.equal(produced, local[:, :produced.shape[1]]), f"{phase}/{mode} tokens differ from local"
        bytes_by_mode = [ROWS[(phase, m)]["network_bytes_mean"] for m in MODES[1:]]
        assert bytes_by_mode == sorted(bytes_by_mode, reverse=True), f"{phase}: bytes must fall down the ladder"
