"""The semantic translation gap (seeds 001/002): prefill and decode × four modes.

For each phase and mode, N trials (`--djinn-gap-trials`, the seed's 3 by default) measure
latency, bytes on the wire (the transport's counters, and the packet capture where
it can run) and average GPU utilisation, each as the median and IQR of the trials.
`test_gap_table` prints the seeds' final table, writes it as CSV and markdown, and judges
what this session's ledger holds (benchmarks.goals.gap). Both sides of every comparison
decode on deterministic kernels: the session's region here, --deterministic in the server.
"""
from __future__ import annotations

import statistics
from dataclasses import astuple

import pytest

from benchmarks.goals.gap import MODES, PHASES, GapResult, gap_criteria
from benchmarks.plans import run_plan
from benchmarks.stats import Spread

NEW_TOKENS = {"prefill": 1, "decode": 50}  # prefill produces the first token, decode goes on to 50
LEDGER = "gap"

pytestmark = pytest.mark.gap


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
def test_gap(phase, mode, benchmark, bench_model, djinn_client, prompt_ids, collectors, progress, pytestconfig,
             ledger):
    benchmark.group = f"gap-{phase}-{bench_model.name}"
    remote = bench_model.load(mode, djinn_client)
    new_tokens, trials, warmup = astuple(run_plan(
        mode, bench_model.weight_bytes, pytestconfig, new_tokens=NEW_TOKENS[phase],
        runs=pytestconfig.getoption("--djinn-gap-trials"), warmup=1))
    outputs = []

    def trial():
        tokens = remote.generate(prompt_ids, max_new_tokens=new_tokens)
        outputs.append((tokens, remote.last_stats))

    for _ in range(warmup):
        remote.generate(prompt_ids, max_new_tokens=new_tokens)
    with collectors.region(watch_wire=mode != "local") as telemetry:
        benchmark.pedantic(trial, rounds=trials, warmup_rounds=0, iterations=1)

    latency = Spread.of([stats.total_ms / 1e3 for _, stats in outputs])
    network = Spread.of([float(stats.bytes_sent + stats.bytes_received) for _, stats in outputs])
    sm = Spread.of([s.sm_util_pct for s in telemetry.nvml.samples]) if telemetry.nvml is not None else None
    # The capture's total is split evenly between trials, which carry the same bytes.
    captured = telemetry.wire.wire_bytes / trials if telemetry.wire is not None else None
    row = {
        "experiment": "gap", "phase": phase, "mode": mode, "model": bench_model.name, "trials": trials,
        "new_tokens": new_tokens, "latency_s_median": latency.median, "latency_s_q1": latency.q1,
        "latency_s_q3": latency.q3, "network_bytes_median": network.median, "network_bytes_q1": network.q1,
        "network_bytes_q3": network.q3, "wire_capture_bytes_mean": captured,
        "gpu_sm_util_pct_median": sm.median if sm else None, "gpu_sm_util_pct_q1": sm.q1 if sm else None,
        "gpu_sm_util_pct_q3": sm.q3 if sm else None,
        "exact": {"network_bytes_median": network.median, "new_tokens": new_tokens},
    }
    benchmark.extra_info.update(row)
    ledger.record(LEDGER, (phase, mode), (row, GapResult(phase, mode, tuple(map(tuple, outputs[0][0].tolist())),
                                                          network.median)))
    progress(f"{latency.median * 1e3:.1f} ms, {network.median:.0f} B on the wire")
    if captured is not None and mode != "local":
        # The capture sees every TCP byte of the server's port; the transport counts what it framed.
        assert captured >= statistics.fmean(s.bytes_sent + s.bytes_received for _, s in outputs), \
            "the wire cannot carry fewer bytes than were framed"


def test_gap_table(bench_model, results_writer, progress, ledger):
    held = ledger.results(LEDGER)
    if not held:
        pytest.skip("no phase or mode of the gap was measured in this session")
    from benchmarks.report import write_gap_table

    rows = [held[(p, m)][0] for p in PHASES for m in MODES if (p, m) in held]
    paths = write_gap_table(rows, results_writer.root / "gap" / results_writer.stamp)
    for line in paths.markdown.read_text().splitlines():
        progress(line)
    verdict = gap_criteria({key: result for key, (_, result) in held.items()})
    results_writer.write(f"gap/{results_writer.stamp}/verdict.json", verdict.as_dict())
    assert verdict.passed, "\n" + verdict.summary()
