"""Serving the HTTP API: the key in the home, the listening socket, hypercorn under trio.

hypercorn is used (not a server of our own) because it runs ASGI apps on trio directly, in
the daemon's own nursery: no second event loop, no thread. The socket is bound here so that
a taken port falls back to a free one (several nodes on one machine all default to 8384).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pfs.errors import LocalProtocolError

from .app import ApiApp

logger = logging.getLogger(__name__)

KEY_NAME = "api.key"
DEFAULT_GUI_PORT = 8384


@dataclass(frozen=True, slots=True)
class ApiInfo:
    url: str
    key: str

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "key": self.key, "ui": f"{self.url}/#key={self.key}"}


def load_key(home: Path) -> str:
    """The node's API key, made on first use (owner-only, like everything in the home)."""
    path = home / KEY_NAME
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if len(key) < 20:
        key = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or on a free port of ``host`` when that
    port is taken (logged: the URL is in `p2pfs id`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            logger.info("GUI port %d on %s is taken; using a free one", port, host)
            sock.bind((host, 0))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise LocalProtocolError(f"cannot serve the API on {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


def load_http_stack() -> None:
    """Import hypercorn (~0.1 s): in a worker thread, so the control socket (already up)
    answers meanwhile; a daemon with --no-gui never pays it."""
    importlib.import_module("hypercorn.trio")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    app: ApiApp,
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``sock`` (already listening) until cancelled."""
    # Imported by load_http_stack first (these are then lookups).
    from hypercorn.config import Config  # noqa: PLC0415
    from hypercorn.trio import serve as hypercorn_serve  # noqa: PLC0415

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("p2pfs.api.hypercorn")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]
