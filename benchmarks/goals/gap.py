"""The semantic translation gap's goals (seeds 001/002): every mode reproduces the local
tokens, and the bytes on the wire fall down the ladder. Both are exact: the modes run on
deterministic kernels on both sides (the servers' --deterministic, this process's region)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from benchmarks.verdict import Check, Verdict, exact, skipped

PHASES = ("prefill", "decode")
MODES = ("local", "naive", "remote_cache", "sys_simulated")  # the seeds' names, aliases of the ladder


@dataclass(frozen=True)
class GapResult:
    phase: str
    mode: str
    tokens: tuple[tuple[int, ...], ...]  # prompt + new tokens, per row
    network_bytes: float  # median over trials, both directions


def _phase_checks(phase: str, rows: Mapping[str, GapResult]) -> list[Check]:
    local = rows.get("local")
    remote = [m for m in MODES[1:] if m in rows]
    checks = []
    if local is None or not remote:
        checks.append(skipped(f"{phase}_tokens_equal_local", "local and a remote mode must both run"))
    else:
        differ = [m for m in remote if any(t != r[:len(t)] for t, r in zip(rows[m].tokens, local.tokens))]
        checks.append(exact(f"{phase}_tokens_equal_local", not differ,
                            f"{phase}: {', '.join(differ) + ' tokens differ from' if differ else 'every mode equals'} "
                            f"local's", differ))
    if len(remote) < len(MODES) - 1:
        checks.append(skipped(f"{phase}_bytes_fall", "every remote mode must run to order their bytes"))
    else:
        sent = [rows[m].network_bytes for m in MODES[1:]]
        ok = sent == sorted(sent, reverse=True)
        checks.append(exact(f"{phase}_bytes_fall", ok, f"{phase}: bytes {'fall' if ok else 'do not fall'} down the "
                            f"ladder naive -> sys_simulated: {[round(b) for b in sent]}", sent))
    return checks


def gap_criteria(results: Mapping[tuple[str, str], GapResult]) -> Verdict:
    checks: list[Check] = []
    for phase in PHASES:
        checks += _phase_checks(phase, {m: r for (p, m), r in results.items() if p == phase})
    return Verdict("gap", tuple(checks))
