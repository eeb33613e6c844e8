"""Who the servers of a pool are: a static list, or the live members of a Ray pool.

`djinn.connect` takes one address (one server, as always), or a pool: a list of addresses,
one string of them separated by commas (`DJINN_SERVER=h1:5556,h2:5556` works too), or
`ray:NAME`, the pool that `djinn.pool.ray_pool.RayPool` started under that name (its servers
are looked up through Ray; the data path is still each server's own ZeroMQ endpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

RAY_SCHEME = "ray:"


class Directory(Protocol):
    def addresses(self) -> list[str]:
        """The host:port of every server the pool has now."""

    def describe(self) -> str:
        """The pool, in words, for error messages."""


@dataclass(frozen=True)
class StaticDirectory:
    members: tuple[str, ...]

    def addresses(self) -> list[str]:
        return list(self.members)

    def describe(self) -> str:
        return f"the pool of {len(self.members)} servers {', '.join(self.members)}"


def directory_for(address: str | Sequence[str]) -> Directory | None:
    """The pool `address` names, or None when it names one server."""
    if isinstance(address, str):
        if address.startswith(RAY_SCHEME):
            from djinn.pool.ray_pool import RayDirectory  # only a Ray pool needs ray installed
            return RayDirectory(address[len(RAY_SCHEME):])
        if "," not in address:
            return None
        address = address.split(",")
    members = tuple(a.strip() for a in address)
    if not members or not all(members):
        raise ValueError(f"a pool needs at least one server address, got {list(address)!r}")
    if len(set(members)) != len(members):
        raise ValueError(f"a pool lists each server once, got {list(members)!r}")
    return StaticDirectory(members)
