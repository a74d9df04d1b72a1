"""Which datagram size goes to which peer address (net/pathsize.py)."""

from __future__ import annotations

import ipaddress

from p2pfs.net.linkroutes import IPAddress, Route
from p2pfs.net.pathsize import (
    QUIC_MIN_DATAGRAM,
    REFRESH_SECONDS,
    SMALL_PATH_SECONDS,
    PathSizes,
    is_loopback,
    kernel_route_mtu,
    read_kernel_routes,
)

LAN = Route(ipaddress.IPv4Network("192.168.1.0/24"), False, "eth0", 0)
JUMBO_LAN = Route(ipaddress.IPv4Network("10.9.0.0/16"), False, "eth1", 0)
DEFAULT = Route(ipaddress.IPv4Network("0.0.0.0/0"), True, "eth0", 0)
LAN6 = Route(ipaddress.IPv6Network("fd00::/64"), False, "eth0", 256)
DEFAULT6 = Route(ipaddress.IPv6Network("::/0"), True, "eth0", 1024)
MTUS = {"eth0": 1500, "eth1": 9000}


class Kernel:
    """Route tables and MTUs as a test sets them, counting how often each is asked."""

    def __init__(self, routes: list[Route], mtus: dict[str, int] | None = None) -> None:
        self.routes = routes
        self.mtus = mtus or MTUS
        self.route_reads = 0
        self.mtu_asks = 0
        self.now = 0.0

    def read_routes(self) -> list[Route]:
        self.route_reads += 1
        return list(self.routes)

    def route_mtu(self, address: IPAddress) -> int | None:
        self.mtu_asks += 1
        if address.is_loopback:
            return 65536
        for route in self.routes:
            if address in route.network and not route.via_gateway:
                return self.mtus[route.interface]
        return 1500  # what the kernel says for the default route's interface

    def sizes(self, base: int = 1350, loopback: int = 16384) -> PathSizes:
        return PathSizes(
            base,
            loopback,
            read_routes=self.read_routes,
            route_mtu=self.route_mtu,
            clock=lambda: self.now,
        )


def test_loopback_gets_the_loopback_size() -> None:
    sizes = Kernel([LAN, DEFAULT]).sizes()
    assert sizes.datagram_size("127.0.0.1") == 16384
    assert sizes.datagram_size("127.8.9.10") == 16384
    assert sizes.datagram_size("::1") == 16384
    assert sizes.datagram_size("::ffff:127.0.0.1") == 16384


def test_an_on_link_peer_gets_a_full_ethernet_frame() -> None:
    sizes = Kernel([LAN, LAN6, DEFAULT, DEFAULT6]).sizes()
    assert sizes.datagram_size("192.168.1.20") == 1500 - 28
    assert sizes.datagram_size("::ffff:192.168.1.20") == 1500 - 28
    assert sizes.datagram_size("fd00::20") == 1500 - 48


def test_a_jumbo_link_is_not_trusted_beyond_an_ethernet_frame() -> None:
    """Nothing probes a 9,000-byte link: one device on it with a smaller MTU would drop
    every big datagram without a word."""
    sizes = Kernel([JUMBO_LAN, DEFAULT]).sizes()
    assert sizes.datagram_size("10.9.3.4") == 1500 - 28


def test_beyond_a_gateway_or_unknown_the_base_size() -> None:
    sizes = Kernel([LAN, DEFAULT, DEFAULT6]).sizes()
    assert sizes.datagram_size("203.0.113.9") == 1350
    assert sizes.datagram_size("2001:db8::1") == 1350
    assert sizes.datagram_size("relay.example.org") == 1350
    assert sizes.datagram_size("") == 1350
    assert Kernel([]).sizes().datagram_size("192.168.1.20") == 1350


def test_a_link_smaller_than_the_base_gets_datagrams_that_fit_it() -> None:
    """A tunnel interface of 1,280 on-link (Tailscale's; WireGuard's is 1,420): the base
    size did not fit, and a GSO send of datagrams bigger than the route's MTU fails whole,
    every time. Under QUIC's 1,200 the kernel fragments."""
    tunnel = Route(ipaddress.IPv4Network("10.1.0.0/24"), False, "wg0", 0)
    assert Kernel([tunnel], {"wg0": 1280}).sizes().datagram_size("10.1.0.7") == 1280 - 28
    assert Kernel([tunnel], {"wg0": 1420}).sizes().datagram_size("10.1.0.7") == 1420 - 28
    assert Kernel([tunnel], {"wg0": 576}).sizes().datagram_size("10.1.0.7") == 1200


