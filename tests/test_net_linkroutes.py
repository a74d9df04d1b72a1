"""The route tables' parsers and the on-link decision (net/linkroutes.py)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.net.linkroutes import (
    RTF_GATEWAY,
    RTF_REJECT,
    RTF_UP,
    Route,
    on_link,
    parse_ipv4_routes,
    parse_ipv6_routes,
)

IPV4_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"

# What this machine's kernel printed (x86, little-endian): a default route through
# 192.0.2.1 and the on-link 192.0.2.0/24.
REAL_IPV4 = f"""{IPV4_HEADER}
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
REAL_IPV6 = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 \
00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
"""


def test_this_machines_tables_parse() -> None:
    v4 = parse_ipv4_routes(REAL_IPV4, "little")
    assert v4 == [
        Route(ipaddress.IPv4Network("0.0.0.0/0"), True, "eth0", 0),
        Route(ipaddress.IPv4Network("192.0.2.0/24"), False, "eth0", 0),
    ]
    v6 = parse_ipv6_routes(REAL_IPV6)
    assert [(str(r.network), r.via_gateway, r.interface) for r in v6] == [
        ("fd00::/64", False, "eth0"),
        ("::/0", True, "eth0"),
        ("::1/128", False, "lo"),
    ]
    routes = v4 + v6
    assert on_link(routes, ipaddress.ip_address("192.0.2.77"))
    assert not on_link(routes, ipaddress.ip_address("198.51.100.7"))
    assert on_link(routes, ipaddress.ip_address("fd00::9"))
    assert not on_link(routes, ipaddress.ip_address("2001:db8::1"))


def test_lines_that_do_not_parse_are_skipped() -> None:
    text = f"{IPV4_HEADER}\nshort line\neth0\tZZZ\t0\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    text += "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FF00FF\t0\t0\t0\n"  # holes in the mask
    assert parse_ipv4_routes(text, "little") == []
    assert parse_ipv6_routes("not a route\n" + "zz " * 10) == []


def test_routes_down_or_rejecting_are_not_routes() -> None:
    line = "eth0\t000200C0\t00000000\t{flags:04X}\t0\t0\t0\t00FFFFFF\t0\t0\t0"
    down = f"{IPV4_HEADER}\n{line.format(flags=0)}\n"
    reject = f"{IPV4_HEADER}\n{line.format(flags=RTF_UP | RTF_REJECT)}\n"
    assert parse_ipv4_routes(down, "little") == []
    assert parse_ipv4_routes(reject, "little") == []


def ipv4_route_line(route: Route, byteorder: str) -> str:
    """``route`` as the kernel prints it in /proc/net/route on a ``byteorder`` machine."""
    network = route.network

    def word(address: ipaddress.IPv4Address) -> str:
        return f"{int.from_bytes(address.packed, byteorder):08X}"  # type: ignore[arg-type]

    flags = RTF_UP | (RTF_GATEWAY if route.via_gateway else 0)
    gateway = "0102A8C0" if route.via_gateway else "00000000"
    return "\t".join(
        [
            route.interface,
            word(network.network_address),  # type: ignore[arg-type]
            gateway,
            f"{flags:04X}",
            "0",
            "0",
            str(route.metric),
            word(network.netmask),  # type: ignore[arg-type]
            "0",
            "0",
            "0",
        ]
    )


def ipv6_route_line(route: Route) -> str:
    network = route.network
    flags = RTF_UP | (RTF_GATEWAY if route.via_gateway else 0)
    zero = "0" * 32
    return " ".join(
        [
            network.network_address.packed.hex(),
            f"{network.prefixlen:02x}",
            zero,
            "00",
            zero,
            f"{route.metric:08x}",
            "00000001",
            "00000000",
            f"{flags:08x}",
            route.interface,
        ]
    )


ipv4_networks = st.builds(
    lambda address, prefix: ipaddress.IPv4Network((address, prefix), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
ipv6_networks = st.builds(
    lambda address, prefix: ipaddress.IPv6Network((address, prefix), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
interfaces = st.sampled_from(["eth0", "wlan0", "br-lan", "lo"])


def routes_of(
    networks: st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> st.SearchStrategy[list[Route]]:
    return st.lists(
        st.builds(Route, networks, st.booleans(), interfaces, st.integers(0, 2000)), max_size=12
    )


@given(routes_of(ipv4_networks), st.sampled_from(["little", "big"]))
def test_ipv4_tables_round_trip(routes: list[Route], byteorder: str) -> None:
    text = IPV4_HEADER + "\n" + "".join(ipv4_route_line(r, byteorder) + "\n" for r in routes)
    assert parse_ipv4_routes(text, byteorder) == routes


@given(routes_of(ipv6_networks))
def test_ipv6_tables_round_trip(routes: list[Route]) -> None:
    text = "".join(ipv6_route_line(r) + "\n" for r in routes)
    assert parse_ipv6_routes(text) == routes


def best_route(routes: list[Route], address: ipaddress.IPv4Address) -> Route | None:
    """The oracle: every matching route, the longest prefix, then the lowest metric."""
    matching = [r for r in routes if address in r.network]
    if not matching:
        return None
    return min(matching, key=lambda r: (-r.network.prefixlen, r.metric))


@given(routes_of(ipv4_networks), st.integers(0, 2**32 - 1))
def test_on_link_follows_the_route_the_kernel_would_pick(routes: list[Route], raw: int) -> None:
    address = ipaddress.IPv4Address(raw)
    # Half the time, aim inside one of the routes so that matches are common.
    if routes and raw % 2:
        network = routes[raw % len(routes)].network
        address = network.network_address + (raw % network.num_addresses)  # type: ignore[assignment]
    best = best_route(routes, address)
    if best is None:
        assert not on_link(routes, address)
    elif all(
        r.via_gateway == best.via_gateway
        for r in routes
        if address in r.network
        and r.network.prefixlen == best.network.prefixlen
        and r.metric == best.metric
    ):
        assert on_link(routes, address) == (not best.via_gateway)


def test_an_ipv6_address_never_takes_an_ipv4_route() -> None:
    routes = [Route(ipaddress.IPv4Network("0.0.0.0/0"), False, "eth0", 0)]
    assert not on_link(routes, ipaddress.ip_address("fd00::1"))
