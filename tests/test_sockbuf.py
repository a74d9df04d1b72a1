"""The UDP socket's kernel buffers (net/sockbuf.py), on real sockets of this kernel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfs.net.sockbuf import SocketBuffers, kernel_drops, size_buffers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux's socket options")

RMEM_MAX = Path("/proc/sys/net/core/rmem_max")


def _kernel_cap() -> int:
    return min(int(RMEM_MAX.read_text()), int(Path("/proc/sys/net/core/wmem_max").read_text()))


def test_a_size_under_the_kernels_cap_is_granted_whole() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        wanted = min(_kernel_cap(), 256 * 1024)
        buffers = size_buffers(sock, wanted)
    assert buffers == SocketBuffers(wanted, wanted, wanted)
    assert not buffers.short
    assert buffers.advice() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_RCVBUFFORCE needs CAP_NET_ADMIN")
def test_a_size_past_the_cap_is_forced_where_the_process_may() -> None:
    wanted = 2 * _kernel_cap()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        buffers = size_buffers(sock, wanted)
    assert buffers.receive == wanted
    assert buffers.send == wanted


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the capability from a root process")
def test_without_the_capability_the_cap_stands_and_is_named() -> None:
    """A process without CAP_NET_ADMIN (setpriv drops it, as for any unprivileged
    daemon) gets the kernel's cap and the advice names the setting to raise."""
    cap = _kernel_cap()
    script = (
        "import socket, json\n"
        "from p2pfs.net.sockbuf import size_buffers\n"
        f"b = size_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), {2 * cap})\n"
        "print(json.dumps([b.receive, b.send, b.short, b.advice()]))\n"
    )
    completed = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    receive, send, short, advice = json.loads(completed.stdout)
    assert (receive, send, short) == (cap, cap, True)
    assert f"net.core.rmem_max={2 * cap}" in advice
    assert f"net.core.wmem_max={2 * cap}" in advice


def test_kernel_drops_counts_datagrams_lost_at_a_full_buffer() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.bind(("127.0.0.1", 0))
        assert kernel_drops(receiver) == 0
        for _ in range(200):  # never read: the buffer fills after a few
            sender.sendto(b"x" * 1200, receiver.getsockname())
        deadline = time.monotonic() + 5
        while (kernel_drops(receiver) or 0) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        dropped = kernel_drops(receiver)
    assert dropped is not None and 150 <= dropped < 200


def test_kernel_drops_finds_an_ipv6_socket() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        assert kernel_drops(sock) == 0
