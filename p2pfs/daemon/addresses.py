"""Which addresses reach this node: what `id` shows, tickets carry and beacons announce.

A node advertises exactly the addresses that can answer:
- bound to a wildcard (``0.0.0.0`` / ``::``): every interface address of that family (of
  both families on a dual-stack ``::`` socket, the default) except loopback and link-local
  (a link-local address means nothing off its link, and an IPv6 one needs a scope id a
  ticket cannot carry); loopback only if there is nothing else;
- bound to one address: that address alone (loopback included, when that is what it is);
- plus the external address the gateway mapped for us (UPnP / NAT-PMP, ``portmap.py``):
  our own router's word, trusted as a local fact, and reachable from outside by
  construction, so it goes first among addresses of its rank (a mapping at a shared or
  private address, from a router behind another NAT, ranks as such and is no sign that
  we are reachable);
- plus the addresses peers report observing for it (a NAT's public mapping, say), once
  peers at two different places (other /24s, or /48s for IPv6) report the same one: a
  single peer's word could otherwise point everyone who holds our tickets at a victim.

Order is best first, since tickets keep only the first few: global addresses, then private
(RFC 1918, ULA, other non-global ranges), then shared (CGNAT 100.64/10), then loopback; a
ticket puts the best address of each family first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import psutil

from p2pfs.address import PeerAddress, plain_address

logger = logging.getLogger(__name__)

TICKET_ADDRESSES = 4
"""Addresses a ticket carries: enough for a multi-homed host, short enough to paste."""
OBSERVED_LIMIT = 8
"""Observed addresses kept (most recent reports win): a bound, since peers say them."""
CONFIRMATIONS = 2
"""Distinct reporting places before an observed address is advertised."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_addresses(*families: socket.AddressFamily) -> list[str]:
    """Every address of ``families`` configured on this machine's interfaces that are up."""
    try:
        stats = psutil.net_if_stats()
        found: list[str] = []
        for name, entries in psutil.net_if_addrs().items():
            if name in stats and not stats[name].isup:
                continue
            found.extend(entry.address for entry in entries if entry.family in families)
    except (OSError, psutil.Error) as exc:
        logger.warning("cannot list network interfaces: %s", exc)
        return []
    # psutil writes IPv6 link-local addresses with a %scope suffix.
    return [address.split("%", 1)[0] for address in found]


def interface_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of this machine's interfaces that are up (address and netmask): who is
    on one of our links. Loopback's too."""
    try:
        stats = psutil.net_if_stats()
        entries = [
            entry
            for name, listed in psutil.net_if_addrs().items()
            if name not in stats or stats[name].isup
            for entry in listed
            if entry.family in (socket.AF_INET, socket.AF_INET6)
        ]
    except (OSError, psutil.Error) as exc:
        logger.warning("cannot list network interfaces: %s", exc)
        return []
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in entries:
        if not entry.netmask:
            continue
        with contextlib.suppress(ValueError):
            mask = ipaddress.ip_address(entry.netmask.split("/", 1)[0])
            prefix = int(mask).bit_count()  # netmasks are contiguous
            host = entry.address.split("%", 1)[0]
            networks.append(ipaddress.ip_network(f"{host}/{prefix}", strict=False))
    return networks


