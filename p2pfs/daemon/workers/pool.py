"""Main's side of the data-plane workers: warm worker processes, one session per peer.

A worker process is started before it is needed (importing trio, qh3 and the package and
loading the identity take a few hundred ms), waits for a ``hello``, serves one peer for one
fetch, and exits when main closes its pipe; a replacement is warmed once that session ends.
At most ``limit`` sessions run at once; beyond that a peer is fetched in the main process
as without workers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfs.content.chunking import ChunkRef
from p2pfs.errors import P2pfsError
from p2pfs.ids import ContentHash, NodeId

from .channel import Channel

logger = logging.getLogger(__name__)

EXIT_GRACE = 2.0
"""Seconds a worker gets to close its connection after main hangs up, before it is killed."""

FileInfo = Callable[[int], tuple[str, tuple[int, int]]]
"""A file number's temp path and (st_dev, st_ino)."""


class WorkerEndedError(P2pfsError):
    """A worker process ended its session without a reason (it died or was killed)."""


@dataclass(slots=True)
class WorkerLink:
    """One worker process serving one peer."""

    process: trio.Process
    channel: Channel
    _files: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send_batch(
        self,
        number: int,
        refs: Sequence[ChunkRef],
        targets: Sequence[Sequence[tuple[int, int]]],
        file_info: FileInfo,
    ) -> None:
        try:
            await self._send_batch(number, refs, targets, file_info)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The worker died: its peer fails, never the fetch.
            raise WorkerEndedError(f"worker process {self.pid} is gone") from exc

    async def _send_batch(
        self,
        number: int,
        refs: Sequence[ChunkRef],
        targets: Sequence[Sequence[tuple[int, int]]],
        file_info: FileInfo,
    ) -> None:
        for places in targets:
            for file_number, _offset in places:
                if file_number not in self._files:
                    path, (dev, ino) = file_info(file_number)
                    message = {"op": "file", "id": file_number, "path": path}
                    await self.channel.send({**message, "dev": dev, "ino": ino})
                    self._files.add(file_number)
        chunks = [
            [ref.id, ref.length, [list(place) for place in places]]
            for ref, places in zip(refs, targets, strict=True)
        ]
        await self.channel.send({"op": "batch", "id": number, "chunks": chunks})

    async def next_report(self) -> dict[str, Any]:
        """The next ``landed`` or ``failed``; WorkerEndedError if the process went away."""
        while True:
            try:
                message = await self.channel.receive()
            except P2pfsError as exc:
                raise WorkerEndedError(f"worker {self.pid}: {exc}") from exc
            if message is None:
                code = await self._exit_code()
                raise WorkerEndedError(f"worker process {self.pid} ended (exit {code})")
            if message["op"] in ("landed", "failed"):
                return message
            # "ready": connected; nothing to do (batches queue in the pipe until then).

    async def _exit_code(self) -> int | None:
        with trio.move_on_after(EXIT_GRACE):
            return await self.process.wait()
        return None


@dataclass(slots=True)
class WorkerPool:
    home: Path
    limit: int
    batched_receive: bool
    link_datagrams: bool = True
    verbose: bool = False
    _warm: list[trio.Process] = field(default_factory=list)
    _sessions: int = 0
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep warm processes until cancelled (the daemon's end), then end them all."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.limit):
                    nursery.start_soon(self._start_warm)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            warm, self._warm = self._warm, []
            for process in warm:
                await _end(process)  # a warm worker waiting for its hello just exits

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "p2pfs.daemon.workers", "--home", str(self.home)]
        return [*command, "-v"] if self.verbose else command

    async def _spawn(self) -> trio.Process:
        return await trio.lowlevel.open_process(
            self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    async def _start_warm(self) -> None:
        try:
            process = await self._spawn()
        except OSError as exc:
            logger.warning("cannot start a data-plane worker: %s", exc)
            return
        self._warm.append(process)

    @property
    def available(self) -> bool:
        return self._sessions < self.limit

    @asynccontextmanager
    async def session(
        self,
        peer: NodeId,
        address: tuple[str, int],
        root: ContentHash,
        *,
        streams: int,
        in_flight: int,
        stall: float,
        small_path: bool = False,
    ) -> AsyncIterator[WorkerLink | None]:
        """A worker dialling ``peer`` at ``address`` for the share ``root``; None when
        ``limit`` sessions run already or no process can be started (fetch in main).
        ``small_path``: this process keeps the path at QUIC's minimum datagram size (it
        drops bigger ones), and so must the worker's own endpoint."""
        if not self.available:
            yield None
            return
        self._sessions += 1
        process: trio.Process | None = None
        try:
            process = await self._take()
            if process is None:
                yield None
                return
            assert process.stdin is not None and process.stdout is not None
            channel = Channel(process.stdout, process.stdin)
            hello = {
                "op": "hello",
                "peer": peer.raw,
                "host": address[0],
                "port": address[1],
                "root": bytes(root),
                "batched": self.batched_receive,
                "link_datagrams": self.link_datagrams,
                "streams": streams,
                "in_flight": in_flight,
                "stall": stall,
                "small_path": small_path,
            }
            try:
                await channel.send(hello)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WorkerEndedError(f"warm worker {process.pid} is gone") from exc
            logger.info("worker %d takes peer %s at %s:%d", process.pid, peer.short(), *address)
            yield WorkerLink(process, channel)
        finally:
            self._sessions -= 1
            if process is not None:
                await _end(process)
            if self._nursery is not None and len(self._warm) + self._sessions < self.limit:
                # Warmed again only now: starting one (imports, ~0.4 CPU-s) the moment a
                # warm one is taken would compete with the transfer it was taken for.
                self._nursery.start_soon(self._start_warm)

    async def _take(self) -> trio.Process | None:
        while self._warm:
            process = self._warm.pop(0)
            if process.poll() is None:
                break
            logger.warning("warm worker %d had exited (%s)", process.pid, process.returncode)
        else:
            try:
                process = await self._spawn()
            except OSError as exc:
                logger.warning("cannot start a data-plane worker: %s", exc)
                return None
        return process


async def _end(process: trio.Process) -> None:
    """Close the worker's pipe (it ends its session and exits); kill it if it lingers."""
    assert process.stdin is not None
    with trio.CancelScope(shield=True):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await process.stdin.aclose()
        with trio.move_on_after(EXIT_GRACE):
            await process.wait()
        _kill(process)
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def _kill(process: trio.Process) -> None:
    if process.poll() is None:
        process.kill()
