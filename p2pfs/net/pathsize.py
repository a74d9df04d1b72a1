"""How big the QUIC datagrams to one peer address may be.

Every datagram costs the engine the same packet work whatever its size (header protection,
an AEAD call, the frame loop, an acknowledgement), so on a link that carries big frames, big
datagrams move the same bytes for a fraction of the CPU (Identity and transport in SPEC.md:
the raw engine moved 247 MB/s at 1,350 bytes and 1,093 MB/s at 32,000 on this loopback).
But a datagram bigger than some hop of the path is lost without a word, so a size is only
raised where the whole path is known:

- a loopback address: the path is this kernel, and its MTU is the loopback interface's;
- an on-link address (its route has no gateway, net/linkroutes.py): the path is one link,
  and the largest datagram is the kernel's MTU for that route, at most an Ethernet frame's
  (a jumbo-frame link is only as good as every device on it, and nothing here probes it);
  an IPv6 link-local one (``fe80::1%eth0``, as LAN discovery finds peers) by its
  interface;
- anything else, relay tunnels included: the configured base size, which fits any path with
  an MTU of 1,400 or more.

Never bigger than what the kernel knows fits, though: an interface smaller than the base
(a WireGuard or Tailscale tunnel: 1,420 or 1,280) or a path MTU the kernel learnt from an
ICMP "fragmentation needed" caps the size (at least QUIC's 1,200; below that the kernel
fragments). A UDP GSO send whose datagrams exceed the route's MTU fails outright
(EMSGSIZE), so a size above it lost every full datagram: a path of MTU 1,300 moved a
listing and no file.

The receiving side accepts anything up to the QUIC maximum (engine.RECEIVE_DATAGRAM_LIMIT),
so each side's choice is its own; except on a path kept small (``keep_small``), where a
hop smaller than the base drops big datagrams and the ICMP that would tell the kernel is
filtered (a black hole): the peer sent small packets and nothing big, and stalled. New
connections there send QUIC's minimum and tell the peer to do the same (its transport
parameters: engine_internals.qh3_connection_class), for SMALL_PATH_SECONDS.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from p2pfs.net.linkroutes import IPAddress, Route, on_link, parse_ipv4_routes, parse_ipv6_routes

logger = logging.getLogger(__name__)

ETHERNET_MTU = 1500
QUIC_MIN_DATAGRAM = 1200
"""RFC 9000, 14: the smallest datagram QUIC may be sent in; a path under it is the kernel's to
fragment for."""
IPV4_UDP_OVERHEAD = 20 + 8
IPV6_UDP_OVERHEAD = 40 + 8
# Linux's IP_MTU / IPV6_MTU socket options (linux/in.h, linux/in6.h): the MTU the kernel
# knows for a connected socket's route (the interface's, or a smaller one learnt by PMTU).
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
ROUTE_TABLES = (Path("/proc/net/route"), Path("/proc/net/ipv6_route"))
# Routes change (a laptop moves between networks): tables and answers are re-read after this.
REFRESH_SECONDS = 30.0
CACHE_ENTRIES = 1024
SMALL_PATH_SECONDS = 600.0
"""How long a path suspected of losing big datagrams is kept at QUIC's minimum before the
usual size is tried again (routes change; a wrong guess costs that path ~12% more packets,
so more CPU per byte, meanwhile; a right one is found again by the next stall)."""


class PathSizes:
    """Datagram size per peer IP, from the kernel's routes and MTUs (cached for a while)."""

    def __init__(
        self,
        base: int,
        loopback_limit: int,
        *,
        read_routes: Callable[[], list[Route]] | None = None,
        route_mtu: Callable[[IPAddress], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.loopback_limit = max(base, loopback_limit)
        self._read_routes = read_routes or read_kernel_routes
        self._route_mtu = route_mtu or kernel_route_mtu
        self._clock = clock
        self._routes: list[Route] = []
        self._routes_read_at = -float("inf")
        self._sizes: OrderedDict[IPAddress, tuple[float, int]] = OrderedDict()
        self._small_until: OrderedDict[IPAddress, float] = OrderedDict()

    def datagram_size(self, host: str) -> int:
        """The datagram size to use towards ``host`` (an IP literal; anything else: base)."""
        address = _address(host)
        if address is None:
            return self.base
        now = self._clock()
        small_until = self._small_until.get(address)
        if small_until is not None:
            if now < small_until:
                return QUIC_MIN_DATAGRAM
            del self._small_until[address]
        cached = self._sizes.get(address)
        if cached is not None and now - cached[0] < REFRESH_SECONDS:
            return cached[1]
        size = self._measure(address, now)
        self._sizes[address] = (now, size)
        self._sizes.move_to_end(address)
        while len(self._sizes) > CACHE_ENTRIES:
            self._sizes.popitem(last=False)
        return size

    def forget(self, host: str) -> None:
        """Measure ``host`` again next time: a send to it found the path smaller than the
        size given (the kernel has learnt the path's MTU since)."""
        address = _address(host)
        if address is not None:
            self._sizes.pop(address, None)

    def keep_small(self, host: str) -> bool:
        """Use QUIC's minimum towards ``host`` for SMALL_PATH_SECONDS: its path seems to lose
        bigger datagrams without a word. False (nothing changes) for a loopback or
        non-literal host, or one already kept small."""
        address = _address(host)
        if address is None or address.is_loopback:
            return False
        now = self._clock()
        if self._small_until.get(address, -math.inf) > now:
            return False
        self._small_until[address] = now + SMALL_PATH_SECONDS
        self._small_until.move_to_end(address)
        while len(self._small_until) > CACHE_ENTRIES:
            self._small_until.popitem(last=False)
        return True

    def _measure(self, address: IPAddress, now: float) -> int:
        overhead = IPV4_UDP_OVERHEAD if address.version == 4 else IPV6_UDP_OVERHEAD
        if address.is_loopback:
            limit = self.loopback_limit
        else:
            if now - self._routes_read_at >= REFRESH_SECONDS:
                self._routes = self._read_routes()
                self._routes_read_at = now
            limit = ETHERNET_MTU - overhead if on_link(self._routes, address) else self.base
        mtu = self._route_mtu(address)
        if mtu is None:
            return self.base
        if address.is_loopback:
            return max(self.base, min(limit, mtu - overhead))
        return max(QUIC_MIN_DATAGRAM, min(limit, mtu - overhead))


def path_host(address: tuple[object, ...]) -> str:
    """A socket address's host as this module (and a dialler) takes it: a link-local IPv6
    one with its interface (the scope id, ``fe80::1%2``), which says which link is meant;
    the kernel reports it apart from the host text."""
    host = str(address[0])
    if len(address) == 4 and address[3] and "%" not in host:
        return f"{host}%{address[3]}"
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP literal: a path no hop of which can be smaller."""
    address = _address(host)
    return address is not None and address.is_loopback


def _address(host: str) -> IPAddress | None:
    """``host`` as an IP address (a v4-mapped IPv6 one as IPv4; a link-local one with its
    ``%interface``, which says which link), None if no IP literal."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def read_kernel_routes() -> list[Route]:
    """The kernel's IPv4 main table and IPv6 routes; empty where /proc has none (not Linux)."""
    routes: list[Route] = []
    for table in ROUTE_TABLES:
        try:
            text = table.read_text()
        except OSError:
            continue
        if table.name == "route":
            routes.extend(parse_ipv4_routes(text, sys.byteorder))
        else:
            routes.extend(parse_ipv6_routes(text))
    return routes


def kernel_route_mtu(address: IPAddress) -> int | None:
    """The MTU of the kernel's route to ``address``, asked through a connected UDP socket
    (connecting sends nothing); None where the kernel cannot say."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    level, option = (
        (socket.IPPROTO_IP, IP_MTU) if address.version == 4 else (socket.IPPROTO_IPV6, IPV6_MTU)
    )
    try:
        # Resolved (numerically) to a socket address: a link-local one's interface then
        # travels as its scope id, which a plain (host, port) pair cannot carry (EINVAL).
        target = socket.getaddrinfo(
            str(address), 9, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
        )[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return int(probe.getsockopt(level, option))
    except OSError as exc:
        logger.debug("no route MTU for %s: %s", address, exc)
        return None
