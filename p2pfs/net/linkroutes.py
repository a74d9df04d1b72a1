"""Which peer addresses sit on a directly attached link: the kernel's route tables, parsed.

Pure functions over the text of Linux's ``/proc/net/route`` and ``/proc/net/ipv6_route``;
the reading and the socket calls live in net/pathsize.py. A route with no gateway means the
peer is one link away, so the largest datagram our side of that link carries is the largest
the whole path carries. Beyond a router it is not: a hop there may have a smaller MTU, QUIC
must not lean on IP fragmentation (RFC 9000, 14), and the ICMP message that would say so is
often filtered.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Route flags (linux/route.h, linux/ipv6_route.h).
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
RTF_REJECT = 0x0200


@dataclass(frozen=True, slots=True)
class Route:
    """One usable route: where it leads, and whether through a gateway."""

    network: IPNetwork
    via_gateway: bool
    interface: str
    metric: int


def parse_ipv4_routes(text: str, byteorder: str) -> list[Route]:
    """The up, non-reject routes of ``/proc/net/route``.

    The kernel prints each address as the host-order integer of its network-order bytes, so
    ``byteorder`` (``sys.byteorder`` of the machine that wrote it) turns them back. Lines that
    do not parse are skipped: a table we cannot read only means fewer on-link peers.
    """
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination = int(fields[1], 16).to_bytes(4, byteorder)  # type: ignore[arg-type]
            flags = int(fields[3], 16)
            metric = int(fields[6])
            mask = int(fields[7], 16).to_bytes(4, byteorder)  # type: ignore[arg-type]
            network = ipaddress.IPv4Network(
                (ipaddress.IPv4Address(destination), _prefix_length(mask)), strict=False
            )
        except (ValueError, OverflowError):
            continue
        if flags & RTF_UP and not flags & RTF_REJECT:
            routes.append(Route(network, bool(flags & RTF_GATEWAY), fields[0], metric))
    return routes


def parse_ipv6_routes(text: str) -> list[Route]:
    """The up, non-reject routes of ``/proc/net/ipv6_route`` (every table, local included)."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            network = ipaddress.IPv6Network(
                (ipaddress.IPv6Address(bytes.fromhex(fields[0])), int(fields[1], 16)),
                strict=False,
            )
            metric = int(fields[5], 16)
            flags = int(fields[8], 16)
        except (ValueError, OverflowError):
            continue
        if flags & RTF_UP and not flags & RTF_REJECT:
            routes.append(Route(network, bool(flags & RTF_GATEWAY), fields[9], metric))
    return routes


def on_link(routes: list[Route], address: IPAddress) -> bool:
    """Whether the best route to ``address`` (longest prefix, then lowest metric) has no
    gateway. No route at all: not on-link."""
    best: Route | None = None
    for route in routes:
        if route.network.version != address.version or address not in route.network:
            continue
        if (
            best is None
            or route.network.prefixlen > best.network.prefixlen
            or (route.network.prefixlen == best.network.prefixlen and route.metric < best.metric)
        ):
            best = route
    return best is not None and not best.via_gateway


def _prefix_length(mask: bytes) -> int:
    """The prefix length of a contiguous netmask; ValueError for any other mask."""
    value = int.from_bytes(mask, "big")
    length = bin(value).count("1")
    if value != ((1 << 32) - 1) ^ ((1 << (32 - length)) - 1):
        raise ValueError(f"netmask {mask.hex()} is not contiguous")
    return length
