"""How many tokens and runs each baseline gets, one rule for every experiment.

semantic_blind ships the whole model every token: 13.5 GB a token for the 7B shape,
about 10 s on loopback. Its per-token cost is the same for 3 tokens as for 50, so it
runs 3 tokens on every model (the 2-core machine's main job spent half its time on
blind's 50) and, on models over a gigabyte, 2 runs (both overridable); its tokens are
still checked against the native prefix.

Every other baseline of a model over a gigabyte gets 10 measured runs after 2 discarded (the
seed's 25 + 5 stay the default under a gigabyte): on the H200 the 7B shape's exp2.1 at 25 + 5
took over 10 minutes (a 50-token run is 2.5 s eager, the interleaved pairs run twice per round),
which a lent machine's 10-minute command cannot hold beside the other experiments. Ten paired
rounds still give the ratio's bootstrap interval (benchmarks/stats.py). `--djinn-runs` and
`--djinn-warmup-runs`, when given, apply to every model.
"""
from __future__ import annotations

from dataclasses import dataclass

LARGE_MODEL_BYTES = 1 << 30
BLIND_TOKENS = 3
BLIND_RUNS_LARGE = 2
BLIND_WARMUP_LARGE = 1
BLIND_MODES = ("semantic_blind", "naive")
SEED_RUNS, SEED_WARMUP = 25, 5  # seed 000: 30 runs, the first 5 discarded
LARGE_RUNS, LARGE_WARMUP = 10, 2


@dataclass(frozen=True)
class RunPlan:
    new_tokens: int
    runs: int
    warmup: int


def measured_runs(config, weight_bytes: int) -> tuple[int, int]:
    """(runs, warmup) of a non-blind baseline: the options when given, else by the model's size."""
    large = weight_bytes > LARGE_MODEL_BYTES
    runs = config.getoption("--djinn-runs")
    warmup = config.getoption("--djinn-warmup-runs")
    return (runs if runs is not None else LARGE_RUNS if large else SEED_RUNS,
            warmup if warmup is not None else LARGE_WARMUP if large else SEED_WARMUP)


def run_plan(mode: str, weight_bytes: int, config, *, new_tokens: int, runs: int, warmup: int) -> RunPlan:
    if mode not in BLIND_MODES:
        return RunPlan(new_tokens, runs, warmup)
    large = weight_bytes > LARGE_MODEL_BYTES
    tokens = config.getoption("--djinn-blind-tokens") or BLIND_TOKENS
    blind_runs = config.getoption("--djinn-blind-runs") or (min(BLIND_RUNS_LARGE, runs) if large else runs)
    return RunPlan(min(tokens, new_tokens), blind_runs, min(BLIND_WARMUP_LARGE, warmup) if large else warmup)