def on_our_links(
    host: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether ``host`` is in one of ``networks`` (loopback and link-local count as ours)."""
    address = plain_address(host)
    if address is None:
        return False
    if address.is_loopback or address.is_link_local:
        return True
    return any(address in network for network in networks if network.version == address.version)


IF_INET6 = Path("/proc/net/if_inet6")
"""Linux's IPv6 interface addresses with their flags (absent elsewhere: nothing dropped)."""
# Address flags (linux/if_addr.h).
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
NOT_ADVERTISED = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
"""A temporary (privacy, RFC 8981) address is replaced within a day and then deprecated, so
a ticket naming it stops working; a deprecated one is on its way out; a tentative or
failed one does not answer yet or ever. A host with temporaries also has its stable one."""


def unadvertised_ipv6(text: str) -> frozenset[str]:
    """The addresses of ``/proc/net/if_inet6``'s text that are not worth advertising
    (``NOT_ADVERTISED``). Lines that do not parse are skipped."""
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            flags = int(fields[4], 16)
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        except ValueError:
            continue
        if flags & NOT_ADVERTISED:
            found.add(str(address))
    return frozenset(found)


def _unadvertised_here() -> frozenset[str]:
    try:
        return unadvertised_ipv6(IF_INET6.read_text())
    except OSError:
        return frozenset()


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


def _public(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return False


def usable(address: IPAddress) -> bool:
    """Worth advertising at all when bound to a wildcard."""
    return not (address.is_link_local or address.is_multicast or address.is_unspecified)


def local_addresses(
    bound_host: str, port: int, interfaces: Iterable[str], *, dual_stack: bool = False
) -> list[PeerAddress]:
    """The addresses a socket bound to ``bound_host:port`` is reachable at, best first;
    ``dual_stack``: the socket is bound to ``::`` and takes IPv4 too (both families count).

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
        family_ok = dual_stack or address.version == bound.version
        if family_ok and usable(address) and address not in parsed:
            parsed.append(address)
    remote = [address for address in parsed if not address.is_loopback]
    chosen = remote or [address for address in parsed if address.is_loopback]
    if not chosen:
        loopback = "127.0.0.1" if bound.version == 4 or dual_stack else "::1"
        chosen = [ipaddress.ip_address(loopback)]
    chosen.sort(key=rank)
    return [PeerAddress(str(address), port) for address in chosen]


class AddressBook:
    """This node's advertised addresses: its interfaces, plus what peers observe."""

    def __init__(self, bound_host: str, port: int, *, dual_stack: bool = False) -> None:
        self.bound_host = bound_host
        self.port = port
        self.dual_stack = dual_stack
        """Bound to ``::`` on a socket that takes IPv4 too: both families are ours."""
        self._observed: OrderedDict[PeerAddress, set[str]] = OrderedDict()
        """Observed address -> the places (networks) of the peers that reported it."""
        self._mapped: PeerAddress | None = None

    @property
    def wildcard(self) -> bool:
        """Bound to every interface (only then is a gateway mapping ours to ask for)."""
        return ipaddress.ip_address(self.bound_host).is_unspecified

    def mapped(self, address: PeerAddress | None) -> None:
        """The gateway's mapping of our port (its external IP and port), or None: gone."""
        self._mapped = address

    @property
    def gateway_mapping(self) -> PeerAddress | None:
        return self._mapped

    @property
    def families(self) -> tuple[socket.AddressFamily, ...]:
        if self.dual_stack:
            return (socket.AF_INET6, socket.AF_INET)
        return (socket.AF_INET6 if ":" in self.bound_host else socket.AF_INET,)

    def _own(self) -> tuple[list[PeerAddress], frozenset[str]]:
        """The interface addresses we advertise, and hosts of ours never to advertise:
        short-lived IPv6 addresses (still ours: the NAT hint counts them, since we send
        from them) and reported ones in our IPv6 prefixes that we no longer have."""
        interfaces = interface_addresses(*self.families)
        dropped = _unadvertised_here() if socket.AF_INET6 in self.families else frozenset()
        kept = [address for address in interfaces if address not in dropped]
        own = local_addresses(self.bound_host, self.port, kept, dual_stack=self.dual_stack)
        # Any other address in one of our IPv6 /64s was ours (a temporary one, deleted
        # since) or never was: a report of it is stale, not a NAT's mapping.
        ours = _ipv6_prefixes(interfaces)
        stale = frozenset(dropped) | {
            a.host for a, _ in self._observed.items() if _in_prefixes(a.host, ours)
        }
        return own, stale - {a.host for a in own}

    def observed(self, address: PeerAddress, reporter: str) -> None:
        """A peer at ``reporter`` (its IP) saw our packets come from ``address``."""
        try:
            parsed = ipaddress.ip_address(address.host)
            place = place_of(ipaddress.ip_address(reporter))
        except ValueError:
            return
        if not usable(parsed) or parsed.is_loopback or not 0 < address.port < 65536:
            return
        places = self._observed.pop(address, set())
        if len(places) < CONFIRMATIONS:
            places.add(place)
        self._observed[address] = places
        while len(self._observed) > OBSERVED_LIMIT:
            self._observed.popitem(last=False)

    def observations(self) -> list[tuple[PeerAddress, int]]:
        """Every observed address kept, newest first, with how many places reported it."""
        return [(address, len(places)) for address, places in reversed(self._observed.items())]

    def seen_through_nat(self) -> bool:
        """Whether a peer saw our packets come from an IP none of our interfaces has (and
        no gateway mapping at a public address is ours): a NAT between us and it. A hint,
        not a reachability test: it says we may need a relay, never that we are
        reachable."""
        if not self._observed:
            return False
        # Only a mapping at a public address makes the internet reach us: a router behind
        # the ISP's carrier-grade NAT (or behind another home router) maps its port at a
        # shared or private address, and the NAT beyond it is still there.
        if self._mapped is not None and _public(self._mapped.host):
            return False
        listed = interface_addresses(*self.families)
        interfaces = set(listed) | {self.bound_host}
        # An address in one of our IPv6 /64s that we no longer have was ours (a temporary
        # one, deleted since): no NAT.
        ours = _ipv6_prefixes(listed)
        return any(
            address.host not in interfaces and not _in_prefixes(address.host, ours)
            for address in self._observed
        )

    def pinhole_ipv6(self) -> str | None:
        """The IPv6 address a firewall pinhole is asked for (see ``pinhole_address``), or
        None."""
        if socket.AF_INET6 not in self.families:
            return None
        own = [address.host for address in self._own()[0] if ":" in address.host]
        return pinhole_address(default_route_source6(), own)

    def interfaces_now(self) -> frozenset[str]:
        """The interface addresses we advertise, read now (to notice that they changed)."""
        return frozenset(address.host for address in self._own()[0])

    def all(self) -> list[PeerAddress]:
        own, unadvertised = self._own()
        # A peer reports the address our packets came from: for IPv6, often a temporary
        # one (the kernel prefers them as sources), which we chose not to advertise, or
        # one gone since.
        extra = [
            address
            for address, places in reversed(self._observed.items())
            if len(places) >= CONFIRMATIONS
            and address not in own
            and address.host not in unadvertised
        ]
        mapped = [self._mapped] if self._mapped is not None else []
        # An observed public address beats our private ones: it is what the internet sees.
        merged = mapped + [a for a in own + extra if a not in mapped]
        merged.sort(key=lambda a: rank(ipaddress.ip_address(a.host)))
        return merged

    def for_ticket(self) -> list[PeerAddress]:
        return best_of_each_family_first(self.all())[:TICKET_ADDRESSES]


ROUTE_PROBE6 = "2000::1"
"""A global unicast destination (2000::/3) that no home network routes itself: the kernel's
source address toward it is its choice on the IPv6 default route."""
_IPV6_ADDR_PREFERENCES = 72
_IPV6_PREFER_SRC_PUBLIC = 0x0002
_ULA = ipaddress.ip_network("fc00::/7")


def default_route_source6() -> str | None:
    """The address the kernel sends from toward the IPv6 internet (RFC 6724's choice on
    the default route's interface, a stable address preferred to a temporary one), or
    None (no IPv6 route). A connected UDP socket sends nothing."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            with contextlib.suppress(OSError):  # Linux only; elsewhere the default choice
                probe.setsockopt(
                    socket.IPPROTO_IPV6, _IPV6_ADDR_PREFERENCES, _IPV6_PREFER_SRC_PUBLIC
                )
            probe.connect((ROUTE_PROBE6, 9))
            return str(probe.getsockname()[0]).partition("%")[0]
    except OSError:
        return None


def pinhole_address(source: str | None, advertised: Iterable[str]) -> str | None:
    """Which of our ``advertised`` IPv6 addresses a router's firewall should let peers in
    to: the default route's ``source`` if we advertise it, else an advertised one in the
    same /64 (a temporary source's stable sibling); None when neither is (the route runs
    through another interface than our advertised addresses, or none is reachable from
    outside the site: unique local, link-local and loopback addresses never are)."""
    if source is None:
        return None
    try:
        route = ipaddress.IPv6Address(source)
    except ValueError:
        return None
    candidates = []
    for text in advertised:
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            continue
        if not (address in _ULA or address.is_link_local or address.is_loopback):
            candidates.append(address)
    if route in candidates:
        return str(route)
    subnet = ipaddress.IPv6Network((route, 64), strict=False)
    return next((str(address) for address in candidates if address in subnet), None)


def best_of_each_family_first(addresses: list[PeerAddress]) -> list[PeerAddress]:
    """``addresses`` (best first) with the best of each family at the front, in their
    order: a ticket cut to its first few then still names both families where we have
    both, so neither a peer without IPv6 nor one behind an IPv4-only path is left with
    nothing to dial."""
    firsts: dict[bool, PeerAddress] = {}
    for address in addresses:
        firsts.setdefault(":" in address.host, address)
    leaders = [a for a in addresses if a in firsts.values()]
    return leaders + [a for a in addresses if a not in leaders]


def _ipv6_prefixes(interfaces: Iterable[str]) -> frozenset[ipaddress.IPv6Network]:
    """The /64s of our global and unique-local IPv6 addresses (not link-local ones)."""
    prefixes = set()
    for text in interfaces:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and usable(address):
            prefixes.add(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return frozenset(prefixes)


def _in_prefixes(host: str, prefixes: frozenset[ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return isinstance(address, ipaddress.IPv6Address) and any(address in p for p in prefixes)


def place_of(reporter: IPAddress) -> str:
    """The network a reporter speaks for: one /24 (IPv4) or /48 (IPv6) is one place."""
    prefix = 24 if reporter.version == 4 else 48
    return str(ipaddress.ip_network(f"{reporter}/{prefix}", strict=False))
