"""The control API the CLI talks to: JSON lines over a Unix socket inside the node home.

A client sends one request line ``{"method": name, "params": {...}}``; the daemon answers
with any number of ``{"event": {...}}`` lines (progress) and then exactly one
``{"result": {...}}`` or ``{"error": {"kind": ..., "message": ...}}`` line, and closes.
A client that hangs up first cancels its request (Ctrl-C on `p2pfs fetch` stops the
transfer in the daemon; its partial state stays for a resume).
The socket is mode 0600 inside a 0700 home: only the node's owner can drive it. The daemon
holds the home's lock before it serves, so a socket found here at start is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pfs.errors import (
    LocalProtocolError,
    P2pfsError,
    blame,
    explaining_error,
    first_leaf,
)

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
PROGRESS_INTERVAL = 0.2
"""Progress events go to a client at most this often (a display rate, not a poll)."""

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[dict[str, Any]]]


class ControlServer:
    def __init__(self, socket_path: str, handlers: dict[str, Handler]) -> None:
        self.socket_path = socket_path
        self._handlers = handlers

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # left by a daemon that was killed
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            # Unlink first: on cancellation the await below raises at once.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            await listener.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await _read_request(stream)
            except LocalProtocolError as exc:
                await _send(stream, {"error": {"kind": "bad-request", "message": str(exc)}})
                return
            method = request.get("method")
            handler = self._handlers.get(method) if isinstance(method, str) else None
            if handler is None:
                message = f"unknown method {method!r}"
                await _send(stream, {"error": {"kind": "bad-request", "message": message}})
                return
            params = request.get("params") or {}

            async def emit(event: dict[str, Any]) -> None:
                await _send(stream, {"event": event})

            try:
                result = await _unless_hung_up(stream, handler(params, emit))
            except _HungUp:
                logger.info("%s cancelled: the client hung up", method)
                return
            except trio.BrokenResourceError:
                logger.debug("control client of %s went away", method)
                return
            except (P2pfsError, BaseExceptionGroup) as raised:
                ours = explaining_error(raised)
                if ours is not None:
                    logger.info("%s failed: %s", method, ours)
                    error = {"kind": blame(ours), "message": str(ours)}
                    await _send_quietly(stream, {"error": error})
                    return
                if isinstance(raised, BaseExceptionGroup) and raised.split(Exception)[1] is None:
                    # Errors only, none of ours, from a handler's nursery: a bug, as below
                    # (the group passed that boundary by, and ended the daemon).
                    await _internal_error(stream, str(method), raised)
                    return
                raise  # a cancellation among them: the node is stopping
            except Exception as exc:  # noqa: BLE001 - the boundary of one request (logged)
                # A bug here must not take the node down with it. The traceback goes to
                # the log, the client is told it was our fault.
                await _internal_error(stream, str(method), exc)
                return
            await _send_quietly(stream, {"result": result})


async def _internal_error(stream: trio.SocketStream, method: str, exc: BaseException) -> None:
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    leaf = first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
    message = f"internal error: {type(leaf).__name__}: {leaf}"
    await _send_quietly(stream, {"error": {"kind": "internal", "message": message}})


class _HungUp(Exception):
    """The control client closed its end before the answer."""


async def _unless_hung_up(
    stream: trio.SocketStream, work: Awaitable[dict[str, Any]]
) -> dict[str, Any]:
    """Run ``work`` until it finishes or the client hangs up (then cancel it)."""
    result: list[dict[str, Any]] = []
    failure: list[Exception] = []
    hung_up = False

    async def run(scope: trio.CancelScope) -> None:
        try:
            result.append(await work)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, unwrapped from the nursery
            failure.append(exc)
        scope.cancel()

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal hung_up
        try:
            while await stream.receive_some(4096):
                pass  # a client says nothing after its request; anything more is ignored
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        hung_up = True
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, nursery.cancel_scope)
        nursery.start_soon(watch, nursery.cancel_scope)
    if failure:
        raise failure[0]
    if result:
        return result[0]
    assert hung_up  # else an outer cancellation would have left the block raising
    raise _HungUp


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        if len(buffer) > MAX_REQUEST_BYTES:
            raise LocalProtocolError("control request too large")
        data = await stream.receive_some(65536)
        if not data:
            break
        buffer += data
    line = bytes(buffer).split(b"\n", 1)[0]
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise LocalProtocolError(f"control request is not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise LocalProtocolError("control request must be a JSON object")
    return request


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def _send_quietly(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    try:
        await _send(stream, message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        logger.debug("control client went away before its answer")


async def pump_progress(emit: Emit, latest: list[dict[str, Any]]) -> None:
    """Forward the newest progress to the CLI at most every PROGRESS_INTERVAL (a display
    rate, not a poll: the work itself never waits on this)."""
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        if latest:
            event = latest[-1]
            latest.clear()
            try:
                await emit(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
