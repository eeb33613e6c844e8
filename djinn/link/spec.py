"""What an emulated link is: its rate, round trip, MTU and how its delay is made.

`parse_link_spec("25gbit,rtt=50us")` reads the form `--djinn-link` takes:
``RATE[,rtt=TIME][,mtu=BYTES][,gso=on|off][,delay=auto|netem|userspace]``, with tc's units
(``bit kbit mbit gbit``, SI: 1gbit = 10^9 bit/s) and times in ``ns us ms s``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from djinn.errors import DjinnError

RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
# tbf's rate travels as a u32 of bytes per second (pyroute2 writes no TCA_TBF_RATE64): 34.3 Gbit/s.
MAX_RATE_BPS = (2**32 - 1) * 8
# A rate below this makes even one jumbo frame take milliseconds: a typo rather than a link.
MIN_RATE_BPS = 10**6
# A one-way delay above this is not a datacenter link (and netem's tick field would overflow well above).
MAX_RTT_S = 10.0
DEFAULT_MTU = 1500  # Ethernet's
MIN_MTU, MAX_MTU = 576, 65535  # IPv4's minimum datagram; veth's largest MTU
DELAY_KINDS = ("auto", "netem", "userspace")

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE = re.compile(_NUMBER + r"\s*([a-zA-Z]+)")
_TIME = re.compile(_NUMBER + r"\s*([a-zA-Zµ]*)")


class LinkSpecError(DjinnError, ValueError):
    """A --djinn-link spec that does not parse, naming the part that was wrong."""


@dataclass(frozen=True)
class LinkSpec:
    rate_bps: int  # shaped rate each way, bits per second of Ethernet frames
    rtt_s: float = 0.0  # added round trip: half on each direction's egress
    mtu: int = DEFAULT_MTU
    # gso on: the stack hands the link 64 KiB super-frames, as to a NIC with TSO (the shapers still
    # count every segment's headers); off: MTU-sized frames all the way, as a NIC without offloads,
    # at a per-packet cost the 2-core machine cannot pay at 1 Gbit/s.
    gso: bool = True
    delay: str = "auto"  # netem in the kernel, or the user-space delay line; auto: netem where it exists

    def __post_init__(self) -> None:
        if not MIN_RATE_BPS <= self.rate_bps <= MAX_RATE_BPS:
            raise LinkSpecError(f"link rate {self.rate_bps} bit/s outside {MIN_RATE_BPS:.0e}..{MAX_RATE_BPS:.4g} "
                                f"(tbf takes a 32-bit byte rate: at most 34.3 Gbit/s)")
        if not 0 <= self.rtt_s <= MAX_RTT_S:
            raise LinkSpecError(f"link rtt {self.rtt_s} s outside 0..{MAX_RTT_S:g} s")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise LinkSpecError(f"link mtu {self.mtu} outside {MIN_MTU}..{MAX_MTU}")
        if self.delay not in DELAY_KINDS:
            raise LinkSpecError(f"link delay {self.delay!r}: expected one of {', '.join(DELAY_KINDS)}")

    @property
    def one_way_delay_s(self) -> float:
        return self.rtt_s / 2

    @property
    def rate_bytes_per_s(self) -> float:
        return self.rate_bps / 8

    @property
    def bdp_bytes(self) -> int:
        """Bandwidth-delay product: the bytes in flight that fill the link."""
        return int(self.rate_bytes_per_s * self.rtt_s)

    def with_rtt(self, rtt_s: float) -> "LinkSpec":
        return LinkSpec(self.rate_bps, rtt_s, self.mtu, self.gso, self.delay)

    def __str__(self) -> str:
        parts = [format_rate(self.rate_bps), f"rtt={format_time(self.rtt_s)}"]
        if self.mtu != DEFAULT_MTU:
            parts.append(f"mtu={self.mtu}")
        if not self.gso:
            parts.append("gso=off")
        if self.delay != "auto":
            parts.append(f"delay={self.delay}")
        return ",".join(parts)


def format_rate(bps: int) -> str:
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bps % RATE_UNITS[unit] == 0:
            return f"{bps // RATE_UNITS[unit]}{unit}"
    return f"{bps}bit"


def format_time(seconds: float) -> str:
    if seconds == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds * 1e9:g}ns"


def parse_rate(text: str) -> int:
    match = _RATE.fullmatch(text.strip())
    unit = match.group(2).lower() if match else None
    if match is None or unit not in RATE_UNITS:
        raise LinkSpecError(f"link rate {text!r}: expected a number and one of {', '.join(RATE_UNITS)} "
                            f"(e.g. 25gbit)")
    return round(float(match.group(1)) * RATE_UNITS[unit])


def parse_time(text: str, what: str) -> float:
    match = _TIME.fullmatch(text.strip())
    if match is None or (match.group(2) not in TIME_UNITS and not (match.group(2) == "" and float(match.group(1)) == 0)):
        raise LinkSpecError(f"link {what} {text!r}: expected a number and one of ns, us, ms, s (e.g. 50us), or 0")
    return float(match.group(1)) * TIME_UNITS.get(match.group(2), 0.0)


def parse_link_spec(text: str) -> LinkSpec:
    """`RATE[,rtt=TIME][,mtu=BYTES][,gso=on|off][,delay=auto|netem|userspace]` -> LinkSpec; LinkSpecError
    names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise LinkSpecError("empty link spec: expected RATE[,rtt=TIME][,mtu=BYTES][,delay=KIND], e.g. 25gbit,rtt=50us")
    rate_text, *options = [part.strip() for part in text.split(",")]
    fields: dict = {"rate_bps": parse_rate(rate_text)}
    seen: set[str] = set()
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise LinkSpecError(f"link spec {text!r}: option {option!r} is not KEY=VALUE")
        if key in seen:
            raise LinkSpecError(f"link spec {text!r}: {key} given twice")
        seen.add(key)
        if key == "rtt":
            fields["rtt_s"] = parse_time(value, "rtt")
        elif key == "mtu":
            if not value.strip().isdigit():
                raise LinkSpecError(f"link mtu {value!r}: expected a whole number of bytes")
            fields["mtu"] = int(value)
        elif key == "gso":
            if value.strip().lower() not in ("on", "off"):
                raise LinkSpecError(f"link gso {value!r}: expected on or off")
            fields["gso"] = value.strip().lower() == "on"
        elif key == "delay":
            fields["delay"] = value.strip().lower()
        else:
            raise LinkSpecError(f"link spec {text!r}: unknown option {key!r} (expected rtt, mtu, gso or delay)")
    return LinkSpec(**fields)
