"""The worker process: ``python -m p2pfs.daemon.workers --home HOME``.

Started by the daemon (warm, before it is needed): it loads the node's identity from the
same home (so the peer authenticates it as this node; it never takes the home's lock or
touches the index), then waits on stdin for a ``hello`` naming one peer. It opens its own
QUIC endpoint (its own UDP socket, an ephemeral port), dials the peer with its NodeId
pinned, and runs the request streams: each batch main hands over becomes one GetChunks;
every chunk is verified against its id (BLAKE3) before anything of the batch is written,
then written with ``pwrite`` into the temp files main named (only into the inode main
opened: a file replaced under its name is refused). Main learns which batches landed and
does everything else (picking, accounting, commits, progress, serving).

Anything that goes wrong ends this process's session with one ``failed`` report; main
treats it as that peer failing. Streams the peer opens on this connection are refused
(reset): the worker serves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.errors import IntegrityError, P2pfsError, StorageError
from p2pfs.home import load_identity
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import PeerConnection, TransportConfig, open_endpoint
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import ChunkData, ErrorReply, GetChunks

from ..requests import PeerRequestError, RequestStream
from ..streams import TransferCounters
from .channel import Channel

logger = logging.getLogger(__name__)

_OPEN = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
CONNECT_TIMEOUT = 10.0
"""The daemon is connected to this peer already: a worker that cannot reach it in this long
reports the peer's connection failed."""


class WorkerStalledError(P2pfsError):
    """The peer sent nothing for the stall timeout while a batch was outstanding."""


@dataclass(frozen=True, slots=True)
class Batch:
    number: int
    refs: tuple[ChunkRef, ...]
    targets: list[list[tuple[int, int]]]
    """Per chunk: (file id, offset) of every place it goes."""


@dataclass(slots=True)
class TempFile:
    path: str
    identity: tuple[int, int]


@dataclass(slots=True)
class Session:
    conn: PeerConnection
    channel: Channel
    root: ContentHash
    streams: int
    in_flight: int
    stall: float
    files: dict[int, TempFile] = field(default_factory=dict)
    counters: TransferCounters = field(default_factory=TransferCounters)

    async def run(self) -> None:
        batches_send, batches = trio.open_memory_channel[Batch](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refuse_streams)
            for _ in range(self.streams):
                nursery.start_soon(self._stream, batches)
            async with batches_send:
                while (message := await self.channel.receive()) is not None:
                    if message["op"] == "file":
                        identity = (int(message["dev"]), int(message["ino"]))
                        self.files[int(message["id"])] = TempFile(str(message["path"]), identity)
                    elif message["op"] == "batch":
                        batches_send.send_nowait(_batch(message))
                    else:
                        break  # "stop", or anything else: the session is over
            # Main hung up (or said stop): nothing more to do for anyone.
            nursery.cancel_scope.cancel()

    async def _refuse_streams(self) -> None:
        while True:
            stream = await self.conn.accept_stream()
            stream.reset(int(ErrorCode.BUSY))

    async def _stream(self, batches: trio.MemoryReceiveChannel[Batch]) -> None:
        """One request stream: the next request is queued at the peer before the current
        one is answered (``in_flight`` per stream), replies read in order."""
        stream = await RequestStream.open(self.conn, self.counters)
        sent_send, sent = trio.open_memory_channel[Batch](self.in_flight - 1)

        async def sender() -> None:
            async with sent_send:
                async for batch in batches:
                    await stream.send(GetChunks(stream.new_request_id(), self.root, batch.refs))
                    try:
                        await sent_send.send(batch)
                    except trio.BrokenResourceError:
                        return  # the reader stopped; its own error says why

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            async with sent:
                async for batch in sent:
                    await self._receive(stream, batch)

    async def _receive(self, stream: RequestStream, batch: Batch) -> None:
        payloads: list[bytes | memoryview] = []
        for _ref in batch.refs:
            reply = stream.buffered_reply()
            if reply is None:
                with trio.move_on_after(self.stall) as stalled:
                    reply = await stream.next_reply()
                if stalled.cancelled_caught:
                    raise WorkerStalledError(f"peer sent nothing for {self.stall:.0f} s")
            if isinstance(reply, ErrorReply):
                raise PeerRequestError(reply.code, reply.message)
            assert isinstance(reply, ChunkData)  # the session checked order and length
            payloads.append(reply.payload)
        files = {number: self.files[number] for places in batch.targets for number, _ in places}
        gone = await trio.to_thread.run_sync(write_verified, batch, payloads, files)
        size = sum(len(data) for data in payloads)
        await self.channel.send({"op": "landed", "id": batch.number, "bytes": size, "gone": gone})


