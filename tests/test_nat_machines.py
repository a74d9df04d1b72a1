"""Through NATs: two homes, each a machine behind its own router namespace doing NAT with the
kernel's connection tracking (nftables masquerade), and one public relay. Real daemons in
real processes, at their defaults plus the flags each scenario names.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from p2pfs.wire.ticket import parse_ticket_untrusted
from tests.e2e_helpers import wait_until
from tests.netbed import Machine, NetBed, natbed
from tests.test_machines import make_tree, same_tree, share

__all__ = ["natbed"]

MiB = 1 << 20


def ident(machine: Machine) -> dict[str, object]:
    result: dict[str, object] = json.loads(machine.cli("id", "--json").stdout)
    return result


def peers(machine: Machine) -> list[dict[str, str]]:
    assert machine.daemon is not None
    result: list[dict[str, str]] = machine.daemon.call("status")["peers"]
    return result


def paths_to(machine: Machine, node_id: str) -> set[str]:
    return {peer["path"] for peer in peers(machine) if peer["node_id"] == node_id}


def fetch_watching_paths(fetcher: Machine, ticket: str, dest: Path, holder: str) -> set[str]:
    """Run a fetch to its end; return every path type (direct, punched, relayed) the
    fetcher's status showed toward ``holder`` meanwhile."""
    fetch = fetcher.popen("fetch", ticket, str(dest), "--json")
    seen: set[str] = set()

    def fetched() -> bool:
        seen.update(paths_to(fetcher, holder))
        return fetch.poll() is not None

    try:
        wait_until(fetched, timeout=120)
        _, stderr = fetch.communicate(timeout=10)
        assert fetch.returncode == 0, stderr
    finally:
        fetch.kill()
    return seen


def knowing(*public: Machine, dht: bool = True) -> tuple[str, ...]:
    """The flags of a home that knows only these public nodes (as --peer, and as DHT
    bootstrap unless ``dht`` is False): no --relay-via, the home finds which is a relay."""
    flags: list[str] = []
    for machine in public:
        flags += ["--peer", f"{machine.address}:7337"]
        if dht:
            flags += ["--bootstrap", f"{machine.address}:7337"]
    return tuple(flags)


def registered(home: Machine, count: int = 1) -> None:
    wait_until(lambda: len(ident(home)["relays"]) >= count, timeout=30)  # type: ignore[arg-type]


def two_homes(
    bed: NetBed, nat: str, *extra: str, dht: bool = True
) -> tuple[Machine, Machine, Machine]:
    """A public relay and two homes behind `nat` routers that know only the relay (as a
    --peer, and DHT bootstrap if ``dht``), each registered with it."""
    relay = bed.machine("relay")
    relay.start("--relay")
    a, b = bed.home("a", nat), bed.home("b", nat)
    for home in (a, b):
        home.start(*knowing(relay, dht=dht), *extra)
    for home in (a, b):
        registered(home)
    return relay, a, b


def test_cone_nats_fetch_goes_direct_by_punching(natbed: NetBed, tmp_path: Path) -> None:
    """Share in home A, fetch in home B with the ticket alone: the first connection goes
    through the relay, a punch opens a direct path, B's status shows it "punched", and the
    fetch completes over it though the relay is killed mid-transfer.

    With the DHT on: the homes find they are behind a NAT and run it as clients, so no DHT
    node learns of them and sends them datagrams unasked (which would make their NATs
    refuse the punch: SPEC "Relays and hole punching")."""
    a, b = natbed.home("a", "cone"), natbed.home("b", "cone")
    relay, a_id, source, fetch = fetch_until_punched(natbed, a, b, tmp_path, 8 * MiB)
    try:
        relay_info = ident(relay)["relay"]
        assert isinstance(relay_info, dict) and relay_info["circuits_total"] >= 1
        # The relay dies mid-transfer: the punched path carries the fetch to its end.
        assert relay.daemon is not None and relay.daemon.process is not None
        relay.daemon.process.kill()
        _, stderr = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, stderr
    finally:
        fetch.kill()
    assert same_tree(source, tmp_path / "copy")
    assert b.daemon is not None and b.daemon.call("status")["punch"]["successes"] >= 1
    # Once the relayed connection was retired, the fetch went on over the punched one at
    # once (it waited for a discovery round, which dialled the dead relay first).
    assert f"peer {a_id[:12]} carries on over its punched path" in b.daemon.log_path.read_text()


