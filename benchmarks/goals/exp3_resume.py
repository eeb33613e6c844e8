"""Experiment 3's resume goals (seed 004): bit-identical resume at every layer, steering that
moves the output, and a restore that costs what a manual offload costs.

A point's baselines run back to back (test_exp3_resume.run_order), so its ratios compare
rounds seconds apart; each ratio is judged on its bootstrap interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from benchmarks.stats import unpaired_ratio
from benchmarks.verdict import Check, Verdict, at_most, exact, skipped

# The goals, on a GPU.
MAX_DJINN_VS_MANUAL = 1.1
MAX_DJINN_VS_RECOMPUTE = 1.0  # past the first few layers, resuming beats running layers 0..N again
FIRST_FEW_LAYERS = 5


@dataclass(frozen=True)
class Identity:
    layers_checked: int
    layers_mismatched: tuple[int, ...]
    token_accuracy: float
    steering_relative_change: float


@dataclass(frozen=True)
class ResumePoint:
    baseline: str  # recompute | manual_offload | djinn_resume
    seq_len: int
    layer: int
    ready_ms: tuple[float, ...]  # one per measured round


def _identity_checks(identity: Identity | None) -> list[Check]:
    if identity is None:
        return [skipped("resume_bit_identical", "test_breakpoint_identity did not run")]
    mismatched = list(identity.layers_mismatched)
    return [
        exact("resume_bit_identical", not mismatched,
              f"resume_bit_identical: {identity.layers_checked - len(mismatched)}/{identity.layers_checked} layers"
              + (f"; differ at {mismatched}" if mismatched else ""), mismatched),
        exact("resume_token_accuracy", identity.token_accuracy == 1.0,
              f"resume_token_accuracy: {identity.token_accuracy:.1%}", identity.token_accuracy, 1.0),
        exact("steering_changes_output", identity.steering_relative_change > 0,
              f"steering_changes_output: logits moved by {identity.steering_relative_change:.2%}",
              identity.steering_relative_change),
    ]


def exp3_resume_criteria(identity: Identity | None, points: Sequence[ResumePoint], on_gpu: bool) -> Verdict:
    checks = _identity_checks(identity)
    applies = None if on_gpu else "the latency goals are for a GPU; on a CPU the tiny model only exercises the path"
    by_key = {(p.seq_len, p.layer, p.baseline): p for p in points}
    for seq_len, layer in sorted({(p.seq_len, p.layer) for p in points}):
        djinn = by_key.get((seq_len, layer, "djinn_resume"))
        if djinn is None:
            continue
        for other, bound in (("manual_offload", MAX_DJINN_VS_MANUAL), ("recompute", MAX_DJINN_VS_RECOMPUTE)):
            base = by_key.get((seq_len, layer, other))
            if base is None or (other == "recompute" and layer < FIRST_FEW_LAYERS):
                continue
            checks.append(at_most(f"djinn_resume_vs_{other}_S{seq_len}_L{layer}",
                                  unpaired_ratio(djinn.ready_ms, base.ready_ms), bound, applies=applies))
    return Verdict("exp3_resume", tuple(checks))
