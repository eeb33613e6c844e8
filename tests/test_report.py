"""The report: a synthetic pytest-benchmark JSON (exp2.1, the gap, an unknown group)
turned into results.csv, the gap table and PNG figures, with and without GPU data."""
from __future__ import annotations

import csv
import json
import math

import pytest

from benchmarks import report
from benchmarks.report import ReportPaths, build_report, write_gap_table
from benchmarks.report.gap import GAP_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINES = ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn")
GROUP = "exp2_1-decode-tiny-llama-bs1"


def _stats(median_s: float, stddev_s: float = 0.01, rounds: int = 5) -> dict:
    return {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s * 1.02, "stddev": stddev_s,
            "median": median_s, "q1": median_s * 0.95, "q3": median_s * 1.05, "iqr": median_s * 0.1,
            "rounds": rounds, "iterations": 1, "ops": 1 / median_s, "total": median_s * rounds}


def _entry(name: str, group: str, stats: dict, extra: dict, params: dict | None = None) -> dict:
    return {"group": group, "name": name, "fullname": f"benchmarks/test_x.py::{name}", "params": params or {},
            "param": None, "extra_info": extra, "options": {}, "stats": stats}


def _exp2_1(baseline: str, per_token_ms: float, sent: float, received: float, gpu: bool) -> dict:
    remote = baseline != "native_pytorch"
    extra = {
        "baseline": baseline, "model": "tiny-llama", "batch_size": 1, "prompt_tokens": 72, "new_tokens": 50,
        "runs": 5, "warmup_runs": 1, "per_token_ms_median": per_token_ms, "per_token_ms_q1": per_token_ms * 0.95,
        "per_token_ms_q3": per_token_ms * 1.1, "per_token_n": 5, "total_ms_median": per_token_ms * 51,
        "bytes_per_token_sent": sent, "bytes_per_token_received": received,
        "payload_bytes_per_token_sent": sent * 0.99, "payload_bytes_per_token_received": received * 0.99,
        "queue_ms_per_run_mean": 2.0 if remote else 0.0,
        "compute_ms_per_run_mean": per_token_ms * 40 if remote else 0.0,
        "transfer_ms_per_run_mean": per_token_ms * 8 if remote else 0.0,
        "energy_j_per_token_mean": 0.5 if gpu else None, "gpu_sm_util_pct": 71.5 if gpu else None,
        "gpu_membw_util_pct": 40.25 if gpu else None, "gpu_energy_j": 125.0 if gpu else None,
        "gpu_mem_used_max_bytes": 14 << 30 if gpu else None, "wire_payload_bytes": None, "wire_bytes": None,
        "wire_kernel_drops": None, "telemetry": {"interval_ms": 20, "samples": [1, 2]},
    }
    if not gpu:
        extra["nvml_unavailable"] = "the run is on the CPU"
    return _entry(f"test_decode[{baseline}-bs1]", GROUP, _stats(per_token_ms * 51 / 1e3), extra,
                  {"baseline": baseline, "batch_size": 1})


GAP_MODES = ("local", "naive", "remote_cache", "sys_simulated")


def _gap(phase: str, mode: str, gpu: bool) -> dict:
    slow = {"local": 1, "naive": 400, "remote_cache": 3, "sys_simulated": 2}[mode]
    nbytes = {"local": 0.0, "naive": 2.6e10, "remote_cache": 5.2e6, "sys_simulated": 1.1e3}[mode]
    tokens = {"prefill": 1, "decode": 3 if mode == "naive" else 50}[phase]
    extra = {"experiment": "gap", "phase": phase, "mode": mode, "trials": 3, "new_tokens": tokens,
             "latency_s_median": 0.0523 * slow, "latency_s_q1": 0.05 * slow, "latency_s_q3": 0.055 * slow,
             "network_bytes_median": nbytes, "network_bytes_q1": nbytes, "network_bytes_q3": nbytes,
             "wire_capture_bytes_mean": None, "gpu_sm_util_pct_median": 55.0 if gpu else None,
             "gpu_sm_util_pct_q1": 54.0 if gpu else None, "gpu_sm_util_pct_q3": 56.5 if gpu else None}
    return _entry(f"test_gap[{phase}-{mode}]", f"gap-{phase}", _stats(0.0523 * slow), extra,
                  {"phase": phase, "mode": mode})


def _benchmark_json(gpu: bool) -> dict:
    exp = [_exp2_1("native_pytorch", 8.8, 0.0, 0.0, gpu), _exp2_1("semantic_blind", 2500.0, 1.3e10, 8.3e5, gpu),
           _exp2_1("partially_aware", 55.7, 7.9e5, 8.3e5, gpu), _exp2_1("full_djinn", 9.9, 167.0, 184.0, gpu)]
    # Written in an order unlike the table's, so the table must sort.
    gap = [_gap(phase, mode, gpu) for mode in reversed(GAP_MODES) for phase in ("decode", "prefill")]
    other = [_entry(f"test_stream[{peer}]", "ring_buffer-stream-llama-2-13b", _stats(s),
                    {"experiment": "ring_buffer", "baseline": peer, "bandwidth_gbps": gbps,
                     "notes": ["a list", "left out"]})
             for peer, s, gbps in (("djinn_ring", 0.8, 21.5), ("hf_accelerate", 3.1, 5.2), ("deepspeed", 2.2, 7.9))]
    return {"machine_info": {"node": "box", "cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11.7"},
            "commit_info": {"id": "0123456789abcdef", "dirty": True}, "datetime": "2026-01-01T00:00:00",
            "version": "5.1.0", "benchmarks": exp + gap + other}


