"""Which addresses reach this node: what `id` shows, tickets carry and beacons announce.

A node advertises exactly the addresses that can answer:
- bound to a wildcard (``0.0.0.0`` / ``::``): every interface address of that family except
  loopback and link-local (a link-local address means nothing off its link, and an IPv6 one
  needs a scope id a ticket cannot carry); loopback only if there is nothing else;
- bound to one address: that address alone (loopback included, when that is what it is);
- plus the addresses peers report observing for it, once they are not already listed.

Order is best first, since tickets keep only the first few: global addresses, then private
(RFC 1918, ULA, other non-global ranges), then shared (CGNAT 100.64/10), then loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Iterable

import psutil

from p2pfs.wire.ticket import PeerAddress

logger = logging.getLogger(__name__)

TICKET_ADDRESSES = 4
"""Addresses a ticket carries: enough for a multi-homed host, short enough to paste."""
OBSERVED_LIMIT = 8
"""Observed addresses kept (most recent reports win): a bound, since peers say them."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_addresses(family: socket.AddressFamily) -> list[str]:
    """Every address of ``family`` configured on this machine's interfaces that are up."""
    try:
        stats = psutil.net_if_stats()
        found: list[str] = []
        for name, entries in psutil.net_if_addrs().items():
            if name in stats and not stats[name].isup:
                continue
            found.extend(entry.address for entry in entries if entry.family == family)
    except OSError as exc:
        logger.warning("cannot list network interfaces: %s", exc)
        return []
    # psutil writes IPv6 link-local addresses with a %scope suffix.
    return [address.split("%", 1)[0] for address in found]


def rank(address: IPAddress) -> int:
    """Lower is better: how likely a peer elsewhere can reach this address."""
    if address.is_loopback:
        return 4
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return 2
    if address.is_global:
        return 0
    return 1  # private (RFC 1918, ULA) and other non-global ranges


_SHARED = ipaddress.ip_network("100.64.0.0/10")


def usable(address: IPAddress) -> bool:
    """Worth advertising at all when bound to a wildcard."""
    return not (address.is_link_local or address.is_multicast or address.is_unspecified)


def local_addresses(bound_host: str, port: int, interfaces: Iterable[str]) -> list[PeerAddress]:
    """The addresses a socket bound to ``bound_host:port`` is reachable at, best first.

    ``interfaces`` is the machine's interface addresses of the socket's family (a parameter,
    so the rule is testable without the machine's own network).
    """
    bound = ipaddress.ip_address(bound_host)
    if not bound.is_unspecified:
        return [PeerAddress(str(bound), port)]
    parsed = []
    for text in interfaces:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == bound.version and usable(address) and address not in parsed:
            parsed.append(address)
    remote = [address for address in parsed if not address.is_loopback]
    chosen = remote or [address for address in parsed if address.is_loopback]
    if not chosen:
        chosen = [ipaddress.ip_address("127.0.0.1" if bound.version == 4 else "::1")]
    chosen.sort(key=rank)
    return [PeerAddress(str(address), port) for address in chosen]


class AddressBook:
    """This node's advertised addresses: its interfaces, plus what peers observe."""

    def __init__(self, bound_host: str, port: int) -> None:
        self.bound_host = bound_host
        self.port = port
        self._observed: OrderedDict[PeerAddress, None] = OrderedDict()

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.bound_host else socket.AF_INET

    def observed(self, address: PeerAddress) -> None:
        """A peer saw our packets come from ``address`` (a NAT's mapping, typically)."""
        try:
            parsed = ipaddress.ip_address(address.host)
        except ValueError:
            return
        if not usable(parsed) or parsed.is_loopback or not 0 < address.port < 65536:
            return
        self._observed[address] = None
        self._observed.move_to_end(address)
        while len(self._observed) > OBSERVED_LIMIT:
            self._observed.popitem(last=False)

    def all(self) -> list[PeerAddress]:
        own = local_addresses(self.bound_host, self.port, interface_addresses(self.family))
        extra = [address for address in reversed(self._observed) if address not in own]
        # An observed public address beats our private ones: it is what the internet sees.
        merged = own + extra
        merged.sort(key=lambda a: rank(ipaddress.ip_address(a.host)))
        return merged

    def for_ticket(self) -> list[PeerAddress]:
        return self.all()[:TICKET_ADDRESSES]
