"""How many tokens and runs each baseline gets, one rule for every experiment.

semantic_blind ships the whole model every token: 13.5 GB a token for the 7B shape,
about 10 s on loopback. Its per-token cost is the same for 3 tokens as for 50, so it
runs 3 tokens on every model (the 2-core machine's main job spent half its time on
blind's 50) and, on models over a gigabyte, 2 runs (both overridable); its tokens are
still checked against the native prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

LARGE_MODEL_BYTES = 1 << 30
BLIND_TOKENS = 3
BLIND_RUNS_LARGE = 2
BLIND_WARMUP_LARGE = 1
BLIND_MODES = ("semantic_blind", "naive")


@dataclass(frozen=True)
class RunPlan:
    new_tokens: int
    runs: int
    warmup: int


def run_plan(mode: str, weight_bytes: int, config, *, new_tokens: int, runs: int, warmup: int) -> RunPlan:
    if mode not in BLIND_MODES:
        return RunPlan(new_tokens, runs, warmup)
    large = weight_bytes > LARGE_MODEL_BYTES
    tokens = config.getoption("--djinn-blind-tokens") or BLIND_TOKENS
    blind_runs = config.getoption("--djinn-blind-runs") or (min(BLIND_RUNS_LARGE, runs) if large else runs)
    return RunPlan(min(tokens, new_tokens), blind_runs, min(BLIND_WARMUP_LARGE, warmup) if large else warmup)
