"""Where a pool puts a model and a session: pure functions of what the pool knows.

A model goes to the servers that rendezvous hashing picks for its fingerprint (each server
scored by a hash of the fingerprint and its address, the highest `replicas` taken): every
client computes the same servers on its own, with no coordinator, and when a server leaves
only the models it held move. A session goes to the least-loaded server holding its model
(Ray Serve's multiplexed routing does the same: a replica that has the model loaded, the
least busy first) and stays there: its KV cache lives on that server alone.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class PlacementPolicy:
    """How many servers hold each model a client uploads; None: every server of the pool.

    Replicating everywhere lets a session go to any server (the most even load, and a model
    survives the loss of all but one server) at the price of each server's memory; one
    replica per model spreads several models over the pool. A model a server loaded itself
    (`djinn-server --model`) is held where it was loaded, whatever the policy.
    """
    replicas: int | None = None

    def __post_init__(self):
        if self.replicas is not None and (isinstance(self.replicas, bool) or not isinstance(self.replicas, int)
                                          or self.replicas < 1):
            raise ValueError(f"replicas must be a positive int or None (every server), got {self.replicas!r}")


def _score(fingerprint: str, address: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{fingerprint}|{address}".encode(), digest_size=8).digest(), "big")


def model_holders(fingerprint: str, members: Sequence[str], replicas: int | None) -> list[str]:
    """The members that hold `fingerprint` under the policy, highest score first."""
    if not members:
        raise ValueError("a pool with no live server cannot hold a model")
    ranked = sorted(members, key=lambda address: _score(fingerprint, address), reverse=True)
    return ranked if replicas is None else ranked[:replicas]


def least_loaded(loads: Mapping[str, int], rng: random.Random) -> str:
    """The server with the fewest open sessions; a tie broken at random, so that clients
    opening sessions at the same moment (each seeing the same loads) spread over the tie."""
    if not loads:
        raise ValueError("no server to place a session on")
    fewest = min(loads.values())
    return rng.choice(sorted(a for a, n in loads.items() if n == fewest))