def _batch(message: dict[str, Any]) -> Batch:
    refs = []
    targets = []
    for chunk, length, places in message["chunks"]:
        refs.append(ChunkRef(ContentHash(bytes(chunk)), int(length)))
        targets.append([(int(number), int(offset)) for number, offset in places])
    return Batch(int(message["id"]), tuple(refs), targets)


def write_verified(
    batch: Batch, payloads: list[bytes | memoryview], files: dict[int, TempFile]
) -> list[int]:
    """Verify every chunk of the batch, then write each into its places; returns the ids
    of temp files no longer there (committed by main meanwhile: nothing left to write)."""
    for ref, data in zip(batch.refs, payloads, strict=True):
        if len(data) != ref.length or chunk_id(data) != ref.id:
            raise IntegrityError(f"chunk {ref.id.hex()[:16]} fails its hash")
    descriptors: dict[int, int] = {}
    gone: list[int] = []
    try:
        for data, places in zip(payloads, batch.targets, strict=True):
            for number, offset in places:
                if number in gone:
                    continue
                fd = descriptors.get(number)
                if fd is None:
                    fd = _open_temp(files[number])
                    if fd < 0:
                        gone.append(number)
                        continue
                    descriptors[number] = fd
                _pwrite_all(fd, data, offset, files[number].path)
    finally:
        for fd in descriptors.values():
            os.close(fd)
    return gone


def _open_temp(temp: TempFile) -> int:
    """The temp file main opened, or -1 if it is gone; another file under its name is an
    error (never written)."""
    try:
        fd = os.open(temp.path, _OPEN)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        raise StorageError(f"cannot open {temp.path}: {exc.strerror}") from exc
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) != temp.identity or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StorageError(f"{temp.path} is not the temp file the daemon opened")
    return fd


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def failure_of(error: BaseException) -> dict[str, Any]:
    """The ``failed`` report for what ended a session."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    code = 0
    if isinstance(error, IntegrityError):
        kind = "integrity"
    elif isinstance(error, PeerRequestError):
        kind, code = "refused", int(error.code)
    elif isinstance(error, WorkerStalledError):
        kind = "stalled"
    elif isinstance(error, StorageError):
        kind = "storage"
    elif isinstance(error, P2pfsError | OSError | trio.TooSlowError):
        kind = "closed"
    else:
        kind = "internal"
    return {
        "op": "failed",
        "kind": kind,
        "code": code,
        "message": str(error) or type(error).__name__,
    }


async def serve(home: Path) -> None:
    """Wait for a hello, dial that peer, run the session until main hangs up."""
    identity = load_identity(home)
    channel = Channel(trio.lowlevel.FdStream(os.dup(0)), trio.lowlevel.FdStream(os.dup(1)))
    hello = await channel.receive()
    if hello is None or hello["op"] != "hello":
        return  # the daemon stopped before it needed this worker
    host, port = str(hello["host"]), int(hello["port"])
    config = TransportConfig(
        batched_receive=bool(hello["batched"]),
        link_sized_datagrams=bool(hello.get("link_datagrams", True)),
    )
    bind = "::" if ":" in host else "0.0.0.0"
    try:
        async with open_endpoint(identity, bind, 0, config=config) as endpoint:
            if hello.get("small_path"):
                endpoint.keep_path_small(host)
            with trio.fail_after(CONNECT_TIMEOUT):
                conn = await endpoint.connect((host, port), NodeId(bytes(hello["peer"])))
            await channel.send({"op": "ready"})
            session = Session(
                conn,
                channel,
                ContentHash(bytes(hello["root"])),
                int(hello["streams"]),
                int(hello["in_flight"]),
                float(hello["stall"]),
            )
            await session.run()
            conn.close_nowait(0, "worker done")
    except (P2pfsError, OSError, trio.TooSlowError) as error:
        logger.info("worker for %s:%d ends: %s", host, port, error)
        await _report(channel, failure_of(error))
    except BaseExceptionGroup as group:
        unexpected = group.subgroup(
            lambda e: (
                not isinstance(e, BaseExceptionGroup | P2pfsError | OSError | trio.TooSlowError)
            )
        )
        await _report(channel, failure_of(group))
        if unexpected is not None:
            raise


async def _report(channel: Channel, message: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await channel.send(message)  # main may be gone: nobody to tell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfs.daemon.workers")
    parser.add_argument("--home", required=True)
    parser.add_argument("-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.v else logging.WARNING,
        format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(serve, Path(args.home))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return 0
        raise
    return 0
