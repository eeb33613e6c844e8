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
- an exp3 resume or oversubscription JSON (`exp3/<stamp>-*.json`) instead: its figure,
  redrawn by `benchmarks.exp3_figures`; a multitenant JSON (`multitenant/<stamp>.json`): its
  throughput and p99 against N (`benchmarks.report.multitenant`); a link sweep's
  `link/<stamp>/sweep.json`: its figure (`benchmarks.report.link`).

The package: `formatting` (a benchmark entry, numbers, results.csv, figure helpers), `exp2_1`
(figures 6a-6d, its table), `gap` (the seeds' table and figure), `generic` (every other group);
this module assembles the report.

Figures are drawn on `matplotlib.figure.Figure` (Agg) without pyplot, so importing
this module changes no global backend in a test process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from benchmarks.exp3_figures import plot_memory_virtualization, plot_resume_crossover
from benchmarks.report.multitenant import plot_multitenant
from benchmarks.report.exp2_1 import (_exp2_1_markdown, no_gpu_note, plot_exp2_1_bytes, plot_exp2_1_gpu,
                                      plot_exp2_1_latency, plot_exp2_1_split)
from benchmarks.report.formatting import EXP2_1, GAP, Benchmark, _median_iqr, _slug, _write_csv, csv_rows, needs_log
from benchmarks.report.gap import GapRow, gap_markdown, plot_gap, write_gap_table
from benchmarks.report.generic import _generic_markdown, plot_group_bandwidth, plot_group_times
from benchmarks.report.link import plot_link_sweep

# What tests and the benchmarks use of the package, beside build_report and main.
__all__ = ["Benchmark", "ReportPaths", "_median_iqr", "build_report", "own_json_figure", "load_benchmarks", "main",
           "needs_log", "no_gpu_note", "write_gap_table"]
# exp3, multitenant and the link sweep write their own JSON (not pytest-benchmark's); djinn-report
# redraws their figures from it.
OWN_JSON_FIGURES = {"exp3_resume": plot_resume_crossover, "exp3_oversubscription": plot_memory_virtualization,
                    "multitenant": plot_multitenant, "link_sweep": plot_link_sweep}


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


def own_json_figure(json_path: Path, out_dir: Path | None) -> Path | None:
    """An exp3 or multitenant JSON's figure, redrawn; None when the file is not one of theirs."""
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    plot = OWN_JSON_FIGURES.get(data.get("experiment")) if isinstance(data, dict) else None
    if plot is None:
        return None
    out_dir = out_dir if out_dir is not None else Path("reports") / json_path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    return plot(data, out_dir / f"{json_path.stem}.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="djinn-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json_path", type=Path,
                        help="a pytest-benchmark --benchmark-json file, or an exp3 resume/oversubscription or "
                             "multitenant JSON")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: reports/<json stem>/")
    args = parser.parse_args(argv)
    if (figure := own_json_figure(args.json_path, args.out_dir)) is not None:
        print(f"wrote:\n  {figure}")
        return 0
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


