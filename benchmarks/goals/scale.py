"""The scale experiment's goals (issue 21): a pool of N servers, one GPU each, decodes at least
0.9 x N x one server's aggregate tokens/s, with every client's tokens the same whatever the
pool's size, and its sessions spread evenly over the servers.

Each pool size runs several measured rounds (every client decodes the same number of tokens
per round); the efficiency is the ratio of the rounds' median aggregate tokens/s to one
server's, over N, judged on its bootstrap interval.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from benchmarks.stats import RatioEstimate, unpaired_ratio
from benchmarks.verdict import Check, Verdict, at_least, exact, skipped

MIN_EFFICIENCY = 0.9  # the bound: aggregate on N GPUs >= 0.9 x N x one GPU's


@dataclass(frozen=True)
class ScalePoint:
    servers: int
    clients: int
    tokens_per_s: tuple[float, ...]  # the pool's aggregate, one per measured round
    p99_token_ms: float  # over every decode step of every client and round
    sessions_per_server: tuple[int, ...]  # where placement put the clients' sessions
    token_digests: tuple[str, ...]  # client i's decoded tokens, digested


def efficiency(point: ScalePoint, single: ScalePoint) -> RatioEstimate:
    """point's aggregate tokens/s over N x one server's: 1.0 is linear scaling."""
    ratio = unpaired_ratio(point.tokens_per_s, single.tokens_per_s)
    n = point.servers / single.servers
    return replace(ratio, ratio=ratio.ratio / n, low=ratio.low / n, high=ratio.high / n)


def _balance(point: ScalePoint) -> Check:
    spread = max(point.sessions_per_server) - min(point.sessions_per_server)
    return exact(f"sessions_even_N{point.servers}", spread <= 1,
                 f"sessions_even_N{point.servers}: {list(point.sessions_per_server)} sessions per server",
                 list(point.sessions_per_server))


def _same_tokens(points: Sequence[ScalePoint]) -> Check:
    """Client i decodes the same prompt at every pool size: its tokens may not depend on where it ran."""
    common = min(len(p.token_digests) for p in points)
    differ = sorted({i for p in points for i in range(common) if p.token_digests[i] != points[0].token_digests[i]})
    return exact("tokens_same_at_every_pool_size", not differ,
                 f"tokens_same_at_every_pool_size: {common - len(differ)}/{common} clients"
                 + (f"; differ for clients {differ}" if differ else ""), differ)


def scale_criteria(points: Sequence[ScalePoint], on_gpu: bool) -> Verdict:
    if not points:
        return Verdict("scale", (skipped("scale", "no pool size ran"),))
    by_size = {p.servers: p for p in points}
    checks = [_same_tokens(points), *(_balance(p) for p in points)]
    single = by_size.get(1)
    applies = None if on_gpu else "the bound is for one GPU per server; CPU servers share the host's cores"
    for point in sorted(points, key=lambda p: p.servers):
        if point.servers == 1:
            continue
        name = f"scale_efficiency_N{point.servers}"
        if single is None:
            checks.append(skipped(name, "needs the one-server run beside it"))
            continue
        checks.append(at_least(name, efficiency(point, single), MIN_EFFICIENCY, applies=applies))
    return Verdict("scale", tuple(checks))