def fetch_until_punched(
    bed: NetBed, a: Machine, b: Machine, tmp_path: Path, size: int
) -> tuple[Machine, str, Path, subprocess.Popen[str]]:
    """Homes ``a`` and ``b`` (built, not started) and a public relay they know: b starts
    fetching a share of ``size`` bytes of a's (its downloads slowed, so the transfer is
    still running when we look), and its status shows a punched path to a. Returns the
    relay, a's NodeId, the share's source and the running fetch."""
    relay = bed.machine("relay")
    relay.start("--relay")
    a.start(*knowing(relay))
    b.start(*knowing(relay), "--max-download-rate", str(2 * MiB))
    for home in (a, b):
        registered(home)
    a_id = str(ident(a)["node_id"])
    source = tmp_path / "photos"
    make_tree(source, {"big.bin": size, "small.txt": 1000})
    ticket = share(a, source)
    fetch = b.popen("fetch", ticket, str(tmp_path / "copy"), "--json")
    try:
        wait_until(lambda: "punched" in paths_to(b, a_id), timeout=60)
    except BaseException:
        fetch.kill()
        raise
    return relay, a_id, source, fetch


def test_symmetric_nats_fetch_through_the_relay(natbed: NetBed, tmp_path: Path) -> None:
    """Behind two fully-random NATs punching cannot work: the fetch completes relayed."""
    relay, a, b = two_homes(natbed, "symmetric")
    a_id = str(ident(a)["node_id"])
    source = tmp_path / "docs"
    make_tree(source, {"report.pdf": 3 * MiB, "notes/n.txt": 5000})
    ticket = share(a, source)
    seen = fetch_watching_paths(b, ticket, tmp_path / "copy", a_id)
    assert same_tree(source, tmp_path / "copy")
    assert "relayed" in seen
    assert "punched" not in seen and "direct" not in seen
    assert b.daemon is not None
    wait_until(lambda: b.daemon is not None and b.daemon.call("status")["punch"]["attempts"] >= 1)
    assert b.daemon.call("status")["punch"]["successes"] == 0
    relay_info = ident(relay)["relay"]
    assert isinstance(relay_info, dict) and relay_info["bytes_forwarded"] >= 3 * MiB


def test_homes_behind_carrier_grade_nat_punch_a_direct_path(natbed: NetBed, tmp_path: Path) -> None:
    """Each home router is itself behind its ISP's NAT (two NATs in a row, both keeping
    ports: what mobile and many fixed-line subscribers have). A punch that dies two hops
    out dies inside the carrier's NAT and opens nothing there: such homes stayed relayed.
    Later punches go the whole way, sent once the peer's own first packets are out."""
    a = natbed.home("a", "cone", carrier_nat=True)
    b = natbed.home("b", "cone", carrier_nat=True)
    fetch_goes_punched(natbed, a, b, tmp_path, f"{a.public}:7337")


def test_behind_symmetric_nats_the_punch_goes_over_ipv6(natbed: NetBed, tmp_path: Path) -> None:
    """Two homes whose IPv4 is behind fully-random NATs (no punch gets through: above) and
    whose IPv6 is routed, behind each router's stateful firewall (nothing comes in that
    the LAN did not ask for, so a direct dial of a ticket's IPv6 address is dropped). The
    punch runs over IPv6: each side's short-lived datagrams open its own firewall toward
    the other's address, and the fetch goes direct, not through the relay."""
    a, b = natbed.home("a", "symmetric", ipv6=True), natbed.home("b", "symmetric", ipv6=True)
    fetch_goes_punched(natbed, a, b, tmp_path, f"[{a.address6}]:7337")
    assert f"[{a.address6}]:7337" in ident(a)["addresses"]  # type: ignore[operator]


def fetch_goes_punched(bed: NetBed, a: Machine, b: Machine, tmp_path: Path, expected: str) -> None:
    """As ``fetch_until_punched``, then: the punched path is to a's ``expected`` address,
    the fetch completes, and the relay carried only what the relayed connection had asked
    for before (a few MiB in flight), not most of the file."""
    relay, a_id, source, fetch = fetch_until_punched(bed, a, b, tmp_path, 16 * MiB)
    try:
        punched = [p for p in peers(b) if p["node_id"] == a_id and p["path"] == "punched"]
        assert punched[0]["address"] == expected
        _, stderr = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, stderr
    finally:
        fetch.kill()
    assert same_tree(source, tmp_path / "copy")
    relay_info = ident(relay)["relay"]
    assert isinstance(relay_info, dict) and relay_info["bytes_forwarded"] < 8 * MiB


