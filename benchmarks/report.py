"""pytest-benchmark JSON → results.csv, summary.md, the gap table and PNG figures.

    python -m benchmarks.report out.json [--out-dir DIR]    # or: djinn-report out.json

Writes into DIR (default `reports/<json stem>/`):
- `results.csv`: one row per benchmark; its stats in ms and every scalar of extra_info.
- `summary.md`: a table per experiment present (also printed).
- exp2.1 (seed 000), per group (model × batch size): `6a` per-token latency, `6b` bytes
  per token each way, `6c` GPU SM and memory-bandwidth utilisation, `6d` the
  queue / compute / transfer split.
- the semantic gap (seeds 001/002): `gap_table.csv`, `gap_table.md` in the seed's
  columns and `gap.png`; `write_gap_table` is the same code for the gap benchmark.
- any other group (ring buffer, exp3, transport, ...): the median time per benchmark,
  and the bandwidth per baseline where extra_info has one.

Figures are drawn on `matplotlib.figure.Figure` (Agg) without pyplot, so importing
this module changes no global backend in a test process.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence, TypedDict

from matplotlib.figure import Figure

LOG_SPAN = 30.0  # max/min beyond which a value axis goes logarithmic
STAT_KEYS = ("mean", "median", "stddev", "min", "max")  # pytest-benchmark keeps seconds; we write ms
BANDWIDTH_KEYS = ("bandwidth_gbps", "gbps_median")  # ring buffer / transport name it differently
SERIES_KEYS = ("baseline", "peer", "mode")  # what a bar of a generic group is called, first found
REASON_SUFFIX = "_unavailable"  # extra_info keys that say why a collector did not run
NO_GPU_NOTE = "no GPU telemetry (CPU run)"
DPI = 130

EXP2_1 = "exp2_1"
GAP = "gap"
EXP2_1_SPLIT = ("queue_ms_per_run_mean", "compute_ms_per_run_mean", "transfer_ms_per_run_mean")
SPLIT_COLORS = ("#c9c9c9", "#4c72b0", "#dd8452")

# The seeds' table (001, 002): its row order and the names it prints.
GAP_PHASES = ("prefill", "decode")
GAP_MODES = {"local": "LOCAL", "naive": "NAÏVE-REMOTE", "remote_cache": "REMOTE-CACHE",
             "sys_simulated": "SYS (SIMULATED)"}
# "New tokens" is beyond the seed's columns: semantic_blind's decode runs fewer tokens on
# multi-GB models (benchmarks/plans.py), and the row must say so.
GAP_COLUMNS = ("Phase", "Mode", "New tokens", "Latency (s) median [IQR]", "Network Bytes median [IQR]",
               "GPU Util (%) median [IQR]")
GAP_WIRE_COLUMN = "Wire Bytes (capture)"
GAP_RAW = ("phase", "mode", "trials", "new_tokens", "latency_s_median", "latency_s_q1", "latency_s_q3",
           "network_bytes_median", "network_bytes_q1", "network_bytes_q3", "wire_capture_bytes_mean",
           "gpu_sm_util_pct_median", "gpu_sm_util_pct_q1", "gpu_sm_util_pct_q3")


class GapRow(TypedDict, total=False):
    """One phase × mode of the gap benchmark (its extra_info); None where not measured."""
    experiment: str  # "gap"
    phase: str  # prefill | decode
    mode: str  # local | naive | remote_cache | sys_simulated
    trials: int
    new_tokens: int
    latency_s_median: float
    latency_s_q1: float
    latency_s_q3: float
    network_bytes_median: float  # transport counters
    network_bytes_q1: float
    network_bytes_q3: float
    wire_capture_bytes_mean: float | None  # None without a capture
    gpu_sm_util_pct_median: float | None  # None on the CPU
    gpu_sm_util_pct_q1: float | None
    gpu_sm_util_pct_q3: float | None


@dataclass(frozen=True)
class Benchmark:
    """One entry of pytest-benchmark's `benchmarks` list."""
    name: str
    group: str
    stats: dict  # seconds
    extra: dict

    @classmethod
    def from_json(cls, entry: dict) -> Benchmark:
        return cls(entry["name"], entry.get("group") or "(no group)", entry.get("stats") or {},
                   entry.get("extra_info") or {})

    @property
    def experiment(self) -> str:
        if self.group.startswith(EXP2_1) and "baseline" in self.extra:
            return EXP2_1
        if self.group.startswith(GAP) or self.extra.get("experiment") == GAP:
            return GAP
        return self.group

    @property
    def label(self) -> str:
        """What a bar is called: the baseline (or peer, mode), else the test's parameter id."""
        for key in SERIES_KEYS:
            if isinstance(self.extra.get(key), str):
                return self.extra[key]
        match = re.search(r"\[(.*)\]$", self.name)
        return match.group(1) if match else self.name

    def stat_ms(self, key: str) -> float | None:
        value = self.stats.get(key)
        return value * 1e3 if isinstance(value, (int, float)) else None

    @property
    def bandwidth_gbps(self) -> float | None:
        return next((self.extra[k] for k in BANDWIDTH_KEYS if isinstance(self.extra.get(k), (int, float))), None)


