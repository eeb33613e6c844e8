"""The link sweep's figure, drawn from the JSON `benchmarks/test_link_sweep.py` writes.

Left: per-token latency against the link's RTT: full_djinn over the link, full_djinn over
loopback and native_pytorch (medians with IQR bars), and loopback + RTT, where a decode step that
costs one round trip should lie. Right: semantic_blind's throughput over the link against the
shaped rate: each message's rate where the link delivered it (from the capture), and over whole
steps. Drawn on `matplotlib.figure.Figure` (Agg), no pyplot.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 130
SIDES = (("link", "full_djinn over the link", "#4c72b0", "o"),
         ("loopback", "full_djinn over loopback", "#55a868", "s"),
         ("native", "native_pytorch", "#8c8c8c", "^"))


def plot_link_sweep(data: dict, path: Path | str) -> Path:
    points = sorted(data["points"], key=lambda p: p["rtt_ms"])
    latency = [p for p in points if "link_step_ms_median" in p]
    blind = [p for p in points if "blind_wire_bps_median" in p]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    rtts = [p["rtt_ms"] for p in latency]
    for side, label, color, marker in SIDES:
        medians = [p[f"{side}_step_ms_median"] for p in latency]
        errors = [[m - p[f"{side}_step_ms_q1"] for m, p in zip(medians, latency)],
                  [p[f"{side}_step_ms_q3"] - m for m, p in zip(medians, latency)]]
        left.errorbar(rtts, medians, yerr=errors, color=color, marker=marker, capsize=3, label=label)
    if latency:
        left.plot(rtts, [p["loopback_step_ms_median"] + p["rtt_ms"] for p in latency], color="#4c72b0",
                  linestyle=":", label="loopback + RTT")
    left.set_xlabel("link RTT (ms)")
    left.set_ylabel("per-token latency (ms, median, IQR)")
    left.set_title(f"{data.get('model', '?')}: decode step against the link's RTT", fontsize=10)
    left.legend(fontsize=8)
    if blind:
        x = [p["rtt_ms"] for p in blind]
        medians = [p["blind_wire_bps_median"] / 1e9 for p in blind]
        errors = [[m - p["blind_wire_bps_q1"] / 1e9 for m, p in zip(medians, blind)],
                  [p["blind_wire_bps_q3"] / 1e9 - m for m, p in zip(medians, blind)]]
        right.errorbar(x, medians, yerr=errors, color="#c44e52", marker="o", capsize=3,
                       label="semantic_blind's messages, at the far end")
        if all("blind_step_bps_median" in p for p in blind):
            right.plot(x, [p["blind_step_bps_median"] / 1e9 for p in blind], color="#c44e52", marker="o",
                       linestyle=":", label="semantic_blind's whole steps")
        rate = blind[0]["rate_bps"] / 1e9
        right.axhline(rate, color="black", linestyle="--", label=f"shaped rate {rate:g} Gbit/s")
        right.axhspan(rate * 0.9, rate * 1.1, color="black", alpha=0.07, label="±10%")
        right.set_ylim(0, rate * 1.25)
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "semantic_blind did not run", ha="center", va="center", transform=right.transAxes)
    right.set_xlabel("link RTT (ms)")
    right.set_ylabel("Gbit/s of Ethernet frames (median, IQR)")
    right.set_title("semantic_blind's throughput against the shaped rate", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
