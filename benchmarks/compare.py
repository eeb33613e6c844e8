"""`djinn-compare A.json B.json`: the regression gate between two pytest-benchmark runs.

Exact metrics (each benchmark's `extra_info["exact"]`: bytes per token, token digests, pages
moved) must be equal. Timings are judged on the per-round samples pytest-benchmark stores
(`stats.data`; the suite always saves them) by the bootstrap interval of B's median over A's:
a benchmark regressed only when that whole interval lies above 1 + tolerance.

Two runs on a shared host differ by more than any regression worth catching (+46% on
identical code on the 2-core machine), so a benchmark that was interleaved with a reference
(`extra_info["paired_reference"]`, each round's median decode step of both sides) is judged on
its per-round ratio to that reference, which the host's drift cancels from, with a tight
tolerance; every other timing is judged on its absolute rounds with a loose one. Runs whose
thread pin or kernel configuration differ are not comparable, and the gate says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.stats import RatioEstimate, unpaired_ratio

# Tolerances, as fractions of A's median. The paired one leaves a 25% regression room to clear
# the ratio's own spread between runs of the same code; the absolute one is above the drift of
# the shared 2-core machine between two runs of the same code: native_pytorch's rounds moved by
# 1.76x [1.54, 2.17] from one run to the next there (and by +46% in the report).
PAIRED_TOLERANCE = 0.05
ABSOLUTE_TOLERANCE = 1.0


class Finding(str, Enum):
    OK = "ok"
    REGRESSED = "regressed"
    EXACT_CHANGED = "exact_changed"
    INCOMPARABLE = "incomparable"
    ONLY_IN_ONE = "only_in_one"


@dataclass(frozen=True)
class Comparison:
    name: str
    finding: Finding
    message: str
    estimate: RatioEstimate | None = None

    @property
    def alarm(self) -> bool:
        return self.finding in (Finding.REGRESSED, Finding.EXACT_CHANGED, Finding.INCOMPARABLE)


def _rounds(bench: dict) -> list[float] | None:
    return (bench.get("stats") or {}).get("data")


def _paired_ratios(bench: dict) -> list[float] | None:
    """Per-round target/reference (each round's median decode step), when the benchmark
    interleaved a reference with its rounds."""
    extra = bench.get("extra_info") or {}
    target, reference = extra.get("target_step_ms_median_per_round"), extra.get("reference_step_ms_median_per_round")
    if not extra.get("paired_reference") or not target or not reference or len(target) != len(reference):
        return None
    return list(np.asarray(target) / np.asarray(reference))


def _exact_changes(a: dict, b: dict) -> list[str]:
    ea, eb = (a.get("extra_info") or {}).get("exact") or {}, (b.get("extra_info") or {}).get("exact") or {}
    return [f"{k}: {ea.get(k)!r} -> {eb.get(k)!r}" for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)]


def _configuration(run: dict, bench: dict) -> dict:
    return {"threads": (run.get("machine_info") or {}).get("djinn_threads"),
            "kernels": (bench.get("extra_info") or {}).get("kernels", {}).get("pytest")}


def compare_benchmark(run_a: dict, a: dict, run_b: dict, b: dict, *, paired_tolerance: float = PAIRED_TOLERANCE,
                      absolute_tolerance: float = ABSOLUTE_TOLERANCE) -> Comparison:
    name = a["fullname"] if "fullname" in a else a["name"]
    if (conf_a := _configuration(run_a, a)) != (conf_b := _configuration(run_b, b)):
        return Comparison(name, Finding.INCOMPARABLE, f"{name}: runs differ in configuration: {conf_a} vs {conf_b}")
    if changes := _exact_changes(a, b):
        return Comparison(name, Finding.EXACT_CHANGED, f"{name}: exact metrics changed: {'; '.join(changes)}")
    pa, pb = _paired_ratios(a), _paired_ratios(b)
    if pa and pb:
        estimate, tolerance, what = unpaired_ratio(pb, pa), paired_tolerance, \
            f"per-round ratio to {a['extra_info']['paired_reference']}"
    elif _rounds(a) and _rounds(b):
        estimate, tolerance, what = unpaired_ratio(_rounds(b), _rounds(a)), absolute_tolerance, "rounds"
    else:
        return Comparison(name, Finding.OK, f"{name}: exact metrics equal; no per-round samples to compare")
    limit = 1 + tolerance
    if estimate.low > limit:
        return Comparison(name, Finding.REGRESSED, f"{name}: B/A {what} {estimate}: the whole interval lies above "
                                                   f"{limit:g}", estimate)
    return Comparison(name, Finding.OK, f"{name}: B/A {what} {estimate}, limit {limit:g}", estimate)


def compare_runs(run_a: dict, run_b: dict, **tolerances: float) -> list[Comparison]:
    by_name = [{(x.get("fullname") or x["name"]): x for x in run["benchmarks"]} for run in (run_a, run_b)]
    out = []
    for name in sorted(set(by_name[0]) | set(by_name[1])):
        if name in by_name[0] and name in by_name[1]:
            out.append(compare_benchmark(run_a, by_name[0][name], run_b, by_name[1][name], **tolerances))
        else:
            side = "A" if name in by_name[0] else "B"
            out.append(Comparison(name, Finding.ONLY_IN_ONE, f"{name}: only in {side}"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="djinn-compare", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the reference run's --benchmark-json")
    parser.add_argument("b", type=Path, help="the candidate run's --benchmark-json")
    parser.add_argument("--paired-tolerance", type=float, default=PAIRED_TOLERANCE,
                        help="allowed slowdown of a timing interleaved with a reference (fraction)")
    parser.add_argument("--absolute-tolerance", type=float, default=ABSOLUTE_TOLERANCE,
                        help="allowed slowdown of any other timing (fraction); lower it on a quiet host")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in (args.a, args.b)]
    results = compare_runs(*runs, paired_tolerance=args.paired_tolerance, absolute_tolerance=args.absolute_tolerance)
    for c in results:
        print(f"{c.finding.value.upper():13} {c.message}")
    alarms = [c for c in results if c.alarm]
    print(f"djinn-compare: {len(alarms)} alarm(s) in {len(results)} benchmarks ({args.a} -> {args.b})")
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