@pytest.mark.parametrize("nat", ["cone"])
def test_homes_cannot_reach_each_other_without_the_relay(
    natbed: NetBed, tmp_path: Path, nat: str
) -> None:
    """The bed is honest: with no relay, a ticket from home A does not reach home B."""
    a, b = natbed.home("a", nat), natbed.home("b", nat)
    a.start()
    b.start()
    source = tmp_path / "x"
    make_tree(source, {"x.bin": 1000})
    ticket = share(a, source)
    completed = b.cli("fetch", ticket, str(tmp_path / "copy"), "--give-up-after", "3", check=False)
    assert completed.returncode != 0


def test_a_sync_ticket_alone_joins_a_folder_across_two_homes(
    natbed: NetBed, tmp_path: Path
) -> None:
    """Folder sync between two homes behind cone NATs that know only a public relay (no
    DHT): the joiner reaches the creator, whose ticket addresses are all private, through
    the relay the folder ticket names, and edits flow both ways."""
    _relay, a, b = two_homes(natbed, "cone", dht=False)
    a_dir, b_dir = tmp_path / "a-docs", tmp_path / "b-docs"
    a_dir.mkdir()
    (a_dir / "from-a.txt").write_text("written in home A\n")
    created = json.loads(a.cli("sync", str(a_dir), "--json").stdout)
    b.cli("sync", str(b_dir), created["rw"])
    wait_until((b_dir / "from-a.txt").is_file, timeout=60)
    assert (b_dir / "from-a.txt").read_text() == "written in home A\n"
    (b_dir / "from-b.txt").write_text("written in home B\n")
    wait_until((a_dir / "from-b.txt").is_file, timeout=60)
    assert (a_dir / "from-b.txt").read_text() == "written in home B\n"


def test_a_relayed_fetch_carries_on_through_another_relay_when_its_relay_dies(
    natbed: NetBed, tmp_path: Path
) -> None:
    """Two symmetric homes (no punching) that know two public relays register with both;
    the relay carrying a fetch is killed mid-transfer, and the fetch completes through the
    other one."""
    relays = [natbed.machine("r1"), natbed.machine("r2")]
    for relay in relays:
        relay.start("--relay")
    a, b = natbed.home("a", "symmetric"), natbed.home("b", "symmetric")
    a.start(*knowing(*relays, dht=False))
    b.start(*knowing(*relays, dht=False), "--max-download-rate", str(2 * MiB))
    registered(a, 2)
    registered(b, 1)
    source = tmp_path / "video"
    make_tree(source, {"clip.bin": 8 * MiB})
    ticket = share(a, source)
    fetch = b.popen("fetch", ticket, str(tmp_path / "copy"), "--json")
    try:

        def carrying() -> list[Machine]:
            return [r for r in relays if ident(r)["relay"]["circuits"]]  # type: ignore[index]

        wait_until(lambda: bool(carrying()), timeout=60)
        dead = carrying()[0]
        assert dead.daemon is not None and dead.daemon.process is not None
        dead.daemon.process.kill()
        _, stderr = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, stderr
    finally:
        fetch.kill()
    assert same_tree(source, tmp_path / "copy")
    survivor = next(r for r in relays if r is not dead)
    assert ident(survivor)["relay"]["circuits_total"] >= 1  # type: ignore[index]


def test_a_home_finds_a_relay_through_the_dht(natbed: NetBed) -> None:
    """A home that knows only a public node that is no relay (its --peer and DHT bootstrap)
    learns from it that it sits behind a NAT, looks for relays in the private DHT, and
    registers with the one announced there."""
    public, relay = natbed.machine("pub"), natbed.machine("relay")
    public.start()
    relay.start("--relay", "--bootstrap", f"{public.address}:7337")
    home = natbed.home("a", "cone")
    home.start(*knowing(public))
    wait_until(lambda: bool(ident(home)["relays"]), timeout=60)
    relays = ident(home)["relays"]
    assert isinstance(relays, list)
    assert [r["node_id"] for r in relays] == [ident(relay)["node_id"]]
    assert not ident(public)["relays"]  # a public node sees no NAT: it looks for none


