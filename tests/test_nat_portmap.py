"""Port mapping against a real gateway: a home router namespace running miniupnpd (UPnP IGD
and NAT-PMP/PCP, Debian's miniupnpd-nftables) beside its nftables masquerade. Real daemons
at their defaults; no relay anywhere, so a fetch from outside can only come in through the
mapping."""

from __future__ import annotations

from pathlib import Path

from tests.e2e_helpers import wait_until
from tests.netbed import DEFAULT_PORT, Gateway, Machine, NetBed, upnpbed
from tests.test_machines import make_tree, same_tree, share
from tests.test_nat_machines import fetch_watching_paths, ident

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
