"""Messages between the daemon and a data-plane worker process: msgpack maps over a pipe.

msgpack is self-delimiting, so no length prefix is needed. Both ends are this code (the
worker is started by the daemon from the same installation), so a message that does not
parse is a bug; it ends the worker's session, never the daemon.

Main -> worker:
- ``{"op": "hello", "peer", "host", "port", "root", "batched", "link_datagrams",
  "streams", "in_flight", "stall", "small_path"}``: the peer to dial (its NodeId pinned)
  and the share (``small_path``: the daemon keeps that path at QUIC's minimum datagrams);
- ``{"op": "file", "id", "path", "dev", "ino"}``: a temp file chunks may be written into (the
  worker writes only into that inode);
- ``{"op": "batch", "id", "chunks": [[chunk id, length, [[file id, offset], ...]], ...]}``:
  one GetChunks worth of pieces and where each goes.

Worker -> main:
- ``{"op": "ready"}`` once connected and authenticated;
- ``{"op": "landed", "id", "bytes", "gone": [file id, ...]}``: every chunk of the batch
  verified and written (``gone``: temp files that no longer exist, committed meanwhile);
- ``{"op": "failed", "kind", "code", "message"}``: the session ended (kinds in ``FAILURES``).
"""

from __future__ import annotations

from typing import Any

import msgpack
import trio

from p2pfs.errors import P2pfsError

RECEIVE_BYTES = 1 << 16
MAX_MESSAGE = 16 << 20
"""A batch is at most 64 chunk refs (a few KiB); anything near this is a bug."""

FAILURES = ("integrity", "refused", "stalled", "closed", "storage", "internal")
"""Why a worker's session ended: the peer sent a chunk failing verification; the peer
answered a request with an error; the peer sent nothing for the stall timeout; the
connection failed or closed; a temp file could not be written; anything else."""


class WorkerChannelError(P2pfsError):
    """The other end of a daemon-worker pipe sent something that is not a message."""


class Channel:
    """One end of the pipe: send a map, receive the next map (None once the pipe ends)."""

    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream) -> None:
        self._receive = receive
        self._send = send
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        # Several tasks send; a message must go out whole before the next one starts.
        async with self._send_lock:
            await self._send.send_all(data)

    async def receive(self) -> dict[str, Any] | None:
        while True:
            try:
                message = next(self._unpacker)
            except StopIteration:
                pass
            except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
                raise WorkerChannelError(f"unreadable message on the worker pipe: {exc}") from exc
            else:
                if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                    raise WorkerChannelError(f"not a message on the worker pipe: {message!r:.80}")
                return message
            try:
                data = await self._receive.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            try:
                self._unpacker.feed(data)
            except msgpack.BufferFull as exc:
                raise WorkerChannelError("message too large on the worker pipe") from exc

    async def aclose(self) -> None:
        await self._send.aclose()
