"""The semantic gap's table (seeds 001/002, the seed's columns and order) and its figure."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence, TypedDict

from matplotlib.figure import Figure

from benchmarks.report.formatting import (NO_GPU_NOTE, _bytes, _colors, _iqr_whiskers, _label_bars, _lower_err,
                                          _markdown_table, _median_iqr, _save, _sig, _value_axis, _write_csv)


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


class GapTablePaths(NamedTuple):
    csv: Path
    markdown: Path


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


