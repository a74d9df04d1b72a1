"""Blocking client of the daemon's control API (the CLI needs no async runtime)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from p2pfs.errors import LocalProtocolError, P2pfsError, RemoteProtocolError

SOCKET_NAME = "control.sock"


class DaemonNotRunning(LocalProtocolError):
    """No daemon answers on this home's control socket."""


class DaemonError(P2pfsError):
    """The daemon refused or failed the request; ``kind`` says whose fault."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def call(
    socket_path: str,
    method: str,
    params: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Send one request; feed progress events to ``on_event``; return the result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no p2pfs daemon is running for this home ({socket_path}); "
                "start one with `p2pfs daemon`"
            ) from exc
        request = {"method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise RemoteProtocolError(f"the daemon sent a malformed line: {exc}") from exc
                if "event" in message:
                    if on_event is not None:
                        on_event(message["event"])
                    continue
                if "error" in message:
                    error = message["error"]
                    raise DaemonError(str(error.get("kind")), str(error.get("message")))
                result: dict[str, Any] = message["result"]
                return result
        raise RemoteProtocolError("the daemon closed the connection without an answer")
    finally:
        sock.close()
