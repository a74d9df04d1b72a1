"""One UDP port per node: QUIC and the private DHT on one socket, split by the first byte.

Real UDP on loopback throughout: an endpoint with a route for the DHT's bytes, real daemons
answering DHT RPCs and QUIC handshakes on their one port, junk of both kinds sent at that
port, and a node with its own DHT socket (``--dht-port``) meeting one that shares.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.discovery.dht.shared import DHT_FIRST_BYTES
from p2pfs.errors import LocalProtocolError
from p2pfs.identity import Identity
from p2pfs.ids import node_id_untrusted
from p2pfs.net import PeerConnection, open_endpoint
from tests.support.daemons import DaemonProcess

pytestmark = pytest.mark.timeout(120)

JUNK_SEED = 11


async def _hold(conn: PeerConnection) -> None:
    await trio.sleep_forever()


def test_endpoint_routes_dht_bytes_and_keeps_quic() -> None:
    async def main() -> None:
        server_id, client_id = Identity.generate(), Identity.generate()
        routed: list[bytes] = []
        arrived = trio.Event()

        def collect(data: bytes, addr: tuple[str, int]) -> None:
            routed.append(data)
            if len(routed) == 2:
                arrived.set()

        async with (
            open_endpoint(server_id, handler=_hold) as server,
            open_endpoint(client_id) as client,
        ):
            with pytest.raises(LocalProtocolError):
                server.set_datagram_handler(b"\x40", collect)  # would take QUIC packets
            server.set_datagram_handler(DHT_FIRST_BYTES, collect)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                # Neither DHT nor QUIC: the punch byte, an empty datagram, QUIC-looking junk.
                for junk in (b"\x02", b"", b"\x40" + bytes(40), b"\x00 dht", b"\x01 dht"):
                    raw.sendto(junk, server.local_address)
                with trio.fail_after(10):
                    await arrived.wait()
            assert routed == [b"\x00 dht", b"\x01 dht"]
            conn = await client.connect(server.local_address, server.node_id)
            assert conn.peer_id == server.node_id

    trio.run(main)


def _junk(rng: random.Random) -> list[bytes]:
    """Datagrams of every kind a stranger might send to the shared port."""
    junk: list[bytes] = [b"", b"\x00", b"\x01", b"\x02", b"\x00" * 5000, b"\x01" * 5000]
    for _ in range(200):
        size = rng.randint(1, 1400)
        body = rng.randbytes(size)
        first = rng.choice([0x00, 0x01, 0x40 | rng.getrandbits(6), 0xC0 | rng.getrandbits(6)])
        junk.append(bytes([first]) + body)
    # Long-header "Initials" of the minimum size with garbage inside.
    junk += [b"\xc0\x00\x00\x00\x01\x08" + rng.randbytes(1300) for _ in range(20)]
    return junk


async def _dht_ping(port: int) -> bool:
    """A DHT ping from a DHT node with a socket of its own, as a remote node would send."""
    async with trio.open_nursery() as nursery:
        finder = DhtFinder(node_id=bytes(32), quic_port=1, host="127.0.0.1")
        await nursery.start(finder.serve)
        answered = await finder.ping(PeerAddress("127.0.0.1", port))
        nursery.cancel_scope.cancel()
    return answered


async def _quic_connect(port: int, node_id: str) -> bool:
    async with open_endpoint(Identity.generate()) as client:
        conn = await client.connect(("127.0.0.1", port), node_id_untrusted(node_id))
        return conn.peer_id == node_id_untrusted(node_id)


def test_daemon_answers_dht_and_quic_on_one_port_and_survives_junk(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "node", extra_args=("--no-lan", "--no-port-mapping"))
    daemon.start()
    try:
        ident = daemon.call("id")
        port = int(ident["addresses"][0].rsplit(":", 1)[1])
        assert ident["discovery"]["dht_port"] == port
        node_id = ident["node_id"]
        assert trio.run(_dht_ping, port)
        assert trio.run(_quic_connect, port, node_id)

        before = daemon.call("id")["discovery"]["dht"]["traffic"]
        dropped_before = daemon.call("status")["transport"]["datagrams_dropped"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for datagram in _junk(random.Random(JUNK_SEED)):
                raw.sendto(datagram, ("127.0.0.1", port))

        # Both protocols still answer on the port, and each saw (and dropped) its junk.
        assert trio.run(_dht_ping, port)
        assert trio.run(_quic_connect, port, node_id)
        after = daemon.call("id")["discovery"]["dht"]["traffic"]
        assert after["dropped"] > before["dropped"]
        assert daemon.call("status")["transport"]["datagrams_dropped"] > dropped_before
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        daemon.stop()


def test_bootstrap_at_a_main_address_and_the_dht_port_opt_out(tmp_path: Path) -> None:
    """B joins A's DHT through A's main (QUIC) address; B keeps a DHT socket of its own
    (``--dht-port 0``), and the two still find each other's shares."""
    a = DaemonProcess(tmp_path / "a", extra_args=("--no-lan", "--no-port-mapping"))
    a.start()
    daemons = [a]
    try:
        main_a = a.call("id")["addresses"][0]
        b = DaemonProcess(
            tmp_path / "b",
            extra_args=("--no-lan", "--no-port-mapping", "--bootstrap", main_a, "--dht-port", "0"),
        )
        daemons.append(b)
        b.start()
        ident_b = b.call("id")
        quic_b = int(ident_b["addresses"][0].rsplit(":", 1)[1])
        assert ident_b["discovery"]["dht_port"] != quic_b
        assert ident_b["discovery"]["dht"]["contacts"] >= 1
        assert a.call("id")["discovery"]["dht"]["contacts"] >= 1

        source = tmp_path / "shared"
        source.mkdir()
        (source / "f.txt").write_bytes(b"one port")
        ticket = a.cli_json("share", str(source), "--no-hints")["ticket"]
        found = b.call("find", {"ticket": ticket})["providers"]
        assert a.node_id() in [p["node_id"] for p in found]
    finally:
        for daemon in daemons:
            daemon.stop()