class GapTablePaths(NamedTuple):
    csv: Path
    markdown: Path


@dataclass(frozen=True)
class ReportPaths:
    out_dir: Path
    results_csv: Path
    summary_md: Path
    figures: tuple[Path, ...]
    gap_table_csv: Path | None = None
    gap_table_md: Path | None = None

    def written(self) -> list[Path]:
        tables = [self.results_csv, self.summary_md, self.gap_table_csv, self.gap_table_md]
        return [p for p in tables if p is not None] + list(self.figures)


# -- formatting -------------------------------------------------------------------------------
def _sig(value: float, digits: int = 3) -> str:
    """`digits` significant digits, never an exponent: 8.83, 199, 36,462,886, 0.0123."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _sig(value)
    return str(value)


def _median_iqr(median: float | None, q1: float | None, q3: float | None) -> str:
    """median [q1, q3], three significant digits each; the median alone when the spread is
    unknown or nil (one sample), never a made-up "± 0"."""
    if median is None:
        return "n/a"
    if q1 is None or q3 is None or q1 == q3:
        return _sig(median)
    return f"{_sig(median)} [{_sig(q1)}, {_sig(q3)}]"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{_sig(value / size)} {unit}"
    return f"{value:,.0f} B"


def _time_unit(max_seconds: float) -> tuple[str, float]:
    """An axis unit that keeps the numbers between ~0.1 and ~10,000."""
    if max_seconds < 1e-4:
        return "µs", 1e6
    if max_seconds < 10:
        return "ms", 1e3
    return "s", 1.0


def needs_log(values: Iterable[float | None]) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SPAN


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


# -- results.csv ---------------------------------------------------------------------------
BASE_COLUMNS = ("name", "group", *(f"{k}_ms" for k in STAT_KEYS), "rounds")


def _flatten(extra: dict, prefix: str = "") -> dict:
    """Scalars only; nested dicts become dotted keys, lists and other objects are left out."""
    flat = {}
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[f"extra.{name}" if name in BASE_COLUMNS else name] = value
    return flat


def csv_rows(benchmarks: Sequence[Benchmark]) -> tuple[list[str], list[dict]]:
    rows, columns = [], list(BASE_COLUMNS)
    for b in benchmarks:
        row = {"name": b.name, "group": b.group, **{f"{k}_ms": b.stat_ms(k) for k in STAT_KEYS},
               "rounds": b.stats.get("rounds")}
        extra = _flatten(b.extra)
        columns += [k for k in extra if k not in columns]
        rows.append({**row, **extra})
    return columns, rows


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)  # None → empty cell
    return path


# -- the gap table -------------------------------------------------------------------------
REQUIRED_GAP_KEYS = ("phase", "mode", "latency_s_median", "network_bytes_median")


def _gap_sorted(rows: Sequence[GapRow]) -> list[GapRow]:
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_GAP_KEYS if k not in row]
        if missing:
            raise ValueError(f"gap row {i} ({row.get('phase')}/{row.get('mode')}) lacks {', '.join(missing)}")
    phases, modes = list(GAP_PHASES), list(GAP_MODES)

    def order(row: GapRow) -> tuple[int, int]:
        return (phases.index(row["phase"]) if row["phase"] in phases else len(phases),
                modes.index(row["mode"]) if row["mode"] in modes else len(modes))
    return sorted(rows, key=order)  # stable: unknown phases/modes keep their order, at the end


def gap_display_rows(rows: Sequence[GapRow]) -> list[dict]:
    """The seed's columns, formatted, followed by the raw numbers."""
    out = []
    for row in _gap_sorted(rows):
        wire = row.get("wire_capture_bytes_mean")
        out.append({
            "Phase": row["phase"].capitalize(),
            "Mode": GAP_MODES.get(row["mode"], row["mode"].upper()),
            "New tokens": "n/a" if row.get("new_tokens") is None else str(row["new_tokens"]),
            "Latency (s) median [IQR]": _median_iqr(*(row.get(f"latency_s_{k}") for k in ("median", "q1", "q3"))),
            "Network Bytes median [IQR]": _median_iqr(*(row.get(f"network_bytes_{k}") for k in ("median", "q1", "q3"))),
            "GPU Util (%) median [IQR]": _median_iqr(*(row.get(f"gpu_sm_util_pct_{k}") for k in ("median", "q1", "q3"))),
            GAP_WIRE_COLUMN: "n/a" if wire is None else f"{wire:,.0f}",
            **{k: row.get(k) for k in GAP_RAW},
        })
    return out


