"""Experiment 3's two figures, drawn from the JSON its benchmarks write (seed 004's Figures 6 and 7).

- `plot_resume_crossover`: resume latency against the breakpoint layer, one line per
  baseline, one column per prompt length; the top row is IO_WAIT -> ready (the state
  back on the device), the bottom row resume -> logits.
- `plot_memory_virtualization`: memory over the oversubscription run: the logical
  demand, what the server holds on the device (accounted, and as NVML sees it), what
  is paged to host, against the budget and the device's capacity.

Both take the benchmark's JSON dict, so the report module can redraw them from
`results/exp3/*.json`. Drawn on `matplotlib.figure.Figure` (Agg), no pyplot.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 130
BASELINE_STYLE = {"recompute": ("#c44e52", "o"), "manual_offload": ("#55a868", "s"), "djinn_resume": ("#4c72b0", "^")}


def _unit(max_bytes: float) -> tuple[str, float]:
    return ("GB", 1e9) if max_bytes >= 1e9 else ("MB", 1e6)


def plot_resume_crossover(data: dict, path: Path | str) -> Path:
    points = data["points"]
    seq_lens = sorted({p["seq_len"] for p in points})
    fig = Figure(figsize=(4.2 * len(seq_lens), 6.4))
    axes = fig.subplots(2, len(seq_lens), squeeze=False)
    for column, seq_len in enumerate(seq_lens):
        for row, (key, title) in enumerate((("ready_ms", "IO_WAIT → ready"), ("total_ms", "resume → logits"))):
            ax = axes[row][column]
            for baseline, (color, marker) in BASELINE_STYLE.items():
                line = sorted((p["layer"], p[key]) for p in points if p["seq_len"] == seq_len
                              and p["baseline"] == baseline and p.get(key) is not None)
                if line:
                    ax.plot([x for x, _ in line], [y for _, y in line], color=color, marker=marker, label=baseline)
            ax.set_title(f"{title}, {seq_len}-token prompt", fontsize=9)
            ax.set_xlabel("breakpoint layer")
            ax.set_ylabel("latency (ms)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if row == 0 and column == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"Resume latency vs breakpoint depth — {data['model']} ({data['environment']['device_name']})",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def plot_memory_virtualization(data: dict, path: Path | str) -> Path:
    timeline = data["timeline"]
    t = [p["t_s"] for p in timeline]
    unit, scale = _unit(max(p["demand_bytes"] for p in timeline))
    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    ax.plot(t, [p["demand_bytes"] / scale for p in timeline], color="#8c8c8c", linestyle="--",
            label="logical demand (weights + KV of every session)")
    ax.plot(t, [p["device_bytes"] / scale for p in timeline], color="#4c72b0", label="on the device (accounted)")
    ax.fill_between(t, [p["device_bytes"] / scale for p in timeline],
                    [(p["device_bytes"] + p["host_bytes"]) / scale for p in timeline], color="#dd8452", alpha=0.35,
                    label="KV paged to host")
    nvml = data.get("nvml_samples") or []
    if nvml:
        ax.plot([s["t_s"] for s in nvml], [s["mem_used_bytes"] / scale for s in nvml], color="#55a868",
                linewidth=1, label="GPU memory used (NVML)")
    ax.axhline(data["budget_bytes"] / scale, color="#c44e52", linewidth=1, label="server budget")
    if data.get("device_capacity_bytes"):
        ax.axhline(data["device_capacity_bytes"] / scale, color="black", linewidth=1, linestyle=":",
                   label="device capacity")
    eager = data.get("eager") or {}
    note = (f"PyTorch eager: out of memory at session {eager['oom_at_session']}" if eager.get("oom_at_session")
            else "PyTorch eager: no out-of-memory up to N" if eager else "")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    ax.set_title(f"Memory virtualization — {data['model']}, {data['sessions_completed']}/{data['sessions']} sessions "
                 f"completed; {data['paging']['bytes_out'] / scale:.1f} {unit} paged out"
                 + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path
