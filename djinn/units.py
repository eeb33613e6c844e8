"""Byte units as Djinn prints them: binary (GiB, MiB, KiB), the unit its `--*-gb` options take."""
from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def human(nbytes: float) -> str:
    """A byte count in the largest binary unit it fills: '1.30 GiB', '12.5 MiB', '4.0 KiB'."""
    if abs(nbytes) >= GIB:
        return gib(nbytes)
    if abs(nbytes) >= MIB:
        return f"{nbytes / MIB:.1f} MiB"
    return f"{nbytes / KIB:.1f} KiB"