def gap_markdown(rows: Sequence[GapRow]) -> str:
    display = gap_display_rows(rows)
    has_wire = any(r["wire_capture_bytes_mean"] is not None for r in display)
    header = [*GAP_COLUMNS, *([GAP_WIRE_COLUMN] if has_wire else [])]
    table = _markdown_table(header, ([r[c] for c in header] for r in display))
    notes = ["Network Bytes: the transport's byte counters (payload and framing, both directions)."]
    if has_wire:
        notes.append(f"{GAP_WIRE_COLUMN}: packets on the server's port, counted by the wire capture.")
    if any(r["gpu_sm_util_pct_median"] is None for r in display):
        notes.append(f"GPU Util n/a: {NO_GPU_NOTE}.")
    trials = sorted({r["trials"] for r in display if r["trials"] is not None})
    if trials:
        notes.append(f"median [first, third quartile] over {', '.join(map(str, trials))} trials.")
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes)


def write_gap_table(rows: Sequence[GapRow], out_dir: Path | str) -> GapTablePaths:
    """`gap_table.csv` and `gap_table.md` in out_dir, rows in the seed's order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    display = gap_display_rows(rows)
    csv_path = _write_csv(out_dir / "gap_table.csv", [*GAP_COLUMNS, GAP_WIRE_COLUMN, *GAP_RAW], display)
    md_path = out_dir / "gap_table.md"
    md_path.write_text("# Semantic translation gap (seeds 001/002)\n\n" + gap_markdown(rows) + "\n")
    return GapTablePaths(csv_path, md_path)


# -- figures ------------------------------------------------------------------------------
def _colors(labels: Sequence[str]) -> list:
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    return [palette[i % len(palette)] for i in range(len(labels))]


def _label_bars(ax, xs: Sequence[float], values: Sequence[float | None], texts: Sequence[str],
                horizontal: bool = False) -> None:
    """A value label at the end of each bar; bars of 0 or n/a get theirs at the axis."""
    for x, value, text in zip(xs, values, texts):
        if horizontal:
            if value:
                ax.annotate(text, (value, x), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            else:
                ax.annotate(text, (0.01, x), xycoords=ax.get_yaxis_transform(), va="center", fontsize=8)
        elif value:
            ax.annotate(text, (x, value), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8)
        else:
            ax.annotate(text, (x, 0.01), xycoords=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                        color="#555555")


def _value_axis(ax, values: Sequence[float | None], *, log: bool, horizontal: bool = False,
                top: float | None = None) -> None:
    """Log or linear, with room above the largest bar for its label."""
    positive = [v for v in values if v is not None and v > 0]
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if horizontal else (ax.set_yscale, ax.set_ylim)
    if log and positive:
        set_scale("log")
        set_lim(min(positive) / 3, max(positive) * (8 if horizontal else 4))
    else:
        set_lim(0, top if top is not None else (max(positive) * (1.3 if horizontal else 1.18) if positive else 1))
    (ax.xaxis if horizontal else ax.yaxis).grid(True, which="major", alpha=0.3)
    ax.set_axisbelow(True)


def _lower_err(values: Sequence[float], errs: Sequence[float], log: bool) -> list[float]:
    """A log axis cannot draw a bar reaching ≤ 0: clip the lower whisker to 90% of the value."""
    return [min(e, 0.9 * v) if log and v > 0 else e for v, e in zip(values, errs)]


def _save(fig: Figure, path: Path, note: str | None = None) -> Path:
    if note:
        fig.text(0.01, 0.01, note, fontsize=7.5, color="#555555", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path, dpi=DPI)
    return path


def _exp2_1_context(runs: Sequence[Benchmark]) -> str:
    first = runs[0].extra
    model, batch = first.get("model", "?"), first.get("batch_size", "?")
    prompt = first.get("prompt_tokens")
    return f"{model}, batch {batch}" + (f", {prompt}-token prompt" if prompt else "")


def _iqr_whiskers(extra: dict, prefix: str) -> tuple[float, float]:
    """(below, above) the median: the distance to the first and third quartile, 0 where unknown."""
    median, q1, q3 = (extra.get(f"{prefix}_{k}") for k in ("median", "q1", "q3"))
    if median is None or q1 is None or q3 is None:
        return 0.0, 0.0
    return max(0.0, median - q1), max(0.0, q3 - median)


def plot_exp2_1_latency(runs: Sequence[Benchmark], path: Path) -> Path:
    labels = [b.label for b in runs]
    values = [b.extra.get("per_token_ms_median") or 0.0 for b in runs]
    below, above = zip(*(_iqr_whiskers(b.extra, "per_token_ms") for b in runs)) if runs else ((), ())
    log = needs_log(values)
    fig = Figure(figsize=(max(6.5, 1.6 * len(runs) + 2), 4.8))
    ax = fig.add_subplot()
    xs = range(len(runs))
    ax.bar(xs, values, color=_colors(labels), yerr=[_lower_err(values, list(below), log), list(above)], capsize=4,
           error_kw={"elinewidth": 1, "ecolor": "#333333"})
    _value_axis(ax, [v + e for v, e in zip(values, above)] + values, log=log)
    for x, v in zip(xs, values):  # beside the whisker, not across it
        ax.annotate(f"{_sig(v)} ms" if v else "n/a", (x, v if v else 0.01), xytext=(4, 2), textcoords="offset points",
                    xycoords="data" if v else ax.get_xaxis_transform(), ha="left", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("per-token latency (ms" + (", log scale)" if log else ")"))
    ax.set_title(f"Fig. 6a: decode latency per token — {_exp2_1_context(runs)}")
    tokens = ", ".join(sorted({f"{b.extra.get('new_tokens')} tokens × {b.extra.get('runs')} runs" for b in runs}))
    return _save(fig, path, f"bars: median per-token latency ({tokens}); whiskers: first and third quartile "
                            "of the runs")


def plot_exp2_1_bytes(runs: Sequence[Benchmark], path: Path) -> Path:
    labels = [b.label for b in runs]
    sent = [b.extra.get("bytes_per_token_sent") or 0.0 for b in runs]
    received = [b.extra.get("bytes_per_token_received") or 0.0 for b in runs]
    fig = Figure(figsize=(max(7, 1.9 * len(runs) + 2), 4.8))
    ax = fig.add_subplot()
    width = 0.38
    for offset, values, name, color in ((-width / 2, sent, "client → server", "#4c72b0"),
                                        (width / 2, received, "server → client", "#dd8452")):
        xs = [i + offset for i in range(len(runs))]
        ax.bar(xs, values, width, label=name, color=color)
        _label_bars(ax, xs, values, [_bytes(v) for v in values])
    _value_axis(ax, sent + received, log=True)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("bytes per generated token (log scale)")
    ax.set_title(f"Fig. 6b: bytes on the wire per token — {_exp2_1_context(runs)}")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path, "transport counters, payload + framing, mean over the measured runs; "
                            "0 B: nothing crosses the wire (local baseline)")


def no_gpu_note(runs: Sequence[Benchmark]) -> str:
    """The CPU note, or NVML's own reason when it failed on a GPU run."""
    reasons = sorted({str(b.extra["nvml_unavailable"]) for b in runs if b.extra.get("nvml_unavailable")})
    if all("CPU" in r for r in reasons):
        return NO_GPU_NOTE
    return "no GPU telemetry\n(" + "; ".join(reasons) + ")"


