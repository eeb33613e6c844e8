"""Raw results on disk: seed 000's per-baseline JSON schema, with the run's provenance.

`results/<baseline>/<timestamp>.json` holds every measured run of one baseline and
its aggregates; every file carries the device, library versions, model shape and
git commit it was measured with.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers


# `git archive` writes the commit it exports into this file (export-subst, .gitattributes): an
# exported tree, like the snapshot copied to a lent GPU, has no .git of its own, and git run in
# it would answer for whatever repository lies around it.
ARCHIVED_COMMIT = Path("benchmarks") / "source_commit.txt"


def git_commit(root: Path) -> str | None:
    """The commit the code under `root` is: the commit a `git archive` export was made from, or
    the checkout's HEAD (with -dirty when tracked files have uncommitted changes)."""
    archived = root / ARCHIVED_COMMIT
    if archived.is_file() and not (exported := archived.read_text().strip()).startswith("$Format"):
        return exported
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: str, root: Path, facts: dict | None = None) -> dict:
    """Where and with what a result was measured; `facts`: the run's threads and kernels."""
    return {
        "device": device, "device_name": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "host": platform.node(), "git_commit": git_commit(root),
        **(facts or {}),
    }


@dataclass(frozen=True)
class RunRecord:
    """One measured generation, with seed 000's field names."""
    run_id: int
    total_ms: float
    per_token_ms: float
    tokens_generated: int
    gpu_util_pct: float | None
    memory_bw_util_pct: float | None
    host_to_device_mb: float  # client -> server bytes on the wire (payload + framing)
    device_to_host_mb: float
    queue_ms: float
    compute_ms: float
    transfer_ms: float
    energy_j: float | None = None


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def aggregates(runs: list[RunRecord]) -> dict:
    totals = [r.total_ms for r in runs]
    per_token = [r.per_token_ms for r in runs]
    return {
        "mean_total_ms": statistics.fmean(totals), "p95_total_ms": percentile(totals, 95),
        "std_total_ms": statistics.stdev(totals) if len(totals) > 1 else 0.0,
        "mean_per_token_ms": statistics.fmean(per_token),
        "std_per_token_ms": statistics.stdev(per_token) if len(per_token) > 1 else 0.0,
    }


@dataclass
class ResultsWriter:
    root: Path  # the results/ folder
    repo: Path
    device: str
    facts: dict = field(default_factory=dict)  # recorded in every file's environment
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S"))
    written: list[Path] = field(default_factory=list)

    def environment(self) -> dict:
        return environment(self.device, self.repo, self.facts)

    def summary_line(self) -> str:
        """The run's last line: what it wrote, and where."""
        folders = sorted({str(p.relative_to(self.root).parent) for p in self.written})
        return f"djinn: wrote {len(self.written)} result files under {self.root}: {', '.join(folders)}"

    def baseline_runs(self, baseline: str, *, model_id: str, model_shape: dict, prompt_tokens: int,
                      new_tokens: int, batch_size: int, runs: list[RunRecord], extra: dict | None = None) -> Path:
        record = {
            "baseline": baseline, "model_id": model_id, "model_shape": model_shape,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size,
            "runs": [asdict(r) for r in runs], "aggregates": aggregates(runs),
            "environment": self.environment(), **(extra or {}),
        }
        return self.write(Path(baseline) / f"{self.stamp}.json", record)

    def write(self, relative: Path | str, data: dict) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if "environment" not in data:
            data = {**data, "environment": self.environment()}
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        self.written.append(path)
        return path