@pytest.fixture(scope="module", params=[True, False], ids=["gpu", "cpu"])
def built(request, tmp_path_factory) -> tuple[ReportPaths, dict]:
    """One report per flavour, shared by the tests that read it (figures take a second or two)."""
    data = _benchmark_json(gpu=request.param)
    folder = tmp_path_factory.mktemp("gpu" if request.param else "cpu")
    source = folder / "run.json"
    source.write_text(json.dumps(data))
    return build_report(source, folder / "report"), data


def _read_csv(path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_a_row_per_benchmark_with_stats_in_ms_and_flat_extra_info(built):
    paths, data = built
    rows = _read_csv(paths.results_csv)
    assert [r["name"] for r in rows] == [b["name"] for b in data["benchmarks"]]
    assert len(rows) == 4 + 8 + 3
    columns = list(rows[0])
    assert columns[:8] == ["name", "group", "mean_ms", "median_ms", "stddev_ms", "min_ms", "max_ms", "rounds"]
    for key in ("baseline", "per_token_ms_median", "bytes_per_token_sent", "gpu_sm_util_pct", "phase", "latency_s_median",
                "bandwidth_gbps", "telemetry.interval_ms"):
        assert key in columns, key
    assert "notes" not in columns and "telemetry.samples" not in columns  # lists are not scalars
    blind = next(r for r in rows if r["name"] == "test_decode[semantic_blind-bs1]")
    source = next(b for b in data["benchmarks"] if b["name"] == blind["name"])
    assert math.isclose(float(blind["median_ms"]), source["stats"]["median"] * 1e3)
    assert math.isclose(float(blind["stddev_ms"]), source["stats"]["stddev"] * 1e3)
    assert blind["rounds"] == "5" and blind["group"] == GROUP and blind["telemetry.interval_ms"] == "20"
    native = next(r for r in rows if r["name"] == "test_decode[native_pytorch-bs1]")
    assert native["wire_bytes"] == ""  # None → empty cell
    ring = next(r for r in rows if r["name"] == "test_stream[djinn_ring]")
    assert ring["per_token_ms_median"] == "" and float(ring["bandwidth_gbps"]) == 21.5


def test_gap_table_is_in_the_seed_order_with_display_names(built):
    paths, _ = built
    rows = _read_csv(paths.gap_table_csv)
    assert list(rows[0])[:len(GAP_COLUMNS)] == list(GAP_COLUMNS)
    assert [(r["Phase"], r["Mode"]) for r in rows] == [
        (phase, mode) for phase in ("Prefill", "Decode")
        for mode in ("LOCAL", "NAÏVE-REMOTE", "REMOTE-CACHE", "SYS (SIMULATED)")]
    local, naive = rows[0], rows[1]
    assert local["Latency (s) median [IQR]"] == "0.0523 [0.0500, 0.0550]"
    assert local["Network Bytes median [IQR]"] == "0", "no spread, no made-up ± 0"
    assert naive["Latency (s) median [IQR]"] == "20.9 [20.0, 22.0]"
    assert naive["Network Bytes median [IQR]"] == "26,000,000,000"
    assert float(naive["latency_s_median"]) == pytest.approx(0.0523 * 400)
    md = paths.gap_table_md.read_text()
    assert ("| Phase | Mode | New tokens | Latency (s) median [IQR] | Network Bytes median [IQR] | "
            "GPU Util (%) median [IQR] |" in md)
    assert local["New tokens"] == "1"
    assert [r["New tokens"] for r in rows if r["Phase"] == "Decode"] == ["50", "3", "50", "50"]
    assert md.index("| Prefill | LOCAL") < md.index("| Prefill | SYS (SIMULATED)") < md.index("| Decode | LOCAL")
    assert "Wire Bytes" not in md  # no capture in these rows
    gpu = rows[0]["gpu_sm_util_pct_median"] != ""
    assert rows[0]["GPU Util (%) median [IQR]"] == ("55.0 [54.0, 56.5]" if gpu else "n/a")


def test_every_figure_is_a_non_empty_png(built):
    paths, _ = built
    names = {p.name for p in paths.figures}
    assert {f"{fig}_{GROUP}.png" for fig in ("6a_latency", "6b_bytes", "6c_gpu_util", "6d_split")} <= names
    assert {"gap.png", "ring_buffer-stream-llama-2-13b_times.png",
            "ring_buffer-stream-llama-2-13b_bandwidth.png"} <= names
    for path in paths.figures:
        assert path.parent == paths.out_dir
        data = path.read_bytes()
        assert len(data) > 5_000 and data[:8] == PNG_MAGIC, path


def test_summary_has_a_table_per_experiment(built):
    paths, _ = built
    md = paths.summary_md.read_text()
    for heading in ("## Experiment 2.1", f"### {GROUP}", "## Semantic translation gap", "## ring_buffer-stream"):
        assert heading in md
    assert "| semantic_blind | 50 × 5 | 2,500 [2,375, 2,750] |" in md
    assert "0123456789ab (dirty)" in md
    assert ("nvml not measured: the run is on the CPU" in md) == ("n/a | n/a | n/a |" in md)


def test_cli_prints_the_paths_and_the_summary(tmp_path, capsys):
    source = tmp_path / "cpu_run.json"
    source.write_text(json.dumps(_benchmark_json(gpu=False)))
    assert report.main([str(source), "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "results.csv") in out and str(tmp_path / "out" / "gap.png") in out
    assert "# Djinn benchmark report" in out and "| Prefill | LOCAL |" in out


def test_default_out_dir_is_reports_slash_stem(tmp_path, monkeypatch):
    source = tmp_path / "nightly.json"
    source.write_text(json.dumps({"benchmarks": [_exp2_1("full_djinn", 9.9, 167.0, 184.0, gpu=False)]}))
    monkeypatch.chdir(tmp_path)
    paths = build_report(source)
    assert paths.out_dir == tmp_path.joinpath("reports", "nightly").relative_to(tmp_path)
    assert paths.gap_table_csv is None and len(paths.figures) == 4


def test_write_gap_table_for_the_gap_benchmark(tmp_path):
    rows = [_gap("decode", "sys_simulated", gpu=False)["extra_info"], _gap("prefill", "naive", gpu=False)["extra_info"],
            {**_gap("prefill", "local", gpu=False)["extra_info"], "wire_capture_bytes_mean": 1234.0}]
    csv_path, md_path = paths = write_gap_table(rows, tmp_path / "gap")
    assert (paths.csv, paths.markdown) == (tmp_path / "gap" / "gap_table.csv", tmp_path / "gap" / "gap_table.md")
    assert [(r["phase"], r["mode"]) for r in _read_csv(csv_path)] == [
        ("prefill", "local"), ("prefill", "naive"), ("decode", "sys_simulated")]
    md = md_path.read_text()
    assert "Wire Bytes (capture)" in md and "| 1,234 |" in md
    with pytest.raises(ValueError, match="gap row 0 .*latency_s_median"):
        write_gap_table([{"phase": "decode", "mode": "local", "network_bytes_median": 0}], tmp_path)


@pytest.mark.parametrize("values, log", [([8.8, 2500.0, 55.7], True), ([8.8, 199.0], False),
                                         ([0.0, 5.0, 100.0], False), ([None, 1.0], False)])
def test_log_axis_only_when_values_span_more_than_the_threshold(values, log):
    assert report.needs_log(values) is log


@pytest.mark.parametrize("median, q1, q3, text", [
    (0.1234, 0.12, 0.13, "0.123 [0.120, 0.130]"), (1_234_567.0, 1_200_000.0, 1_300_000.0, "1,234,567 [1,200,000, 1,300,000]"),
    (0.0523, 0.0523, 0.0523, "0.0523"), (5.0, None, None, "5.00"), (None, 1.0, 2.0, "n/a")])
def test_median_and_iqr_never_print_a_made_up_zero_spread(median, q1, q3, text):
    assert report._median_iqr(median, q1, q3) == text


def test_no_gpu_note_says_cpu_run_or_the_nvml_reason():
    cpu = report.Benchmark.from_json(_exp2_1("full_djinn", 9.9, 167.0, 184.0, gpu=False))
    assert report.no_gpu_note([cpu]) == "no GPU telemetry (CPU run)"
    broken = report.Benchmark.from_json({**_exp2_1("full_djinn", 9.9, 167.0, 184.0, gpu=False),
                                         "extra_info": {"nvml_unavailable": "NVML: driver not loaded"}})
    assert report.no_gpu_note([broken]) == "no GPU telemetry\n(NVML: driver not loaded)"


def test_djinn_report_redraws_an_exp3_figure_from_its_json(tmp_path, capsys):
    points = [{"baseline": b, "seq_len": 64, "layer": layer, "ready_ms": 1.0 + layer, "total_ms": 2.0 + layer}
              for b in ("recompute", "manual_offload", "djinn_resume") for layer in (1, 6)]
    path = tmp_path / "20260101T000000-resume.json"
    path.write_text(json.dumps({"experiment": "exp3_resume", "model": "tiny-llama", "points": points,
                                "environment": {"device_name": "CPU"}}))
    assert report.main([str(path), "--out-dir", str(tmp_path / "out")]) == 0
    figure = tmp_path / "out" / "20260101T000000-resume.png"
    assert figure.stat().st_size > 0 and str(figure) in capsys.readouterr().out