def plot_exp2_1_gpu(runs: Sequence[Benchmark], path: Path) -> Path:
    labels = [b.label for b in runs]
    series = (("SM utilisation", "gpu_sm_util_pct", "#55a868"),
              ("memory-bandwidth utilisation", "gpu_membw_util_pct", "#8172b3"))
    fig = Figure(figsize=(max(7, 1.9 * len(runs) + 2), 4.8))
    ax = fig.add_subplot()
    width = 0.38
    measured, bars = False, []
    for i, (name, key, color) in enumerate(series):
        values = [b.extra.get(key) for b in runs]
        measured |= any(v is not None for v in values)
        xs = [x + (i - 0.5) * width for x in range(len(runs))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=name, color=color)
        bars.append((xs, values))
    _value_axis(ax, [100.0], log=False, top=110)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("GPU utilisation (%, NVML mean over the runs)")
    ax.set_title(f"Fig. 6c: GPU utilisation — {_exp2_1_context(runs)}")
    if measured:
        for xs, values in bars:
            _label_bars(ax, xs, [v or 0.0 for v in values], ["n/a" if v is None else f"{v:.1f}%" for v in values])
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.55, no_gpu_note(runs), transform=ax.transAxes, ha="center", va="center", fontsize=12,
                color="#555555", bbox={"boxstyle": "round", "facecolor": "#f3f3f3", "edgecolor": "#bbbbbb"})
    return _save(fig, path, "NVML samples every 20 ms over the measured runs; n/a: not measured")


