"""An emulated network link: the seeds' two hosts on one machine.

`LinkSpec` is what a link is (`parse_link_spec("25gbit,rtt=50us")`); `EmulatedLink` builds it
(network namespaces, a veth pair, tc shaping, all through pyroute2) and tears it down;
`delay_line` is the user-space delay element used where the kernel has no netem.
"""
from djinn.link.spec import LinkSpec, LinkSpecError, parse_link_spec

__all__ = ["LinkSpec", "LinkSpecError", "parse_link_spec"]
