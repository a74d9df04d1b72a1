"""Item 8 of issue 12: a flood of valid Initials cannot take the handshake slots.

The flood comes from 250 distinct loopback addresses (all of 127/8 is loopback), as a
spoofer's would, and never reads the answers. Bounds checked: an honest client connects
during the flood (through a Retry once the server is busy), the half-open handshakes stay
within their caps, and the endpoint survives.
"""

from __future__ import annotations

import pytest
import trio

from p2pfs.identity import Identity
from p2pfs.net import ENGINES, TransportConfig, open_endpoint
from tests.support.fuzz import (
    capture_client_hello,
    connect_during_flood,
    echo_handler,
    flood,
    honest_exchange,
    open_flood_sockets,
)


@pytest.mark.parametrize("engine", ENGINES)
def test_honest_client_connects_during_an_initial_flood(engine: str, fuzz_seed: int) -> None:
    _elapsed, sent, retries = trio.run(connect_during_flood, engine, 2000, fuzz_seed)
    assert sent == 2000, f"seed {fuzz_seed}"
    assert retries > 0, f"seed {fuzz_seed}: the busy server never asked for a Retry"


@pytest.mark.parametrize("engine", ENGINES)
def test_one_address_holds_few_handshake_slots(engine: str, fuzz_seed: int) -> None:
    config = TransportConfig()
    server_id = Identity.generate()
    hello = capture_client_hello(engine)

    async def main() -> int:
        async with open_endpoint(server_id, handler=echo_handler, engine=engine) as server:
            socks = await open_flood_sockets(1)
            with socks[0]:
                await flood(server.local_address, socks, hello, 300, fuzz_seed)
            # Honest traffic is read after the flood (one socket, in order), so by the time
            # it completes every flooded Initial has been handled.
            async with open_endpoint(Identity.generate(), engine=engine) as client:
                with trio.fail_after(30):
                    await honest_exchange(client, server.local_address, server_id)
            return server.pending_handshakes

    pending = trio.run(main)
    assert pending <= config.max_pending_per_ip, f"seed {fuzz_seed}"