def plot_exp2_1_split(runs: Sequence[Benchmark], path: Path) -> Path:
    labels = [b.label for b in runs]
    # Per generated token, so baselines that run fewer tokens (semantic_blind on big models) compare.
    parts = {key: [(b.extra.get(key) or 0.0) / (b.extra.get("new_tokens") or 1) for b in runs] for key in EXP2_1_SPLIT}
    totals = [sum(parts[k][i] for k in EXP2_1_SPLIT) for i in range(len(runs))]
    fig = Figure(figsize=(max(10, 2.6 * len(runs) + 2), 4.8))
    absolute, share = fig.subplots(1, 2)
    xs = list(range(len(runs)))
    bottoms_abs, bottoms_share = [0.0] * len(runs), [0.0] * len(runs)
    for key, color in zip(EXP2_1_SPLIT, SPLIT_COLORS):
        name = key.removesuffix("_ms")
        pct = [100 * v / t if t else 0.0 for v, t in zip(parts[key], totals)]
        absolute.bar(xs, parts[key], bottom=bottoms_abs, color=color, label=name)
        bars = share.bar(xs, pct, bottom=bottoms_share, color=color, label=name)
        share.bar_label(bars, labels=[f"{p:.0f}%" if p >= 6 else "" for p in pct], label_type="center", fontsize=8)
        bottoms_abs = [b + v for b, v in zip(bottoms_abs, parts[key])]
        bottoms_share = [b + v for b, v in zip(bottoms_share, pct)]
    _value_axis(absolute, totals, log=False)
    _label_bars(absolute, xs, totals, [f"{_sig(t)} ms" if t else "local:\nno server" for t in totals])
    _value_axis(share, [100.0], log=False, top=100)
    for ax in (absolute, share):
        ax.set_xticks(xs, labels, rotation=15)
    absolute.set_ylabel("ms per generated token (mean of the runs)")
    absolute.set_title("time per token by phase")
    share.set_ylabel("share of queue + compute + transfer (%)")
    share.set_title("share of each phase")
    share.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(f"Fig. 6d: queue / compute / transfer — {_exp2_1_context(runs)}")
    return _save(fig, path, "queue and compute: the server's timestamps; transfer: the rest of the client's wall time "
                            "(wire and (de)serialisation); each divided by the run's new tokens")


