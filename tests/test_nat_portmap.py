"""Port mapping against a real gateway: a home router namespace running miniupnpd (UPnP IGD
and NAT-PMP/PCP, Debian's miniupnpd-nftables) beside its nftables masquerade. Real daemons
at their defaults; no relay anywhere, so a fetch from outside can only come in through the
mapping."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.e2e_helpers import wait_until
from tests.netbed import DEFAULT_PORT, Gateway, Machine, NetBed, upnpbed
from tests.test_machines import make_tree, same_tree, share
from tests.test_nat_machines import fetch_watching_paths, ident, reach_verdict

__all__ = ["upnpbed"]

MiB = 1 << 20


def mapping(machine: Machine) -> dict[str, object] | None:
    info = ident(machine)["port_mapping"]
    assert info is None or isinstance(info, dict)
    return info


def mapped_port(gateway: Gateway, client: str, port: int) -> bool:
    """Whether miniupnpd holds a UDP mapping of ``client:port`` (its lease file and the
    DNAT rule it put in its nftables table)."""
    leased = any(line.startswith(f"UDP:{port}:{client}:{port}:") for line in gateway.leases())
    rules = gateway.nft_rules()
    return leased or f"dnat ip to {client}:{port}" in rules


def test_mapped_home_is_fetched_from_directly(upnpbed: NetBed, tmp_path: Path) -> None:
    """A home behind a cone NAT whose router runs miniupnpd maps its port; a public machine
    fetches its share with the ticket alone, directly; `stop` removes the mapping."""
    public = upnpbed.machine("pub")
    home = upnpbed.home("h", "cone", upnp=True)
    gateway = home.gateway
    assert gateway is not None
    # The fetcher's downloads are slowed so the transfer is still running when we look.
    public.start("--max-download-rate", str(2 * MiB))
    home.start()
    external = f"{gateway.wan_address}:{DEFAULT_PORT}"
    wait_until(lambda: (mapping(home) or {}).get("state") == "mapped", timeout=30)
    info = mapping(home)
    assert info is not None
    assert info["protocol"] == "udp" and info["external"] == external
    assert external in ident(home)["addresses"]  # type: ignore[operator]
    assert mapped_port(gateway, home.address, DEFAULT_PORT)

    home_id = str(ident(home)["node_id"])
    source = tmp_path / "photos"
    make_tree(source, {"big.bin": 6 * MiB, "small.txt": 1000})
    ticket = share(home, source)
    seen = fetch_watching_paths(public, ticket, tmp_path / "copy", home_id)
    assert same_tree(source, tmp_path / "copy")
    assert seen == {"direct"}

    home.cli("stop")
    assert home.daemon is not None
    assert home.daemon.wait() == 0
    assert not mapped_port(gateway, home.address, DEFAULT_PORT), gateway.nft_rules()


def test_no_port_mapping_asks_nothing(upnpbed: NetBed, tmp_path: Path) -> None:
    """With --no-port-mapping the gateway hears no request; without it, the same home on
    the same router is mapped (so the silence was the flag's doing)."""
    home = upnpbed.home("h", "cone", upnp=True)
    gateway = home.gateway
    assert gateway is not None and gateway.log is not None
    home.start("--no-port-mapping")
    assert mapping(home) is None
    addresses = ident(home)["addresses"]
    assert isinstance(addresses, list)
    assert not any(a.startswith(f"{gateway.wan_address}:") for a in addresses)
    home.cli("stop")
    assert home.daemon is not None and home.daemon.wait() == 0
    log = gateway.log.read_text()
    assert "AddPortMapping" not in log and "PCP request" not in log, log
    assert "NAT-PMP request" not in log, log
    assert not mapped_port(gateway, home.address, DEFAULT_PORT)

    home.start()
    wait_until(lambda: (mapping(home) or {}).get("state") == "mapped", timeout=30)
    assert mapped_port(gateway, home.address, DEFAULT_PORT)


def pinhole_rule(gateway: Gateway, host: str, port: int) -> bool:
    """Whether miniupnpd's forward chain lets UDP to ``[host]:port`` in (its pinhole; nft
    lists the destination as the raw 128 bits at the IPv6 header's offset 24)."""
    destination = f"@nh,192,128 0x{ipaddress.IPv6Address(host).packed.hex()}"
    return any(
        destination in line and f"dport {port}" in line and line.endswith("accept")
        for line in gateway.nft_rules().splitlines()
    )


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_an_ipv6_home_opens_a_pinhole_and_is_fetched_from_directly(
    upnpbed: NetBed, tmp_path: Path, protocol: str
) -> None:
    """A home with a routed IPv6 prefix behind its router's stateful firewall, the router
    running miniupnpd (PCP and UPnP IGD v2, or UPnP alone); between it and a machine
    outside only IPv6 is forwarded. No relay anywhere. With --no-port-mapping the home
    cannot be fetched from (the firewall drops what nobody inside asked for). At its
    defaults the daemon asks its router for a pinhole to its address and port (over PCP,
    else UPnP's WANIPv6FirewallControl), the machine outside fetches with the ticket
    alone, directly, and `stop` closes the pinhole."""
    public = upnpbed.machine("pub", ipv6=True)
    home = upnpbed.home("h", "cone", upnp=True, ipv6=True, pcp=protocol == "pcp")
    gateway = home.gateway
    assert gateway is not None and home.address6 is not None
    upnpbed.forward_no_ipv4()
    public.start()
    source = tmp_path / "album"
    make_tree(source, {"track.flac": 3 * MiB, "cover.jpg": 20_000})

    # First, so that no flow of the fetch below is in the firewall's state yet.
    home.start("--no-port-mapping")
    refused = public.cli(
        "fetch", share(home, source), str(tmp_path / "refused"), "--give-up-after", "4",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert not (tmp_path / "refused" / "track.flac").exists()
    home.cli("stop")
    assert home.daemon is not None and home.daemon.wait() == 0

    home.start()
    pinhole = f"[{home.address6}]:{DEFAULT_PORT}"
    wait_until(lambda: (mapping(home) or {}).get("ipv6_pinhole") == pinhole, timeout=30)
    assert (mapping(home) or {})["ipv6_pinhole_via"] == protocol
    assert pinhole_rule(gateway, home.address6, DEFAULT_PORT), gateway.nft_rules()
    assert f"pinhole   {pinhole} (the router's IPv6 firewall" in home.cli("id").stdout
    home_id = str(ident(home)["node_id"])
    seen = fetch_watching_paths(public, share(home, source), tmp_path / "copy", home_id)
    assert same_tree(source, tmp_path / "copy")
    assert seen == {"direct"}
    # The fetcher's connection let the home ask it for a dial-back: its probe, from a
    # port of its own, came in through the pinhole.
    wait_until(lambda: reach_verdict(home, "ipv6") == "reachable", timeout=30)

    home.cli("stop")
    assert home.daemon.wait() == 0
    assert not pinhole_rule(gateway, home.address6, DEFAULT_PORT), gateway.nft_rules()

    # No pinhole: the home's own connection to the machine outside (its --peer) works, the
    # probe that machine sends back from a port of its own does not get in.
    assert public.address6 is not None
    home.start("--no-port-mapping", "--peer", f"[{public.address6}]:{DEFAULT_PORT}")
    # (The machine outside answered the previous daemon's ask a moment ago: it says BUSY
    # to this one at first, which asks again 15 s later.)
    wait_until(lambda: reach_verdict(home, "ipv6") == "unreachable", timeout=40)
