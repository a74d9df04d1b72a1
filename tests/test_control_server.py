"""The control socket's request boundary (daemon/control_server.py), over a real Unix
socket: a request that fails, however it fails, ends alone with an error answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from p2pfs.daemon.control_client import DaemonError, call
from p2pfs.daemon.control_server import ControlServer
from p2pfs.errors import StorageError

Emit = Any


async def ok(_params: dict[str, Any], _emit: Emit) -> dict[str, Any]:
    await trio.lowlevel.checkpoint()
    return {"fine": True}


async def bug_in_a_nursery(_params: dict[str, Any], _emit: Emit) -> dict[str, Any]:
    async def broken() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("a bug met inside a handler's task")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(broken)
    return {}


async def plain_bug(_params: dict[str, Any], _emit: Emit) -> dict[str, Any]:
    await trio.lowlevel.checkpoint()
    raise RuntimeError("boom")


async def ours_in_a_nursery(_params: dict[str, Any], _emit: Emit) -> dict[str, Any]:
    async def full() -> None:
        await trio.lowlevel.checkpoint()
        raise StorageError("no space left")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(full)
    return {}


@pytest.mark.parametrize(
    ("method", "kind", "message"),
    [
        ("bug_in_a_nursery", "internal", "KeyError"),
        ("plain_bug", "internal", "RuntimeError: boom"),
        ("ours_in_a_nursery", "StorageError", "no space left"),
    ],
)
def test_a_failing_request_is_answered_and_the_server_goes_on(
    tmp_path: Path, method: str, kind: str, message: str
) -> None:
    """A bug inside a handler's nursery came out as an exception group with none of our
    errors in it: the boundary re-raised it and it ended the daemon."""
    path = str(tmp_path / "control.sock")
    handlers = {
        "ok": ok,
        "bug_in_a_nursery": bug_in_a_nursery,
        "plain_bug": plain_bug,
        "ours_in_a_nursery": ours_in_a_nursery,
    }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(ControlServer(path, handlers).serve)
            with pytest.raises(DaemonError) as failed:
                await trio.to_thread.run_sync(call, path, method)
            assert failed.value.kind == kind
            assert message in str(failed.value)
            assert await trio.to_thread.run_sync(call, path, "ok") == {"fine": True}
            nursery.cancel_scope.cancel()

    trio.run(main)
