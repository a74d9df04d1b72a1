"""The UDP socket's kernel buffers: asking for them, and what the kernel granted.

A stock Linux caps an unprivileged ``SO_RCVBUF`` at ``net.core.rmem_max`` (212,992 bytes,
doubled to ~416 KiB for the kernel's bookkeeping): a few milliseconds of a fast transfer,
so any event-loop pause beyond that loses datagrams, and each loss halves the sender's
congestion window. So the endpoint asks for its full size, then with ``SO_RCVBUFFORCE``
(which a process with CAP_NET_ADMIN may use past the cap), reads back what it got, and
says once, with the setting to raise, when that is short. Some kernels (the BSDs, macOS)
refuse a size above their limit outright rather than capping it: there the size is halved
until one is accepted, so a node still starts.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Linux's values; the socket module does not export them.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SMALLEST_ASKED = 64 * 1024
_FORCING = {socket.SO_RCVBUF: SO_RCVBUFFORCE, socket.SO_SNDBUF: SO_SNDBUFFORCE}


@dataclass(frozen=True, slots=True)
class SocketBuffers:
    """What a socket asked for and what its kernel granted, in the units asked (Linux
    reports twice the granted size; that is halved here)."""

    wanted: int
    receive: int
    send: int

    @property
    def short(self) -> bool:
        return self.receive < self.wanted or self.send < self.wanted

    def advice(self) -> str:
        """One sentence for a log or a status line: what is short and how to raise it."""
        short = [
            (name, granted, cap)
            for name, granted, cap in (
                ("receive", self.receive, "net.core.rmem_max"),
                ("send", self.send, "net.core.wmem_max"),
            )
            if granted < self.wanted
        ]
        if not short:
            return ""
        granted = ", ".join(f"{name} {size // 1024} KiB" for name, size, _ in short)
        text = f"UDP socket buffers below the {self.wanted // 1024} KiB asked: {granted}"
        if sys.platform == "linux":
            settings = " ".join(f"{cap}={self.wanted}" for _, _, cap in short)
            text += f" (the kernel's cap; raise it with sysctl -w {settings})"
        return text + "; fast transfers will lose datagrams while the daemon is busy"


def size_buffers(sock: socket.socket, wanted: int) -> SocketBuffers:
    """Ask for ``wanted`` bytes of receive and send buffer on ``sock``; returns what the
    kernel granted. Never raises for a size the kernel will not give."""
    receive = _ask(sock, socket.SO_RCVBUF, wanted)
    return SocketBuffers(wanted, receive, _ask(sock, socket.SO_SNDBUF, wanted))


def _ask(sock: socket.socket, option: int, wanted: int) -> int:
    size = wanted
    while True:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            break
        except OSError:  # a kernel that refuses sizes above its limit
            if size <= SMALLEST_ASKED:
                return _granted(sock, option)
            size //= 2
    if _granted(sock, option) < wanted and sys.platform == "linux":
        try:
            sock.setsockopt(socket.SOL_SOCKET, _FORCING[option], wanted)
        except PermissionError:  # no CAP_NET_ADMIN: the cap stands
            pass
        except OSError as exc:
            logger.debug("forcing the socket buffer failed: %s", exc)
    return _granted(sock, option)


def _granted(sock: socket.socket, option: int) -> int:
    value = sock.getsockopt(socket.SOL_SOCKET, option)
    # Linux doubles the size asked (half is the kernel's bookkeeping) and reports that.
    return value // 2 if sys.platform == "linux" else value


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for ``sock`` (its receive buffer was full, or a
    checksum failed), from /proc/net/udp[6]; None where that is not readable."""
    if sys.platform != "linux":
        return None
    inode = str(os.fstat(sock.fileno()).st_ino)
    table = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
    try:
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if len(fields) > 12 and fields[9] == inode:
                    return int(fields[12])
    except (OSError, ValueError, StopIteration):
        return None
    return None
