"""djinn-compare on synthetic pytest-benchmark JSON: exact metrics, paired and absolute timings."""
from __future__ import annotations

import json

import numpy as np

from benchmarks.compare import Finding, compare_runs, main

THREADS = {"cores": 2, "client_threads": 1, "server_threads": 1}
KERNELS = {"pytest": {"deterministic": True}}


def bench(name: str, rounds, *, reference=None, exact=None, kernels=KERNELS) -> dict:
    extra = {"exact": exact or {}, "kernels": kernels}
    if reference is not None:
        extra.update(paired_reference="native_pytorch", target_step_ms_median_per_round=list(rounds),
                     reference_step_ms_median_per_round=list(reference))
    return {"name": name, "fullname": f"benchmarks/x.py::{name}", "stats": {"data": list(rounds)}, "extra_info": extra}


def run(*benchmarks, threads=THREADS) -> dict:
    return {"machine_info": {"djinn_threads": threads}, "benchmarks": list(benchmarks)}


def samples(seed: int, median: float, n: int = 25, host=None) -> np.ndarray:
    r = np.random.default_rng(seed)
    return median * (host if host is not None else 1.0) * r.normal(1, 0.03, n)


def host_drift(seed: int, slow: float) -> np.ndarray:
    """A shared host: a share of the rounds run `slow` times slower, the same for both sides."""
    return np.where(np.random.default_rng(seed).random(25) < 0.4, slow, 1.0)


def finding(a: dict, b: dict) -> Finding:
    (result,) = compare_runs(a, b)
    return result.finding


def test_same_code_on_a_drifting_host_raises_no_alarm():
    a_host, b_host = host_drift(1, 1.3), host_drift(2, 1.9)  # B ran while the host was much busier
    a = run(bench("t", samples(3, 1.1, host=a_host), reference=samples(4, 1.0, host=a_host)))
    b = run(bench("t", samples(5, 1.1, host=b_host), reference=samples(6, 1.0, host=b_host)))
    assert finding(a, b) is Finding.OK


def test_a_25_percent_slowdown_of_a_paired_benchmark_is_caught_through_the_drift():
    a_host, b_host = host_drift(1, 1.3), host_drift(2, 1.9)
    a = run(bench("t", samples(3, 1.1, host=a_host), reference=samples(4, 1.0, host=a_host)))
    b = run(bench("t", samples(5, 1.1 * 1.25, host=b_host), reference=samples(6, 1.0, host=b_host)))
    (result,) = compare_runs(a, b)
    assert result.finding is Finding.REGRESSED and "whole interval lies above 1.05" in result.message


def test_paired_slowdown_within_tolerance_is_ok():
    a = run(bench("t", samples(3, 1.1), reference=samples(4, 1.0)))
    b = run(bench("t", samples(5, 1.1 * 1.02), reference=samples(6, 1.0)))
    assert finding(a, b) is Finding.OK


def test_absolute_timings_are_judged_with_the_loose_tolerance():
    a = run(bench("t", samples(3, 1.0)))
    assert finding(a, run(bench("t", samples(5, 1.7)))) is Finding.OK, "a shared host drifts this much"
    assert finding(a, run(bench("t", samples(5, 2.6)))) is Finding.REGRESSED


def test_exact_metrics_must_be_equal():
    a = run(bench("t", samples(3, 1.0), exact={"bytes_per_token_sent": 40.0, "tokens_sha256": "ab"}))
    b = run(bench("t", samples(3, 1.0), exact={"bytes_per_token_sent": 41.0, "tokens_sha256": "ab"}))
    (result,) = compare_runs(a, b)
    assert result.finding is Finding.EXACT_CHANGED and "bytes_per_token_sent: 40.0 -> 41.0" in result.message


def test_runs_in_different_configurations_are_incomparable():
    a = run(bench("t", samples(3, 1.0)))
    b = run(bench("t", samples(3, 1.0)), threads={**THREADS, "client_threads": 2})
    assert finding(a, b) is Finding.INCOMPARABLE
    c = run(bench("t", samples(3, 1.0), kernels={"pytest": {"deterministic": False}}))
    assert finding(a, c) is Finding.INCOMPARABLE


def test_cli_exits_non_zero_on_an_alarm_and_names_the_count(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(bench("t", samples(3, 1.0)), bench("only_a", samples(3, 1.0)))))
    b.write_text(json.dumps(run(bench("t", samples(5, 3.0)))))
    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "ONLY_IN_ONE" in out and out.strip().endswith(f"({a} -> {b})")
    assert "1 alarm(s) in 2 benchmarks" in out
