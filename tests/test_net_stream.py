"""net.Stream honours trio's HalfCloseableStream contract over a real QUIC connection."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pfs.identity import Identity
from p2pfs.net import PeerConnection, Stream, open_endpoint

ENGINES = ["qh3", "aioquic"]


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_passes_trio_half_closeable_stream_checks(engine: str) -> None:
    server_id, client_id = Identity.generate(), Identity.generate()
    accepted: trio.MemoryReceiveChannel[Stream]
    accept_send, accepted = trio.open_memory_channel[Stream](0)

    async def handler(conn: PeerConnection) -> None:
        while True:
            stream = await conn.accept_stream()
            # The client's opening byte makes the stream exist for us; not part of the check.
            assert await stream.receive_some(1) == b"!"
            await accept_send.send(stream)

    async def main() -> None:
        with trio.fail_after(60):
            async with (
                open_endpoint(server_id, handler=handler, engine=engine) as server,
                open_endpoint(client_id, engine=engine) as client,
            ):
                conn = await client.connect(server.local_address, server_id.node_id)

                async def stream_maker() -> tuple[Stream, Stream]:
                    ours = await conn.open_stream()
                    await ours.send_all(b"!")
                    theirs = await accepted.receive()
                    return ours, theirs

                await trio.testing.check_half_closeable_stream(stream_maker, None)
                await conn.close()

    trio.run(main)
