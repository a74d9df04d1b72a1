"""Dial-back streams from a hostile peer, against a real daemon on loopback: junk, frames of
every shape (random IPv6 hosts, ports, truncations) and a flood of valid requests. The
daemon stays up without a traceback, each bad stream ends alone, and however many requests
arrive from one place, it probes at most once per ANSWER_EVERY (three datagrams)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import trio

from p2pfs.daemon.dialback import PROBE_SCHEDULE
from p2pfs.errors import ConnectionClosedError, StreamResetError
from p2pfs.identity import Identity
from p2pfs.net import PeerConnection, open_endpoint
from p2pfs.net.control import NONCE_LEN, ControlKind, DialBack, encode
from tests.support.daemons import DaemonProcess

STREAMS = 150


def junk_requests(rng: random.Random, port: int) -> list[bytes]:
    """What a hostile peer may send first on a dial-back stream."""
    requests: list[bytes] = []
    for _ in range(STREAMS):
        shape = rng.randrange(4)
        if shape == 0:  # noise
            requests.append(rng.randbytes(rng.randrange(0, 64)))
        elif shape == 1:  # a DIAL_BACK naming a random IPv6 host
            host = str(socket.inet_ntop(socket.AF_INET6, rng.randbytes(16)))
            requests.append(encode(DialBack(rng.randbytes(NONCE_LEN), port, host)))
        elif shape == 2:  # a DIAL_BACK cut short, or with a byte too many
            frame = encode(DialBack(rng.randbytes(NONCE_LEN), rng.randrange(1, 65536)))
            requests.append(frame[: rng.randrange(len(frame))] or frame + b"\x00")
        else:  # a valid DIAL_BACK to our listener
            requests.append(encode(DialBack(rng.randbytes(NONCE_LEN), port)))
    return requests


async def send_and_drain(conn: PeerConnection, first: bytes, room: trio.Semaphore) -> None:
    """One stream; ``room`` keeps us within the streams the daemon lets a peer open."""
    async with room:
        await _send_and_drain(conn, first)


async def _send_and_drain(conn: PeerConnection, first: bytes) -> None:
    try:
        stream = await conn.open_control(ControlKind.DIAL_BACK, first)
        with trio.move_on_after(5):
            while await stream.receive_some():
                pass
        stream.close_nowait()
    except (StreamResetError, ConnectionClosedError):
        pass


def test_hostile_dial_back_streams_end_alone_and_probes_stay_bounded(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "target", extra_args=("--no-lan",))
    daemon.start()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        host, port = daemon.call("id")["addresses"][0].rsplit(":", 1)
        requests = junk_requests(random.Random(13), listener.getsockname()[1])

        async def main() -> None:
            async with open_endpoint(Identity.generate()) as endpoint:
                conn = await endpoint.connect((host, int(port)), None)
                room = trio.Semaphore(40)
                async with trio.open_nursery() as nursery:
                    for first in requests:
                        nursery.start_soon(send_and_drain, conn, first, room)
                await trio.sleep(PROBE_SCHEDULE[-1] + 0.5)  # the last probes on their way
                assert not conn.is_closed  # every bad stream ended alone

        trio.run(main)
        probes = 0
        while True:
            try:
                listener.recv(64)
            except BlockingIOError:
                break
            probes += 1
        # One place, one answer per ANSWER_EVERY: its three probes and nothing more.
        assert probes == len(PROBE_SCHEDULE)
        assert daemon.process is not None and daemon.process.poll() is None
        assert daemon.call("id")["node_id"]
        assert "Traceback" not in daemon.log_path.read_text(), daemon.log_tail()
    finally:
        listener.close()
        daemon.stop()