def test_a_home_whose_relay_goes_away_carries_on_and_registers_again(natbed: NetBed) -> None:
    """The relay a home is registered with stops (its CONNECTION_CLOSE ends the registration
    stream): the home logs it, keeps running and registers again once the relay is back.
    The stream's error came out of a nursery in a group that the retry loop's plain except
    missed: it ended the home's daemon."""
    relay = natbed.machine("relay")
    relay.start("--relay")
    home = natbed.home("a", "cone")
    home.start(*knowing(relay))
    registered(home)
    assert relay.daemon is not None and home.daemon is not None
    relay.daemon.stop()
    wait_until(lambda: not ident(home)["relays"], timeout=30)
    relay.start("--relay")
    registered(home)
    assert home.daemon.process is not None and home.daemon.process.poll() is None
    assert "Traceback" not in home.daemon.log_path.read_text(), home.daemon.log_tail()


def reach_verdict(machine: Machine, family: str = "ipv4") -> str:
    reachability = ident(machine)["reachability"]
    assert isinstance(reachability, dict)
    return str(reachability[family]["verdict"])


def test_a_firewalled_machine_learns_it_by_dial_back_and_is_fetched_from_through_a_relay(
    natbed: NetBed, tmp_path: Path
) -> None:
    """A machine on a public address whose host firewall drops what it did not ask for: no
    NAT stands in its way (peers see its own address), so it believed itself reachable,
    looked for no relay, served the DHT, and nobody elsewhere could fetch from it. Now a
    peer's dial-back probe never arrives: it becomes a DHT client, registers with the relay
    announced in the DHT, and a machine elsewhere fetches its share."""
    public, relay = natbed.machine("pub"), natbed.machine("relay")
    public.start()
    relay.start("--relay", "--bootstrap", f"{public.address}:7337")
    walled = natbed.machine("walled")
    walled.firewall()
    walled.start(*knowing(public))
    wait_until(lambda: reach_verdict(walled) == "unreachable", timeout=60)
    assert walled.firewall_drops() >= 1  # the probes, dropped
    registered(walled)
    assert [r["node_id"] for r in ident(walled)["relays"]] == [ident(relay)["node_id"]]  # type: ignore[union-attr,index]
    assert ident(walled)["discovery"]["dht"]["client_mode"] is True  # type: ignore[index]
    # The others' probes arrive: they are reachable, and look for no relay.
    wait_until(lambda: reach_verdict(public) == "reachable", timeout=60)
    assert not ident(public)["relays"]
    source = tmp_path / "docs"
    make_tree(source, {"report.pdf": 2 * MiB, "notes/n.txt": 5000})
    ticket = share(walled, source)
    fetcher = natbed.machine("get")
    fetcher.start(*knowing(public))
    hints = parse_ticket_untrusted(ticket).relays
    assert [str(hint.node_id) for hint in hints] == [ident(relay)["node_id"]]
    # Any path: the relay's, a punch's, or direct once the walled machine's own DHT
    # requests to the fetcher (from the same UDP port) opened its firewall to it. Before
    # dial-back the ticket named no relay and the fetch failed ("no answer in 4 s").
    fetch_watching_paths(fetcher, ticket, tmp_path / "copy", str(ident(walled)["node_id"]))
    assert same_tree(source, tmp_path / "copy")
    text = walled.cli("id").stdout
    assert "IPv4: peers elsewhere cannot reach us" in text, text


def test_a_machine_that_knows_only_a_lan_neighbour_is_checked_by_nodes_of_its_dht(
    natbed: NetBed,
) -> None:
    """A machine whose one configured node is a neighbour on its own LAN (its DHT
    bootstrap: whose word says nothing of the way in from beyond the router), holding no
    connection elsewhere, was never checked: "not checked yet" for good. The nodes its DHT
    met through the neighbour are reachable nodes beyond the router, and are asked."""
    first, second = natbed.machine("pub1"), natbed.machine("pub2")
    first.start()
    second.start("--bootstrap", f"{first.address}:7337")
    asker, neighbour = natbed.lan("ask", "nbr")
    neighbour.start("--no-lan", "--bootstrap", f"{first.address}:7337")
    asker.start("--no-lan", "--bootstrap", f"{neighbour.address}:7337")
    wait_until(lambda: reach_verdict(asker) == "reachable", timeout=60)
    reachability = ident(asker)["reachability"]
    assert isinstance(reachability, dict)
    places = {probe["place"] for probe in reachability["ipv4"]["probes"]}
    publics = {f"{machine.address.rsplit('.', 1)[0]}.0/24" for machine in (first, second)}
    assert places and places <= publics, (places, publics)
