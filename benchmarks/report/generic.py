"""Any other group (ring buffer, exp3, transport, ...): median times and bandwidth per benchmark."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from benchmarks.report.formatting import (BANDWIDTH_KEYS, REASON_SUFFIX, Benchmark, _cell, _colors, _flatten,
                                          _label_bars, _lower_err, _markdown_table, _median_iqr, _reason_notes, _save,
                                          _sig, _time_unit, _value_axis, needs_log)

def plot_group_times(runs: Sequence[Benchmark], path: Path) -> Path:
    labels = [b.label for b in runs]
    if len(set(labels)) < len(labels):
        labels = [b.name for b in runs]
    medians = [b.stats.get("median") for b in runs]
    unit, scale = _time_unit(max((m for m in medians if m is not None), default=1.0))
    values = [m * scale if m is not None else 0.0 for m in medians]
    q1 = [b.stats.get("q1") for b in runs]
    q3 = [b.stats.get("q3") for b in runs]
    has_iqr = all(a is not None and c is not None for a, c in zip(q1, q3))
    log = needs_log(values)
    fig = Figure(figsize=(9, max(2.6, 0.55 * len(runs) + 1.6)))
    ax = fig.add_subplot()
    ys = list(range(len(runs)))
    xerr = None
    if has_iqr:
        low = [max(0.0, v - a * scale) for v, a in zip(values, q1)]
        xerr = [_lower_err(values, low, log), [max(0.0, c * scale - v) for v, c in zip(values, q3)]]
    ax.barh(ys, values, color=_colors(labels), xerr=xerr, capsize=3, error_kw={"elinewidth": 1})
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()
    _value_axis(ax, values + ([v + e for v, e in zip(values, xerr[1])] if xerr else []), log=log, horizontal=True)
    ends = [v + e for v, e in zip(values, xerr[1])] if xerr else values  # labels clear of the whiskers
    _label_bars(ax, ys, ends, [f"{_sig(v)} {unit}" if m is not None else "n/a" for v, m in zip(values, medians)],
                horizontal=True)
    ax.set_xlabel(f"median time per round ({unit}" + (", log scale)" if log else ")"))
    ax.set_title(f"{runs[0].group}: median time per benchmark")
    rounds = sorted({b.stats.get("rounds") for b in runs if b.stats.get("rounds")})
    return _save(fig, path, f"pytest-benchmark rounds: {', '.join(map(str, rounds)) or '?'}"
                            + ("; whiskers: interquartile range" if has_iqr else ""))


def plot_group_bandwidth(runs: Sequence[Benchmark], path: Path) -> Path:
    runs = [b for b in runs if b.bandwidth_gbps is not None]
    labels = [b.label for b in runs]
    values = [b.bandwidth_gbps for b in runs]
    log = needs_log(values)
    fig = Figure(figsize=(max(6.5, 1.6 * len(runs) + 2), 4.6))
    ax = fig.add_subplot()
    xs = list(range(len(runs)))
    ax.bar(xs, values, color=_colors(labels))
    _value_axis(ax, values, log=log)
    _label_bars(ax, xs, values, [f"{_sig(v)} GB/s" for v in values])
    ax.set_xticks(xs, labels, rotation=15 if len(runs) > 4 else 0)
    ax.set_ylabel("bandwidth (GB/s, decimal" + (", log scale)" if log else ")"))
    ax.set_title(f"{runs[0].group}: bandwidth per baseline")
    return _save(fig, path, "from extra_info " + "/".join(BANDWIDTH_KEYS))


def _generic_markdown(runs: Sequence[Benchmark]) -> str:
    keys = [k for b in runs for k in _flatten(b.extra) if not k.endswith(REASON_SUFFIX)]
    keys = list(dict.fromkeys(keys))
    header = ["Benchmark", "Median [IQR] (ms)", "Rounds", *keys]
    rows = ([b.name, _median_iqr(b.stat_ms("median"), b.stat_ms("q1"), b.stat_ms("q3")),
             _cell(b.stats.get("rounds")), *(_cell(_flatten(b.extra).get(k)) for k in keys)] for b in runs)
    return "\n".join([_markdown_table(header, rows), "", *_reason_notes(runs)]).rstrip()


