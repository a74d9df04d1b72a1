"""A datagram whose source is a relay circuit's synthetic address (net/tunnel.py, 100::/64)
from the wire. On a socket that takes IPv6 (the default now) anyone could send one: taken
for the circuit's, its handshake's answers went into that circuit, and its end closed the
circuit, a legitimate relayed connection with it. Such datagrams are dropped as read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.netbed import NetBed, netbed

__all__ = ["netbed"]

PROBE = """
import trio
from p2pfs.errors import P2pfsError
from p2pfs.identity import Identity
from p2pfs.net import open_endpoint

async def main():
    server_id = Identity.generate()

    async def serve(conn):
        await conn.wait_closed()

    async with open_endpoint(server_id, "::", 0, handler=serve) as server:
        port = server.local_address[1]
        target = (MACHINE, port)
        async with open_endpoint(Identity.generate(), "100::5", 1) as spoofer:
            with trio.move_on_after(1.5):
                try:
                    await spoofer.connect(target, server_id.node_id)
                except P2pfsError:
                    pass
            print("spoofed", server.pending_handshakes, len(server.connections))
        async with open_endpoint(Identity.generate(), "::", 0) as honest:
            conn = await honest.connect(target, server_id.node_id)
            print("honest", conn.peer_id == server_id.node_id)

trio.run(main)
"""


def test_a_datagram_from_a_circuit_address_gets_no_state(netbed: NetBed, tmp_path: Path) -> None:
    machine = netbed.machine("m1", ipv6=True)
    assert machine.address6 is not None
    machine.add_ipv6("100::5")
    probe = PROBE.replace("MACHINE", repr(machine.address6))
    done = subprocess.run(
        [*machine.prefix, sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["spoofed 0 0", "honest True"], done.stdout
