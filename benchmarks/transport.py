"""Raw transport ceiling: one bulk stream between two processes over loopback.

    python -m benchmarks.transport [--size MiB] [--engine qh3|aioquic] [--json]

A receiver process and a sender process (so each side has its own interpreter and core, as
two nodes would) move ``--size`` MiB through one stream of p2pfs.net with the default
TransportConfig (on loopback, datagrams of up to 60,000 bytes: net/pathsize.py;
``--base-datagrams``: 1,350). Reported per engine: MB/s at the receiver (first byte to EOF) and CPU
seconds per GiB of each process (getrusage over the transfer). A TCP loopback transfer of
the same size between two processes is measured in the same run as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import trio

from benchmarks import child_env
from p2pfs.errors import ConnectionClosedError
from p2pfs.identity import Identity
from p2pfs.ids import node_id_untrusted
from p2pfs.net import PeerConnection, TransportConfig, open_endpoint

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 1 * MiB
# aioquic moves ~20 MB/s; a smaller default keeps its row from dominating the run.
AIOQUIC_DEFAULT_MIB = 128
RUN_TIMEOUT = 300


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# -- QUIC roles (run in child processes) ----------------------------------------------------
# The data goes from the sender to the receiver; either of them may be the one that listens.
# By default the receiver listens and the sender dials; with ``--listener sender`` the
# receiver dials, as a p2pfs fetcher dials the node that serves it (QUIC's two roles do not
# send alike under loss: see SPEC "Real links"). The dialler opens the one stream (a
# receiver that dials asks with 2 bytes); the receiver reads by length, so a lost FIN cannot
# stall the bench, and answers "ok"; the sender closes the connection once it has the answer
# (closing any earlier could drop the "ok" still in flight).


async def _send_bulk(stream: Any, size: int) -> dict[str, Any]:
    block = bytes(range(256)) * (CHUNK // 256)
    start, cpu0 = time.perf_counter(), _cpu()
    left = size
    while left:
        piece = block[: min(left, CHUNK)]
        await stream.send_all(piece)
        left -= len(piece)
    await stream.send_eof()
    answer = b""
    while len(answer) < 2 and (more := await stream.receive_some(2)):
        answer += more
    if answer != b"ok":
        raise ConnectionClosedError("the receiver closed before it had everything")
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
    return {"bytes": size, "seconds": seconds, "cpu": cpu, "role": "sender"}


async def _receive_bulk(stream: Any, size: int) -> dict[str, Any]:
    first = await stream.receive_some(CHUNK)
    start, cpu0 = time.perf_counter(), _cpu()
    total = len(first)
    while total < size and (chunk := await stream.receive_some(CHUNK)):
        total += len(chunk)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
    # The sender may close the connection as soon as this arrives; our FIN may not get
    # out first, and that is fine.
    with contextlib.suppress(ConnectionClosedError):
        await stream.send_all(b"ok")
        await stream.send_eof()
    return {"bytes": total, "seconds": seconds, "cpu": cpu, "role": "receiver"}


async def _move(conn: PeerConnection, stream: Any, role: str, size: int) -> dict[str, Any]:
    if role == "sender":
        result = await _send_bulk(stream, size)
        await conn.close()
    else:
        result = await _receive_bulk(stream, size)
        await conn.wait_closed()
    return result


async def _listen(role: str, engine: str, size: int, config: TransportConfig) -> None:
    identity = Identity.generate()
    finished = trio.Event()
    result: dict[str, Any] = {}

    async def handler(conn: PeerConnection) -> None:
        try:
            stream = await conn.accept_stream()
            if role == "sender":
                await stream.receive_some(2)
            result.update(await _move(conn, stream, role, size))
        finally:
            finished.set()

    async with open_endpoint(identity, handler=handler, engine=engine, config=config) as endpoint:
        _emit({"port": endpoint.local_address[1], "node_id": str(identity.node_id)})
        await finished.wait()
    _emit(result)


async def _dial(
    role: str, engine: str, port: int, node_id: str, size: int, config: TransportConfig
) -> None:
    async with open_endpoint(Identity.generate(), engine=engine, config=config) as endpoint:
        conn = await endpoint.connect(("127.0.0.1", port), node_id_untrusted(node_id))
        stream = await conn.open_stream()
        if role == "receiver":
            await stream.send_all(b"go")
        result = await _move(conn, stream, role, size)
    _emit(result)


# -- TCP reference roles --------------------------------------------------------------------


def _tcp_receiver() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        _emit({"port": server.getsockname()[1]})
        conn, _ = server.accept()
        with conn:
            buf = bytearray(CHUNK)
            total = conn.recv_into(buf)
            start, cpu0 = time.perf_counter(), _cpu()
            while n := conn.recv_into(buf):
                total += n
            _emit(
                {
                    "bytes": total,
                    "seconds": time.perf_counter() - start,
                    "cpu": _cpu() - cpu0,
                    "role": "receiver",
                }
            )


def _tcp_sender(port: int, size: int) -> None:
    block = bytes(range(256)) * (CHUNK // 256)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start, cpu0 = time.perf_counter(), _cpu()
        left = size
        while left:
            piece = block[: min(left, CHUNK)]
            sock.sendall(piece)
            left -= len(piece)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        cpu = _cpu() - cpu0
    _emit({"bytes": size, "seconds": time.perf_counter() - start, "cpu": cpu, "role": "sender"})


# -- orchestration --------------------------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.transport", *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def _run_pair(kind: str, size: int, batched: bool, base_datagrams: bool) -> dict[str, Any]:
    """Start receiver then sender for ``kind`` ("tcp" or an engine); collect their records."""
    extra = ["--batched-receive"] if batched else []
    extra += ["--base-datagrams"] if base_datagrams else []
    receiver = _child("--role", "receiver", "--engine", kind, "--size", str(size / MiB), *extra)
    assert receiver.stdout is not None
    hello = json.loads(receiver.stdout.readline())
    sender_args = ["--role", "sender", "--engine", kind, "--port", str(hello["port"])]
    sender_args += ["--size", str(size / MiB)]
    sender_args += ["--base-datagrams"] if base_datagrams else []
    if "node_id" in hello:
        sender_args += ["--node-id", hello["node_id"]]
    sender = _child(*sender_args)
    try:
        sent_out, _ = sender.communicate(timeout=RUN_TIMEOUT)
        received_out, _ = receiver.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        sender.kill()
        receiver.kill()
        sender.wait()
        receiver.wait()
        raise SystemExit(f"{kind}: transfer stalled for {RUN_TIMEOUT} s") from None
    if sender.returncode or receiver.returncode:
        raise SystemExit(f"{kind}: a benchmark process failed")
    sent = json.loads(sent_out.strip().splitlines()[-1])
    received = json.loads(received_out.strip().splitlines()[-1])
    if received["bytes"] != size:
        raise SystemExit(f"{kind}: received {received['bytes']} of {size} bytes")
    gib = size / GiB
    return {
        "transport": kind,
        "mib": size / MiB,
        "seconds": received["seconds"],
        "mb_per_s": size / received["seconds"] / 1e6,
        "sender_cpu_s_per_gib": sent["cpu"] / gib,
        "receiver_cpu_s_per_gib": received["cpu"] / gib,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'transport':<14}{'MiB':>7}{'MB/s':>9}{'send CPU s/GiB':>17}{'recv CPU s/GiB':>17}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['transport']:<14}{row['mib']:>7.0f}{row['mb_per_s']:>9.1f}"
            f"{row['sender_cpu_s_per_gib']:>17.2f}{row['receiver_cpu_s_per_gib']:>17.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__)
    parser.add_argument("--size", type=float, default=None, help="MiB per transfer (512)")
    parser.add_argument("--engine", choices=["qh3", "aioquic", "tcp"], default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--batched-receive",
        action="store_true",
        help="receiver uses qh3's batched receive (faster; see TransportConfig.batched_receive)",
    )
    parser.add_argument(
        "--base-datagrams",
        action="store_true",
        help="datagrams of the base size even on loopback (as p2pfs's --no-link-datagrams; "
        "for runs through an emulated internet path)",
    )
    parser.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--listener", choices=["receiver", "sender"], default="receiver", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--node-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role is not None:
        level = os.environ.get("P2PFS_BENCH_LOG")
        if level:
            logging.basicConfig(
                level=level.upper(),
                format=f"%(relativeCreated)d {args.role} %(name)s %(message)s",
            )
        size = int((args.size or 0) * MiB)
        config = TransportConfig(
            batched_receive=args.batched_receive, link_sized_datagrams=not args.base_datagrams
        )
        if args.engine == "tcp":
            _tcp_receiver() if args.role == "receiver" else _tcp_sender(args.port, size)
        elif args.role == args.listener:
            trio.run(_listen, args.role, args.engine, size, config)
        else:
            trio.run(_dial, args.role, args.engine, args.port, args.node_id, size, config)
        return

    engines = [args.engine] if args.engine else ["qh3", "aioquic"]
    rows = []
    for engine in [*engines, "tcp"] if "tcp" not in engines else engines:
        mib = args.size
        if mib is None:
            mib = AIOQUIC_DEFAULT_MIB if engine == "aioquic" else 512
        rows.append(_run_pair(engine, int(mib * MiB), args.batched_receive, args.base_datagrams))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)


if __name__ == "__main__":
    main()
