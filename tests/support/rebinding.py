"""A NAT whose mapping changes: a UDP forwarder that moves the client to a new port."""

from __future__ import annotations

import socket
from typing import Any

import trio


class RebindingForwarder:
    """A UDP forwarder between one client and ``target`` standing for a NAT: after
    ``rebind()`` the client's datagrams leave from a new port, as when a NAT's mapping
    times out and the next packet gets a fresh one."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.inside = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outside: list[Any] = []
        self.client: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        """The port the client's datagrams leave from now."""
        return int(self.outside[-1].getsockname()[1])

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        try:
            await self.inside.bind(("127.0.0.1", 0))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.rebind()
                nursery.start_soon(self._from_client)
                task_status.started(self.inside.getsockname())
        finally:
            for sock in (self.inside, *self.outside):
                sock.close()

    async def rebind(self) -> None:
        """The client's datagrams leave from a new port from now on; the old mapping is
        gone (its socket closed): what the target sends there is lost."""
        fresh = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await fresh.bind(("127.0.0.1", 0))
        except BaseException:
            fresh.close()
            raise
        for old in self.outside:
            old.close()
        self.outside.append(fresh)
        self._nursery.start_soon(self._from_target, fresh)

    async def _from_client(self) -> None:
        while True:
            data, sender = await self.inside.recvfrom(65535)
            self.client = sender
            await self.outside[-1].sendto(data, self.target)

    async def _from_target(self, sock: Any) -> None:
        while True:
            try:
                data, _sender = await sock.recvfrom(65535)
            except (OSError, trio.ClosedResourceError):
                return  # the mapping is gone
            if self.client is not None:
                await self.inside.sendto(data, self.client)
