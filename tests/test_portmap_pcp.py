"""PCP and NAT-PMP leases (p2pfs/daemon/portmap.py ``open_pcp_lease``) over real UDP on
loopback, against a gateway scripted here: the fallback from PCP to NAT-PMP, a stray
datagram ignored, a refusal reported, the deletion sent. The full daemon against a real
router (miniupnpd) is tests/test_nat_portmap.py."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from p2pfs.daemon import gatewaywire as wire
from p2pfs.daemon import portmap

PORT = 7337
Answer = Callable[[bytes], list[bytes]]


def pcp_answer(request: bytes, external: int = 41000, result: int = 0) -> bytes:
    version, opcode, _r, lifetime = struct.unpack_from("!BBHI", request)
    assert (version, opcode) == (2, 1)
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, lifetime, 7) + bytes(12)
    # Nonce, protocol, reserved and internal port as asked; the port and address granted.
    granted = struct.pack("!H", external if lifetime else 0)
    return header + request[24:42] + granted + ipaddress.IPv6Address("::ffff:203.0.113.5").packed


def natpmp_answer(request: bytes) -> list[bytes]:
    if request[0] != 0:  # a PCP request to a NAT-PMP-only gateway
        return [struct.pack("!BBHI", 0, 0x80 | request[1], 1, 7)]
    if request[1] == 0:
        return [struct.pack("!BBHI", 0, 128, 0, 7) + bytes([198, 51, 100, 9])]
    _v, _op, _r, internal, external, lifetime = struct.unpack("!BBHHHI", request)
    return [struct.pack("!BBHIHHI", 0, 129, 0, 7, internal, external or 0, lifetime)]


async def run_gateway(
    answer: Answer,
    heard: list[bytes],
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, 0))
        task_status.started(sock.getsockname()[1])
        while True:
            request, source = await sock.recvfrom(1100)
            heard.append(request)
            for datagram in answer(request):
                await sock.sendto(datagram, source)


def lease_through(answer: Answer) -> tuple[wire.MapReply, list[bytes]]:
    heard: list[bytes] = []

    async def main() -> wire.MapReply:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_gateway, answer, heard)
            lease = await portmap.open_pcp_lease("127.0.0.1", port, PORT)
            renewed = await lease.renew()
            assert renewed.external_port == lease.reply.external_port
            await lease.delete()
            nursery.cancel_scope.cancel()
        return lease.reply

    return trio.run(main), heard


def test_pcp_grants_and_deletes() -> None:
    # A stray datagram first (anyone on the LAN may send one): ignored, not fatal.
    reply, heard = lease_through(lambda request: [b"\x02junk", pcp_answer(request)])
    assert reply == wire.MapReply(41000, 3600, "203.0.113.5")
    assert [struct.unpack_from("!I", r, 4)[0] for r in heard] == [3600, 3600, 0]
    assert all(r[:2] == b"\x02\x01" for r in heard)


def test_natpmp_only_gateway_gets_natpmp() -> None:
    reply, heard = lease_through(natpmp_answer)
    assert reply == wire.MapReply(PORT, 3600, "198.51.100.9")
    kinds = [(r[0], r[1]) for r in heard]
    # PCP once, then address + map, renewal (address + map), deletion (address + map).
    assert kinds == [(2, 1), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0), (0, 1)]
    assert struct.unpack("!BBHHHI", heard[-1])[4:] == (0, 0)


def test_a_refusal_is_reported() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                run_gateway, lambda request: [pcp_answer(request, result=2)], []
            )
            with pytest.raises(wire.GatewayRefusedError, match="not authorized"):
                await portmap.open_pcp_lease("127.0.0.1", port, PORT)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_silence_ends_in_too_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(portmap, "UDP_TRIES", (0.05, 0.05))
    heard: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_gateway, lambda request: [], heard)
            with pytest.raises(trio.TooSlowError):
                await portmap.open_pcp_lease("127.0.0.1", port, PORT)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(heard) == 2  # sent again after the first wait


def test_default_gateway_from_the_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert portmap.default_gateway(str(table)) == "192.168.2.1"
    table.write_text("Iface\tDestination\tGateway\tFlags\n")
    assert portmap.default_gateway(str(table)) is None
    assert portmap.default_gateway(str(tmp_path / "missing")) is None


def test_a_lease_whose_renewal_is_refused_lets_its_socket_go() -> None:
    answers = iter([0, 2])  # granted, then "not authorized" at the renewal

    def answer(request: bytes) -> list[bytes]:
        return [pcp_answer(request, result=next(answers))]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_gateway, answer, [])
            lease = await portmap.open_pcp_lease("127.0.0.1", port, PORT)
            with pytest.raises(wire.GatewayRefusedError):
                await lease.renew()
            lease.close()
            with pytest.raises(OSError):  # the socket is closed: nothing left open
                await lease.renew()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_ipv6_gateway_is_asked_for_a_pinhole_from_our_address() -> None:
    """Over IPv6 the request goes out from the address the pinhole is for, names it, and
    suggests no external address in IPv6's spelling; NAT-PMP (IPv4 only) is no fallback."""
    heard: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                run_gateway, lambda request: [pcp_answer(request, external=PORT)], heard, "::1"
            )
            lease = await portmap.open_pcp_lease("::1", port, PORT, source="::1", via="lo")
            assert lease.reply.external_port == PORT
            await lease.delete()
            refusing = await nursery.start(run_gateway, natpmp_answer, [], "::1")
            with pytest.raises(wire.GatewayRefusedError):
                await portmap.open_pcp_lease("::1", refusing, PORT, source="::1")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [struct.unpack_from("!I", r, 4)[0] for r in heard] == [3600, 0]
    for request in heard:
        assert ipaddress.IPv6Address(request[8:24]) == ipaddress.IPv6Address("::1")
        assert request[44:60] == bytes(16)


def test_ipv6_default_gateway_from_the_route_table(tmp_path: Path) -> None:
    table = tmp_path / "ipv6_route"
    any6, none = "0" * 32, "0" * 32
    router = "fe80000000000000000000000000abcd"
    table.write_text(
        # On-link prefix, then the default route via a link-local router on eth0.
        f"20010db8000100000000000000000000 40 {none} 00 {none} 00000100 00000001 "
        "00000000 00000001 eth0\n"
        f"{any6} 00 {none} 00 {router} 00000400 00000001 00000000 00000003 eth0\n"
    )
    assert portmap.default_gateway6(str(table)) == ("fe80::abcd", "eth0")
    # An unreachable default (no next hop, as a host without IPv6 routes has on lo): none.
    table.write_text(f"{any6} 00 {none} 00 {none} ffffffff 00000001 00000000 00200200 lo\n")
    assert portmap.default_gateway6(str(table)) is None
    assert portmap.default_gateway6(str(tmp_path / "missing")) is None
