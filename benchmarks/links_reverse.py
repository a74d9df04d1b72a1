"""The raw engine's bulk stream the other way round, for ``python -m benchmarks links
--raw-reverse``: the *sender* listens and the *receiver* dials, as in a p2pfs fetch (the
fetcher dials the node that serves), where the transport bench's sender dials its receiver.
The same p2pfs.net endpoint and default TransportConfig; one stream, a 2-byte request, then
``size`` bytes back. Roles run as ``python -m benchmarks.links_reverse --role serve|pull``
and print JSON lines like the transport bench's roles.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import trio

from p2pfs.errors import ConnectionClosedError
from p2pfs.identity import Identity
from p2pfs.ids import node_id_untrusted
from p2pfs.net import PeerConnection, TransportConfig, open_endpoint

MiB = 1 << 20
BLOCK = MiB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def serve(size: int, batched: bool) -> None:
    """Listen; send ``size`` bytes on the first stream a client opens, then wait for its
    close (the client reads by length: a lost FIN must not stall the bench)."""
    identity = Identity.generate()
    finished = trio.Event()
    result: dict[str, Any] = {}
    block = bytes(range(256)) * (BLOCK // 256)

    async def handler(conn: PeerConnection) -> None:
        try:
            stream = await conn.accept_stream()
            await stream.receive_some(2)
            start, cpu0 = time.perf_counter(), _cpu()
            left = size
            while left:
                piece = block[: min(left, BLOCK)]
                await stream.send_all(piece)
                left -= len(piece)
            await stream.send_eof()
            await conn.wait_closed()
            result.update(bytes=size, seconds=time.perf_counter() - start, cpu=_cpu() - cpu0)
        except ConnectionClosedError:
            result.setdefault("cpu", _cpu() - cpu0)
        finally:
            finished.set()

    config = TransportConfig(batched_receive=batched)
    async with open_endpoint(identity, handler=handler, config=config) as endpoint:
        _emit({"port": endpoint.local_address[1], "node_id": str(identity.node_id)})
        await finished.wait()
    _emit({**result, "role": "sender"})


async def pull(port: int, node_id: str, size: int, batched: bool) -> None:
    config = TransportConfig(batched_receive=batched)
    async with open_endpoint(Identity.generate(), config=config) as endpoint:
        conn = await endpoint.connect(("127.0.0.1", port), node_id_untrusted(node_id))
        stream = await conn.open_stream()
        await stream.send_all(b"go")
        first = await stream.receive_some(BLOCK)
        start, cpu0 = time.perf_counter(), _cpu()
        total = len(first)
        while total < size and (chunk := await stream.receive_some(BLOCK)):
            total += len(chunk)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
        await conn.close()
    _emit({"bytes": total, "seconds": seconds, "cpu": cpu, "role": "receiver"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.links_reverse")
    parser.add_argument("--role", choices=["serve", "pull"], required=True)
    parser.add_argument("--size", type=int, required=True, help="bytes")
    parser.add_argument("--port", type=int)
    parser.add_argument("--node-id")
    parser.add_argument("--batched-receive", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "serve":
        trio.run(serve, args.size, args.batched_receive)
    else:
        trio.run(pull, args.port, args.node_id, args.size, args.batched_receive)


if __name__ == "__main__":
    main()
