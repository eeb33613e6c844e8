"""Experiment 2.1's figures 6a-6d and its summary table."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from matplotlib.figure import Figure

from benchmarks.report.formatting import (NO_GPU_NOTE, Benchmark, _bytes, _cell, _colors, _iqr_whiskers,
                                          _label_bars, _lower_err, _markdown_table, _median_iqr, _reason_notes, _save,
                                          _sig, _value_axis, needs_log)

EXP2_1_SPLIT = ("queue_ms_per_run_mean", "compute_ms_per_run_mean", "transfer_ms_per_run_mean")
SPLIT_COLORS = ("#c9c9c9", "#4c72b0", "#dd8452")

def _exp2_1_context(runs: Sequence[Benchmark]) -> str:
    first = runs[0].extra
    model, batch = first.get("model", "?"), first.get("batch_size", "?")
    prompt = first.get("prompt_tokens")
    return f"{model}, batch {batch}" + (f", {prompt}-token prompt" if prompt else "")


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


def _exp2_1_markdown(runs: Sequence[Benchmark]) -> str:
    table = _markdown_table([c for c, _ in EXP2_1_COLUMNS], ([_cell(f(b)) for _, f in EXP2_1_COLUMNS] for b in runs))
    return "\n".join([table, "", *_reason_notes(runs)]).rstrip()