def test_a_path_mtu_the_kernel_learnt_caps_the_base() -> None:
    """Beyond a gateway the kernel's route MTU is the interface's until an ICMP "fragmentation
    needed" teaches it the path's; then the size fits that, once the old answer is
    forgotten (the endpoint forgets it when a send finds the path too small)."""
    kernel = Kernel([LAN, DEFAULT])
    learnt: dict[str, int] = {}

    def route_mtu(address: IPAddress) -> int | None:
        return learnt.get(str(address)) or kernel.route_mtu(address)

    sizes = PathSizes(1350, 16384, read_routes=kernel.read_routes, route_mtu=route_mtu)
    assert sizes.datagram_size("203.0.113.9") == 1350
    learnt["203.0.113.9"] = 1300
    assert sizes.datagram_size("203.0.113.9") == 1350  # still the cached answer
    sizes.forget("203.0.113.9")
    assert sizes.datagram_size("203.0.113.9") == 1300 - 28
    assert sizes.datagram_size("::ffff:203.0.113.9") == 1300 - 28
    assert sizes.datagram_size("203.0.113.10") == 1350


def test_no_mtu_from_the_kernel_means_the_base_size() -> None:
    kernel = Kernel([LAN])
    sizes = PathSizes(1350, 16384, read_routes=kernel.read_routes, route_mtu=lambda _a: None)
    assert sizes.datagram_size("192.168.1.20") == 1350
    assert sizes.datagram_size("127.0.0.1") == 1350


def test_answers_are_cached_and_refreshed_when_routes_may_have_changed() -> None:
    kernel = Kernel([LAN, DEFAULT])
    sizes = kernel.sizes()
    for _ in range(5):
        assert sizes.datagram_size("192.168.1.20") == 1472
    assert (kernel.route_reads, kernel.mtu_asks) == (1, 1)
    # The laptop moved: that subnet is now beyond a gateway.
    kernel.routes = [DEFAULT]
    kernel.now += REFRESH_SECONDS
    assert sizes.datagram_size("192.168.1.20") == 1350
    assert kernel.route_reads == 2


def test_a_path_kept_small_gets_the_minimum_for_a_while() -> None:
    """A path suspected of dropping big datagrams (endpoint.peer_stalled, the handshake
    race) is held at QUIC's minimum, whatever its route says, then measured again."""
    kernel = Kernel([LAN, LAN6, DEFAULT, DEFAULT6])
    sizes = kernel.sizes()
    assert sizes.datagram_size("192.168.1.20") == 1472
    assert sizes.keep_small("192.168.1.20")
    assert not sizes.keep_small("::ffff:192.168.1.20")  # the same host, already small
    assert sizes.keep_small("203.0.113.9")
    for host in ("192.168.1.20", "::ffff:192.168.1.20", "203.0.113.9"):
        assert sizes.datagram_size(host) == QUIC_MIN_DATAGRAM
    assert sizes.datagram_size("192.168.1.21") == 1472  # its neighbour is not
    assert sizes.datagram_size("fd00::20") == 1452
    kernel.now += SMALL_PATH_SECONDS - 1
    assert sizes.datagram_size("192.168.1.20") == QUIC_MIN_DATAGRAM
    kernel.now += 1
    assert sizes.datagram_size("192.168.1.20") == 1472
    assert sizes.datagram_size("203.0.113.9") == 1350
    assert sizes.keep_small("192.168.1.20")  # may be kept small again


def test_loopback_and_names_are_never_kept_small() -> None:
    sizes = Kernel([LAN, DEFAULT]).sizes()
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "example.org"):
        assert not sizes.keep_small(host)
    assert sizes.datagram_size("127.0.0.1") == 16384
    assert is_loopback("127.9.9.9") and is_loopback("::1") and not is_loopback("10.0.0.1")
    assert not is_loopback("localhost")


def test_this_machines_kernel_answers() -> None:
    """The real /proc tables and socket option, whatever this machine's network is."""
    assert isinstance(read_kernel_routes(), list)
    loopback_mtu = kernel_route_mtu(ipaddress.ip_address("127.0.0.1"))
    assert loopback_mtu is not None and loopback_mtu > 16384 + 28
    sizes = PathSizes(1350, 16384)
    assert sizes.datagram_size("127.0.0.1") == 16384
    # RFC 5737 documentation space: routed through the default gateway, or not at all.
    assert sizes.datagram_size("203.0.113.1") == 1350