def plot_gap(rows: Sequence[GapRow], path: Path) -> Path:
    rows = _gap_sorted(rows)
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    by_key = {(r["phase"], r["mode"]): r for r in rows}
    fig = Figure(figsize=(max(11, 3.2 * len(phases) * 2), 5))
    panels = fig.subplots(1, 2)
    width = 0.8 / max(1, len(modes))
    for ax, (key, ylabel, fmt) in zip(panels, (("latency_s", "latency (s, log scale)", lambda v: f"{_sig(v)} s"),
                                               ("network_bytes", "network bytes (log scale)", _bytes))):
        everything = []
        for j, (mode, color) in enumerate(zip(modes, _colors(modes))):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(phases))]
            cells = [by_key.get((p, mode), {}) for p in phases]
            values = [c.get(f"{key}_median") or 0.0 for c in cells]
            below, above = zip(*(_iqr_whiskers(c, key) for c in cells))
            ax.bar(xs, values, width, color=color, label=GAP_MODES.get(mode, mode.upper()),
                   yerr=[_lower_err(values, list(below), True), list(above)], capsize=3, error_kw={"elinewidth": 1})
            # Each bar names its token count: naive decodes 3 tokens of a multi-GB model, not 50.
            _label_bars(ax, xs, [v + e if v else 0.0 for v, e in zip(values, above)],
                        [(fmt(v) if v else "0") + f"\n{c.get('new_tokens', '?')} tok" for v, c in zip(values, cells)])
            everything += values + [v + e for v, e in zip(values, above)]
        _value_axis(ax, everything, log=True)
        ax.set_xticks(range(len(phases)), [p.capitalize() for p in phases])
        ax.set_ylabel(ylabel)
    panels[0].set_title("wall-clock latency per phase")
    panels[1].set_title("bytes across the network per phase")
    panels[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle("Semantic translation gap: local vs remote modes (seeds 001/002)")
    trials = sorted({r.get("trials") for r in rows if r.get("trials")})
    return _save(fig, path, f"median, whiskers first and third quartile, over {', '.join(map(str, trials)) or '?'} "
                            "trials; tok: new tokens per trial; network bytes from the transport counters; 0: nothing "
                            "crossed the network")


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


# -- summary.md -------------------------------------------------------------------------------
EXP2_1_COLUMNS: tuple[tuple[str, Callable[[Benchmark], object]], ...] = (
    ("Baseline", lambda b: b.label),
    ("Tokens × runs", lambda b: f"{b.extra.get('new_tokens')} × {b.extra.get('runs')}"),
    ("Per-token (ms, median [IQR])",
     lambda b: _median_iqr(*(b.extra.get(f"per_token_ms_{k}") for k in ("median", "q1", "q3")))),
    ("Total (ms, median)", lambda b: b.extra.get("total_ms_median")),
    ("Sent (B/token)", lambda b: b.extra.get("bytes_per_token_sent")),
    ("Received (B/token)", lambda b: b.extra.get("bytes_per_token_received")),
    ("Queue / compute / transfer (ms/run)",
     lambda b: " / ".join(_cell(b.extra.get(k)) for k in EXP2_1_SPLIT)),
    ("GPU SM (%)", lambda b: b.extra.get("gpu_sm_util_pct")),
    ("GPU mem-BW (%)", lambda b: b.extra.get("gpu_membw_util_pct")),
    ("Energy (J/token, mean)", lambda b: b.extra.get("energy_j_per_token_mean")),
)


def _reason_notes(runs: Sequence[Benchmark]) -> list[str]:
    notes = {}
    for b in runs:
        for key, value in b.extra.items():
            if key.endswith(REASON_SUFFIX) and value:
                notes.setdefault(f"{key.removesuffix(REASON_SUFFIX)} not measured: {value}", []).append(b.label)
    return [f"- {note} ({', '.join(labels)})" for note, labels in notes.items()]


def _exp2_1_markdown(runs: Sequence[Benchmark]) -> str:
    table = _markdown_table([c for c, _ in EXP2_1_COLUMNS], ([_cell(f(b)) for _, f in EXP2_1_COLUMNS] for b in runs))
    return "\n".join([table, "", *_reason_notes(runs)]).rstrip()


def _generic_markdown(runs: Sequence[Benchmark]) -> str:
    keys = [k for b in runs for k in _flatten(b.extra) if not k.endswith(REASON_SUFFIX)]
    keys = list(dict.fromkeys(keys))
    header = ["Benchmark", "Median [IQR] (ms)", "Rounds", *keys]
    rows = ([b.name, _median_iqr(b.stat_ms("median"), b.stat_ms("q1"), b.stat_ms("q3")),
             _cell(b.stats.get("rounds")), *(_cell(_flatten(b.extra).get(k)) for k in keys)] for b in runs)
    return "\n".join([_markdown_table(header, rows), "", *_reason_notes(runs)]).rstrip()


def _provenance(data: dict, json_path: Path) -> str:
    """Where the numbers come from: the parts of pytest-benchmark's header the JSON has."""
    commit, machine = data.get("commit_info") or {}, data.get("machine_info") or {}
    parts = [f"Source `{json_path.name}`"]
    if data.get("datetime"):
        parts.append(f"run {data['datetime']}")
    if commit.get("id"):
        parts.append(f"commit {commit['id'][:12]}" + (" (dirty)" if commit.get("dirty") else ""))
    if machine:
        cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "?"
        parts.append(f"host {machine.get('node', '?')} ({cpu}, Python {machine.get('python_version', '?')})")
    return ", ".join(parts) + "."


# -- the report ----------------------------------------------------------------------------------
def load_benchmarks(json_path: Path | str) -> tuple[dict, list[Benchmark]]:
    try:
        data = json.loads(Path(json_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not JSON ({e}); expected pytest-benchmark's --benchmark-json output") from None
    if not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{json_path}: no 'benchmarks' list; expected pytest-benchmark's --benchmark-json output")
    return data, [Benchmark.from_json(entry) for entry in data["benchmarks"]]


def _by_group(benchmarks: Iterable[Benchmark]) -> dict[str, list[Benchmark]]:
    groups: dict[str, list[Benchmark]] = {}
    for b in benchmarks:
        groups.setdefault(b.group, []).append(b)
    return groups


def build_report(json_path: Path | str, out_dir: Path | str | None = None) -> ReportPaths:
    json_path = Path(json_path)
    data, benchmarks = load_benchmarks(json_path)
    out_dir = Path(out_dir) if out_dir is not None else Path("reports") / json_path.stem
    out_dir.mkdir(parents=True, exist_ok=True)

    columns, rows = csv_rows(benchmarks)
    results_csv = _write_csv(out_dir / "results.csv", columns, rows)
    figures: list[Path] = []
    sections = [f"# Djinn benchmark report\n\n{_provenance(data, json_path)}"]

    exp2_1 = _by_group(b for b in benchmarks if b.experiment == EXP2_1)
    if exp2_1:
        sections.append("## Experiment 2.1: LLM decode with a KV cache (seed 000)")
    for group, runs in exp2_1.items():
        slug = _slug(group)
        drawn = [plot(runs, out_dir / f"{fig}_{slug}.png") for fig, plot in (
            ("6a_latency", plot_exp2_1_latency), ("6b_bytes", plot_exp2_1_bytes),
            ("6c_gpu_util", plot_exp2_1_gpu), ("6d_split", plot_exp2_1_split))]
        figures += drawn
        images = "\n".join(f"![{p.stem}]({p.name})" for p in drawn)
        sections.append(f"### {group}\n\n{_exp2_1_markdown(runs)}\n\n{images}")

    gap_rows: list[GapRow] = [b.extra for b in benchmarks if b.experiment == GAP]  # type: ignore[misc]
    gap_csv = gap_md = None
    if gap_rows:
        gap_csv, gap_md = write_gap_table(gap_rows, out_dir)
        figures.append(plot_gap(gap_rows, out_dir / "gap.png"))
        sections.append(f"## Semantic translation gap (seeds 001/002)\n\n{gap_markdown(gap_rows)}\n\n![gap](gap.png)")

    for group, runs in _by_group(b for b in benchmarks if b.experiment not in (EXP2_1, GAP)).items():
        slug = _slug(group)
        drawn = [plot_group_times(runs, out_dir / f"{slug}_times.png")]
        if any(b.bandwidth_gbps is not None for b in runs):
            drawn.append(plot_group_bandwidth(runs, out_dir / f"{slug}_bandwidth.png"))
        figures += drawn
        images = "\n".join(f"![{p.stem}]({p.name})" for p in drawn)
        sections.append(f"## {group}\n\n{_generic_markdown(runs)}\n\n{images}")

    summary_md = out_dir / "summary.md"
    summary_md.write_text("\n\n".join(sections) + "\n")
    return ReportPaths(out_dir, results_csv, summary_md, tuple(figures), gap_csv, gap_md)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="djinn-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json_path", type=Path, help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: reports/<json stem>/")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.json_path, args.out_dir)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print("wrote:")
    for path in paths.written():
        print(f"  {path}")
    print()
    print(paths.summary_md.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
