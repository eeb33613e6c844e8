"""`--djinn-link`'s spec: what parses, and that what does not names the part that was wrong."""
from __future__ import annotations

import pytest

from djinn.link import LinkSpec, LinkSpecError, parse_link_spec
from djinn.link.spec import MAX_RATE_BPS, format_time, parse_time


@pytest.mark.parametrize("text, rate, rtt, mtu, gso, delay", [
    ("25gbit,rtt=50us", 25 * 10**9, 50e-6, 1500, True, "auto"),
    ("1gbit,rtt=1ms", 10**9, 1e-3, 1500, True, "auto"),
    ("1gbit", 10**9, 0.0, 1500, True, "auto"),
    ("2.5gbit,rtt=0", 25 * 10**8, 0.0, 1500, True, "auto"),
    ("100mbit, rtt=5ms, mtu=9000, gso=off, delay=userspace", 10**8, 5e-3, 9000, False, "userspace"),
    ("10GBIT,RTT=200us,delay=netem", 10**10, 200e-6, 1500, True, "netem"),
])
def test_a_spec_parses_to_its_fields(text, rate, rtt, mtu, gso, delay):
    spec = parse_link_spec(text)
    assert (spec.rate_bps, spec.mtu, spec.gso, spec.delay) == (rate, mtu, gso, delay)
    assert spec.rtt_s == pytest.approx(rtt)
    # The canonical form parses back to the same spec.
    assert parse_link_spec(str(spec)) == spec


@pytest.mark.parametrize("text, names", [
    ("", "empty"),
    ("25gbps", "'25gbps'"),
    ("fast,rtt=1ms", "'fast'"),
    ("1gbit,rtt=5", "rtt '5'"),
    ("1gbit,rtt=5parsecs", "rtt '5parsecs'"),
    ("1gbit,rtt", "'rtt' is not KEY=VALUE"),
    ("1gbit,colour=blue", "unknown option 'colour'"),
    ("1gbit,rtt=1ms,rtt=2ms", "rtt given twice"),
    ("1gbit,mtu=big", "mtu 'big'"),
    ("1gbit,mtu=100", "mtu 100"),
    ("1gbit,gso=maybe", "gso 'maybe'"),
    ("1gbit,delay=magic", "delay 'magic'"),
    ("40gbit", "34.3 Gbit/s"),
    ("10kbit", "outside"),
    ("1gbit,rtt=20s", "rtt 20.0 s outside"),
])
def test_a_bad_spec_names_what_is_wrong(text, names):
    with pytest.raises(LinkSpecError, match="link") as raised:
        parse_link_spec(text)
    assert names in str(raised.value)


def test_the_largest_rate_is_tbfs_32_bit_byte_rate():
    assert LinkSpec(MAX_RATE_BPS).rate_bps == MAX_RATE_BPS
    with pytest.raises(LinkSpecError):
        LinkSpec(MAX_RATE_BPS + 8)


def test_derived_figures_and_rtt_changes():
    spec = parse_link_spec("1gbit,rtt=1ms,mtu=9000")
    assert spec.one_way_delay_s == pytest.approx(0.5e-3)
    assert spec.bdp_bytes == 125_000
    changed = spec.with_rtt(5e-3)
    assert (changed.rtt_s, changed.rate_bps, changed.mtu) == (5e-3, spec.rate_bps, 9000)


@pytest.mark.parametrize("seconds, text", [(0, "0"), (50e-6, "50us"), (1e-3, "1ms"), (5e-3, "5ms"), (2, "2s")])
def test_times_format_and_parse_back(seconds, text):
    assert format_time(seconds) == text
    assert parse_time(text, "rtt") == pytest.approx(seconds)
