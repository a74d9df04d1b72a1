"""Discovery end to end: real daemons joined only by the private DHT (no LAN, no hints).

The daemons run with k=4 (``P2PFS_DHT_K``): a record lives on the 4 nodes nearest its key,
so a lookup from any other node is answered only by crossing the network. With the default
k=20 in a 20-node DHT every node would hold every record and no lookup would leave its node.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from p2pfs.daemon.discovery import DHT_K_ENV
from p2pfs.discovery.dht.node import DEFAULT_RPC_TIMEOUT as RPC_TIMEOUT
from tests.support.daemons import DaemonProcess

NODES = 20
K = 4
SEED = 4

pytestmark = pytest.mark.timeout(300)


def dht_address(daemon: DaemonProcess) -> str:
    return f"127.0.0.1:{daemon.call('id')['discovery']['dht_port']}"


def dht(daemon: DaemonProcess) -> dict[str, Any]:
    info: dict[str, Any] = daemon.call("id")["discovery"]["dht"]
    return info


def hops_of_lookup(asker: DaemonProcess, ticket: str) -> tuple[list[str], int]:
    """Ask ``asker`` who holds ``ticket``'s share; the providers' NodeIds and the crawl
    rounds (hops) its DHT lookup took, read from its counters around the call."""
    before = dht(asker)["lookups"]
    found = asker.call("find", {"ticket": ticket})["providers"]
    after = dht(asker)["lookups"]
    assert after["lookups"] == before["lookups"] + 1
    return [p["node_id"] for p in found], after["rounds"] - before["rounds"]


def start_chain(home: Path, count: int, daemons: list[DaemonProcess]) -> None:
    """``count`` daemons with k=K, each bootstrapped from the one before it, appended to
    ``daemons`` as they start (so the caller stops those started if one fails)."""
    for number in range(count):
        extra = ["--no-lan"]
        if daemons:
            extra += ["--bootstrap", dht_address(daemons[-1])]
        daemon = DaemonProcess(
            home / f"n{number}", extra_args=tuple(extra), env={DHT_K_ENV: str(K)}
        )
        daemons.append(daemon)
        daemon.start()


def lookups(
    askers: list[DaemonProcess],
    ticket: str,
    sharer: DaemonProcess,
    holders: list[DaemonProcess],
    fetched_by: DaemonProcess | None = None,
    tries: int = 1,
) -> Counter[int]:
    """A lookup from each asker: every one finds the sharer (or, once ``fetched_by`` has
    fetched the share and announced itself, either of the two) within ``tries`` lookups
    (a fetch asks again every few seconds), and one from a node without the record crossed
    the network (at least one hop). Returns the hops of those."""
    wanted = {sharer.node_id()} | ({fetched_by.node_id()} if fetched_by else set())
    hops: Counter[int] = Counter()
    for asker in askers:
        for _ in range(tries):
            before = dht(asker)
            found, rounds = hops_of_lookup(asker, ticket)
            if wanted & set(found):
                break
            print(f"a lookup found nothing: before {before}, after {dht(asker)}")
            # The dead it asked leave its table when their calls time out, which can be
            # after the lookup itself gave up on them (a slow query frees its slot at
            # 0.5 s): the next try waits for that, or it asks the same dead again.
            time.sleep(RPC_TIMEOUT + 0.5)
        if asker is sharer:
            continue  # a node is never offered its own record
        assert wanted & set(found), found
        if asker in holders:
            assert rounds == 0  # answered from its own records
        else:
            assert rounds >= 1
            hops[rounds] += 1
    print(f"hops of network lookups: {sorted(hops.items())}")
    return hops


def test_no_hints_share_found_across_the_network_and_with_30_percent_killed(
    tmp_path: Path,
) -> None:
    print(f"seed={SEED}")
    rng = random.Random(SEED)
    daemons: list[DaemonProcess] = []
    try:
        start_chain(tmp_path, NODES, daemons)
        assert {dht(d)["k"] for d in daemons} == {K}
        sharer = daemons[7]
        source = tmp_path / "shared"
        source.mkdir()
        (source / "data.bin").write_bytes(rng.randbytes(3 << 20))
        ticket = sharer.cli_json("share", str(source), "--no-hints")["ticket"]
        # The announce stored the record on exactly the k nodes nearest its key.
        holders = [d for d in daemons if dht(d)["records"] > 0]
        assert len(holders) == K, [dht(d)["records"] for d in daemons]
        assert all(dht(d)["records"] == 1 for d in holders)

        hops = lookups([rng.choice(daemons) for _ in range(30)], ticket, sharer, holders)
        assert hops.total() >= 15  # most askers hold no record: 15 in 19

        fetcher = next(d for d in daemons[10:] if d not in holders)
        report = fetcher.cli_json("fetch", ticket, str(tmp_path / "copy"))
        assert (tmp_path / "copy" / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
        assert report["bytes_from_peer"] == 3 << 20

        # 30% of the nodes die without a word, among them all but one of the record's
        # holders: lookups from the rest still find the sharer through the one left. Six
        # askers without the record, each meeting the dead for the first time (a dead
        # contact costs a lookup the RPC timeout, 2 s, once; then the asker drops it).
        survivor = rng.choice(holders)
        victims = [h for h in holders if h is not survivor]
        # The fetcher lives: it provides the share now, and a lookup that finds it counts
        # (its node id is asked of it then).
        others = [d for d in daemons if d not in (sharer, fetcher) and d not in holders]
        victims += rng.sample(others, NODES * 3 // 10 - len(victims))
        for victim in victims:
            victim.kill(signal.SIGKILL)
            victim.wait()
        living = [d for d in daemons if d not in victims]
        askers = rng.sample([d for d in living if d is not sharer and d is not survivor], 6)
        # A first lookup may spend itself on the dead (the k=4 nearest were mostly
        # killed); the asker has dropped them for the next, as a fetch asks again a few
        # seconds on. (The failures once put down to this, 1 full run in 4-7 in sessions
        # 41-43, were the fetcher among the askers: its lookup ended at the first node that
        # held only its own record, every try; fixed in the DHT, and tested alone in
        # test_dht_network.py.)
        found = lookups(askers, ticket, sharer, holders, fetcher, tries=3)
        assert found.total() == len(askers)
    finally:
        for daemon in daemons:
            daemon.stop()
