"""Item 2 of issue 12: frames and msgpack cannot exhaust a serving node.

A real share service on a real endpoint; the hostile client writes raw frames. Bounds
checked for each bomb: the stream ends with an error code, this process's RSS grows by less
than 64 MiB, and an honest request on the same connection is answered afterwards.
"""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import trio

from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.frames import Frame, encode_frame, frame_header
from p2pfs.wire.messages import (
    ChunkData,
    GetManifest,
    GetNodes,
    NodesReply,
    decode_message_untrusted,
)
from tests.hostile.service_harness import (
    MiB,
    ending,
    honest_request_answered,
    raw_stream,
    rss,
    send_ignoring_reset,
    served,
)

RSS_BOUND = 64 * MiB


def nested_empty_arrays(size: int) -> bytes:
    """The issue's bomb: an array of 1,024 arrays of 1,024 empty arrays, and so on, cut to
    ``size`` bytes (every list within the old decoder's 1,024-item bound; 16 MiB of it is
    16 M Python lists, ~1.25 GiB)."""
    inner = b"\xdc\x04\x00" + b"\x90" * 1024
    body = b"\xdc\x04\x00" + inner * (size // len(inner) + 1)
    return body[:size]


def test_a_frame_of_nested_empty_arrays(tmp_path: Path) -> None:
    async def main() -> tuple[list[ErrorCode | None], int]:
        async with served(tmp_path) as s:
            before = rss()
            codes = []
            # Within the request size bound, so only the object and depth bounds stop it.
            small = encode_frame(GetNodes.TAG, nested_empty_arrays(16 * 1024))
            # The 16 MiB version: refused from its header alone.
            large = frame_header(GetNodes.TAG, 16 * MiB) + nested_empty_arrays(16 * MiB)
            for bomb in (small, large):
                stream, _session = await raw_stream(s.conn)
                await send_ignoring_reset(stream, bomb)
                codes.append(await ending(stream))
            growth = rss() - before
            assert await honest_request_answered(s.conn)
            return codes, growth

    codes, growth = trio.run(main)
    assert codes == [ErrorCode.PROTOCOL_VIOLATION, ErrorCode.FRAME_TOO_LARGE]
    assert growth < RSS_BOUND


def test_eight_streams_of_half_sent_large_frames(tmp_path: Path) -> None:
    async def main() -> tuple[list[ErrorCode | None], int]:
        # Attacker and victim share this process: the attacker's half frame is one shared
        # buffer, allocated before the measurement starts, and is sent without copies.
        half_frame = bytes(8 * MiB)
        async with served(tmp_path) as s:
            before = rss()
            streams = [(await raw_stream(s.conn))[0] for _ in range(8)]
            codes: list[ErrorCode | None] = []

            async def half_send(index: int) -> None:
                # A reply tag (a client may not send one) and a request tag, both 16 MiB.
                tag = ChunkData.TAG if index % 2 else GetNodes.TAG
                stream = streams[index]
                await send_ignoring_reset(stream, frame_header(tag, 16 * MiB))
                await send_ignoring_reset(stream, half_frame)
                codes.append(await ending(stream))

            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(half_send, index)
            growth = rss() - before
            assert await honest_request_answered(s.conn)
            return codes, growth

    codes, growth = trio.run(main)
    assert (
        sorted(c or 0 for c in codes)
        == [ErrorCode.PROTOCOL_VIOLATION] * 4 + [ErrorCode.FRAME_TOO_LARGE] * 4
    )
    assert growth < RSS_BOUND


def test_a_frame_left_unfinished_is_reset(tmp_path: Path) -> None:
    async def main() -> ErrorCode | None:
        async with served(tmp_path) as s:
            s.service.frame_deadline = 0.5
            stream, _session = await raw_stream(s.conn)
            whole = encode_frame(GetManifest.TAG, msgpack.packb([1, bytes(32)]))
            await stream.send_all(whole[:-3])  # then nothing more, ever
            code = await ending(stream)
            assert await honest_request_answered(s.conn)
            return code

    assert trio.run(main) is ErrorCode.PROTOCOL_VIOLATION


def test_a_message_before_hello_is_refused_from_its_header(tmp_path: Path) -> None:
    async def main() -> ErrorCode | None:
        async with served(tmp_path) as s:
            stream = await s.conn.open_stream()
            # A 64 KiB GetNodes header where the Hello must be: refused before buffering.
            await send_ignoring_reset(stream, struct.pack(">IB", 64 * 1024, GetNodes.TAG))
            code = await ending(stream)
            assert await honest_request_answered(s.conn)
            return code

    assert trio.run(main) is ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize("size", [1024, 16 * MiB - 64])
def test_a_reply_of_nested_arrays_is_refused_cheaply(size: int) -> None:
    """The client side: a hostile server's 16 MiB NodesReply of nested arrays."""
    before = rss()
    frame = Frame(NodesReply.TAG, memoryview(nested_empty_arrays(size)))
    with pytest.raises(WireError) as info:
        decode_message_untrusted(frame)
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert rss() - before < RSS_BOUND
