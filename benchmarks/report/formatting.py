"""The report's shared pieces: a benchmark entry, number formatting, results.csv, figure helpers."""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

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


def _reason_notes(runs: Sequence[Benchmark]) -> list[str]:
    notes = {}
    for b in runs:
        for key, value in b.extra.items():
            if key.endswith(REASON_SUFFIX) and value:
                notes.setdefault(f"{key.removesuffix(REASON_SUFFIX)} not measured: {value}", []).append(b.label)
    return [f"- {note} ({', '.join(labels)})" for note, labels in notes.items()]


def _iqr_whiskers(extra: dict, prefix: str) -> tuple[float, float]:
    """(below, above) the median: the distance to the first and third quartile, 0 where unknown."""
    median, q1, q3 = (extra.get(f"{prefix}_{k}") for k in ("median", "q1", "q3"))
    if median is None or q1 is None or q3 is None:
        return 0.0, 0.0
    return max(0.0, median - q1), max(0.0, q3 - median)
