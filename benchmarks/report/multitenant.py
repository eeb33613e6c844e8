"""The multitenant experiment's figure: aggregate throughput and per-token tail latency against N.

Drawn from the JSON `benchmarks/test_multitenant.py` writes (`multitenant/<stamp>.json`), so
`djinn-report` can redraw it; on `matplotlib.figure.Figure` (Agg), no pyplot.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 130


def plot_multitenant(data: dict, path: Path | str) -> Path:
    points = sorted(data["points"], key=lambda p: p["tenants"])
    n = [p["tenants"] for p in points]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    median = [p["tokens_per_s_median"] for p in points]
    left.errorbar(n, median, yerr=[[m - p["tokens_per_s_q1"] for m, p in zip(median, points)],
                                   [p["tokens_per_s_q3"] - m for m, p in zip(median, points)]],
                  marker="o", color="#4c72b0", capsize=3, label="aggregate (median, IQR of rounds)")
    left.plot(n, [median[0] * k for k in n], linestyle=":", color="grey", label="N × (N=1)")
    left.set(xscale="log", xlabel="concurrent tenants N", ylabel="tokens/s, all tenants",
             title="Aggregate decode throughput")
    left.minorticks_off()
    left.set_xticks(n, [str(k) for k in n])
    left.legend(fontsize=8)
    for key, label, style in (("per_token_ms_p50", "per-token p50", "-"), ("per_token_ms_p99", "per-token p99", "-"),
                              ("queue_ms_p50", "server queue p50", "--"), ("queue_ms_p99", "server queue p99", "--")):
        right.plot(n, [p[key] for p in points], linestyle=style, marker="o", label=label)
    right.set(xscale="log", xlabel="concurrent tenants N", ylabel="ms", title="Per-token latency and queue time")
    right.minorticks_off()
    right.set_xticks(n, [str(k) for k in n])
    right.legend(fontsize=8)
    env = data.get("environment", {})
    fig.suptitle(f"multitenant: {data.get('model', '?')} on {env.get('device', data.get('device', '?'))}, "
                 f"{data.get('new_tokens', '?')} new tokens per tenant", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path
