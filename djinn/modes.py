"""The execution-mode ladder: one table, with the seeds' names as aliases.

Modes differ only in policy (where weights and KV live, what a decode step sends
back); the same server ops serve all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

SHIPPED_WEIGHT_PREFIX = "w."  # semantic_blind's weights in a stateless forward request, beside ids and KV


@dataclass(frozen=True)
class Mode:
    name: str
    aliases: tuple[str, ...]
    weights: str  # local | shipped (every step) | cached (uploaded once)
    kv: str  # local | shipped (both ways every step) | resident (behind a session handle)
    returns: str  # what a remote decode step sends back: logits | token
    summary: str


MODES: tuple[Mode, ...] = (
    Mode("native_pytorch", ("local",), "local", "local", "logits", "weights and KV on the local device; nothing on the wire"),
    Mode("semantic_blind", ("naive",), "shipped", "shipped", "logits",
         "stateless server: weights + token + KV in, logits + KV out, every step"),
    Mode("partially_aware", (), "cached", "shipped", "logits", "weights cached by fingerprint; KV shipped both ways"),
    Mode("remote_cache", (), "cached", "resident", "logits", "KV resident behind a handle; full logits out, uncompressed"),
    Mode("full_djinn", ("sys_simulated",), "cached", "resident", "token",
         "KV resident; the next token out, logits only when asked, compressed by kind"),
)

_BY_NAME = {name: mode for mode in MODES for name in (mode.name, *mode.aliases)}


def resolve(name: str) -> Mode:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; modes: "
                         f"{', '.join(n for m in MODES for n in (m.name, *m.aliases))}") from None


# How a session's forward runs on the server, chosen per load (`Client.load(..., decode=)`):
# `exact` is HF's eager forward, bit for bit; `fast` the server's fast path
# (djinn.server.fast_decode); `auto` the server's default (fast on CUDA unless --exact).
DECODE_CHOICES = ("auto", "fast", "exact")
