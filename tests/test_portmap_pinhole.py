"""The IPv6 pinhole's upkeep (p2pfs/daemon/portmap.py ``PortMapper._keep_pinhole``) on trio's
mock clock, against a gateway scripted here in place of ``open_pcp_lease`` (the PCP
exchange itself runs over real UDP in tests/test_portmap_pcp.py, and against miniupnpd in
tests/test_nat_portmap.py): renewal, an address that changes, a refusal, a lifetime of 0,
deletion at stop; and which address is opened (``pinhole_address``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfs.daemon import addresses, portmap
from p2pfs.daemon import gatewaywire as wire
from p2pfs.daemon.addresses import AddressBook, pinhole_address
from p2pfs.errors import LocalProtocolError

PORT = 7337
ROUTER = "fe80000000000000000000000000abcd"
NONE = "0" * 32


def route_table(tmp_path: Path) -> str:
    table = tmp_path / "ipv6_route"
    table.write_text(f"{NONE} 00 {NONE} 00 {ROUTER} 00000400 00000001 00000000 00000003 eth0\n")
    return str(table)


@dataclass
class ScriptedGateway:
    """Stands in for ``open_pcp_lease`` and ``open_upnp_pinhole`` (nothing leaves this
    machine): records what the node asked for; ``pcp``/``upnp``: whether each grants."""

    lifetime: int = 120
    pcp: bool = True
    upnp: bool = False
    log: list[tuple[str, str]] = field(default_factory=list)

    async def open_pcp(
        self, gateway: str, gateway_port: int, port: int, *, source: str, via: str
    ) -> portmap._Lease:
        assert (gateway, gateway_port, port, via) == ("fe80::abcd", wire.GATEWAY_PORT, PORT, "eth0")
        if not self.pcp:
            self.log.append(("refused", "pcp"))
            raise wire.GatewayRefusedError("PCP: not authorized", 2)
        return self._lease(source)

    async def open_upnp(self, host: str, port: int, via: str) -> portmap._Lease:
        assert (port, via) == (PORT, "eth0")
        if not self.upnp:
            self.log.append(("refused", "upnp"))
            raise portmap.RemoteProtocolError("no UPnP gateway answered the search")
        return self._lease(host)

    def _lease(self, source: str) -> portmap._Lease:
        self.log.append(("open", source))
        reply = wire.MapReply(PORT, self.lifetime, source)

        async def renew() -> wire.MapReply:
            self.log.append(("renew", source))
            return reply

        async def delete() -> None:
            self.log.append(("delete", source))

        return portmap._Lease(renew, delete, reply)


def isolate(monkeypatch: pytest.MonkeyPatch, gateway: ScriptedGateway) -> None:
    """Nothing leaves this machine: the pinhole protocols are ``gateway``'s, and the IPv4
    mapping's fail at once."""
    monkeypatch.setattr(portmap, "open_pcp_lease", gateway.open_pcp)
    monkeypatch.setattr(portmap, "open_upnp_pinhole", gateway.open_upnp)

    async def no_ipv4(self: portmap.PortMapper) -> portmap._Lease:
        raise LocalProtocolError("not in this test")

    monkeypatch.setattr(portmap.PortMapper, "_map_pcp", no_ipv4)
    monkeypatch.setattr(portmap.PortMapper, "_map_upnp", no_ipv4)


def run_mapper(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gateway: ScriptedGateway,
    script: object,
) -> None:
    """A PortMapper whose IPv4 protocols fail at once (nothing leaves this machine), its
    IPv6 address ``host[0]``; ``script(mapper, host)`` drives it, then it is stopped."""
    isolate(monkeypatch, gateway)
    host = ["2001:db8:1::2"]

    async def main() -> None:
        mapper = portmap.PortMapper(
            PORT, lambda _: None, ipv6_host=lambda: host[0], route_table6=route_table(tmp_path)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(mapper.serve)
            await script(mapper, host)  # type: ignore[operator]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pinhole_is_renewed_and_deleted_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = ScriptedGateway(lifetime=120)

    async def script(mapper: portmap.PortMapper, host: list[str]) -> None:
        await trio.sleep(1)
        assert str(mapper.pinhole) == f"[2001:db8:1::2]:{PORT}"
        assert mapper.info()["ipv6_pinhole"] == f"[2001:db8:1::2]:{PORT}"
        await trio.sleep(130)  # renewed at 60 and 120 s (half the lease)

    run_mapper(tmp_path, monkeypatch, gateway, script)
    assert gateway.log == [("open", "2001:db8:1::2")] + [("renew", "2001:db8:1::2")] * 2 + [
        ("delete", "2001:db8:1::2")
    ]


def test_a_pinhole_follows_a_new_address_within_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is an hour; the address changes after 10 s: the old pinhole is deleted and
    one to the new address asked for within PINHOLE_RECHECK, not at the next renewal."""
    gateway = ScriptedGateway(lifetime=3600)

    async def script(mapper: portmap.PortMapper, host: list[str]) -> None:
        await trio.sleep(10)
        host[0] = "2001:db8:1::99"
        await trio.sleep(portmap.PINHOLE_RECHECK + portmap.PINHOLE_REASK + 1)
        assert str(mapper.pinhole) == f"[2001:db8:1::99]:{PORT}"

    run_mapper(tmp_path, monkeypatch, gateway, script)
    assert gateway.log == [
        ("open", "2001:db8:1::2"),
        ("delete", "2001:db8:1::2"),
        ("open", "2001:db8:1::99"),
        ("delete", "2001:db8:1::99"),  # at stop
    ]


@pytest.mark.parametrize("case", ["refused", "lifetime 0"])
def test_no_pinhole_is_reported_open_unless_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Both protocols refusing, or a "success" of lifetime 0 (a deletion, RFC 6887 15), is
    no pinhole: none reported, the reasons shown, asked again after PINHOLE_RETRY."""
    gateway = ScriptedGateway(pcp=case != "refused", lifetime=0)

    async def script(mapper: portmap.PortMapper, host: list[str]) -> None:
        await trio.sleep(1)
        assert mapper.pinhole is None
        error = mapper.info()["ipv6_pinhole_error"]
        assert isinstance(error, str)
        if case == "refused":
            assert "pcp: PCP: not authorized; upnp: no UPnP gateway" in error
        else:
            assert "lifetime of 0" in error
        await trio.sleep(portmap.PINHOLE_RETRY)

    run_mapper(tmp_path, monkeypatch, gateway, script)
    tries = [entry for entry in gateway.log if entry[0] in ("open", "refused")]
    assert len(tries) == (4 if case == "refused" else 2)
    assert ("renew", "2001:db8:1::2") not in gateway.log
    # A grant of no use is given back at once, not left to lapse.
    deleted = [entry for entry in gateway.log if entry[0] == "delete"]
    assert len(deleted) == (0 if case == "refused" else 2)


def test_a_router_without_pcp_gives_its_pinhole_over_upnp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = ScriptedGateway(pcp=False, upnp=True)

    async def script(mapper: portmap.PortMapper, host: list[str]) -> None:
        await trio.sleep(1)
        info = mapper.info()
        assert info["ipv6_pinhole"] == f"[2001:db8:1::2]:{PORT}"
        assert info["ipv6_pinhole_via"] == "upnp"

    run_mapper(tmp_path, monkeypatch, gateway, script)
    assert gateway.log == [
        ("refused", "pcp"),
        ("open", "2001:db8:1::2"),
        ("delete", "2001:db8:1::2"),
    ]


def test_a_pinhole_to_a_translated_address_is_no_pinhole() -> None:
    granted = wire.MapReply(PORT, 3600, "2001:db8:1::2")
    assert str(portmap._pinhole_granted("2001:db8:1::2", PORT, granted)) == "[2001:db8:1::2]:7337"
    for reply in (
        wire.MapReply(PORT, 3600, "2001:db8:ffff::2"),  # NPTv6: peers would need that one
        wire.MapReply(40000, 3600, "2001:db8:1::2"),
    ):
        with pytest.raises(portmap.RemoteProtocolError, match="translate"):
            portmap._pinhole_granted("2001:db8:1::2", PORT, reply)


def test_the_pinhole_is_for_the_default_routes_advertised_address() -> None:
    advertised = ["2001:db8:1::2", "fd00::2", "2001:db8:9::5"]
    assert pinhole_address("2001:db8:1::2", advertised) == "2001:db8:1::2"
    # The route's source is a temporary address (never advertised): its stable sibling.
    assert pinhole_address("2001:db8:1:0:a1b2:c3d4:e5f6:1", advertised) == "2001:db8:1::2"
    # The route leaves by another interface than any advertised address: no pinhole.
    assert pinhole_address("2001:db8:7::1", advertised) is None
    # Unique local addresses are not reachable from outside the site.
    assert pinhole_address("fd00::2", advertised) is None
    assert pinhole_address(None, advertised) is None


def test_ipv6_default_gateway_is_the_lowest_metric(tmp_path: Path) -> None:
    table = tmp_path / "ipv6_route"
    table.write_text(
        f"{NONE} 00 {NONE} 00 fe800000000000000000000000000002 00000800 00000001 00000000 "
        "00000003 wlan0\n"
        f"{NONE} 00 {NONE} 00 {ROUTER} 00000400 00000001 00000000 00000003 eth0\n"
    )
    assert portmap.default_gateway6(str(table)) == ("fe80::abcd", "eth0")


# -- UPnP IGD v2 over real TCP on loopback (the search replaced: multicast stays off) -----

DESCRIPTION6 = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANIPv6FirewallControl:1</serviceType>
<controlURL>/ctl/IP6FCtl</controlURL></service>
</serviceList></device></root>"""


def soap_response(action: str, inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f'<s:Body><u:{action}Response xmlns:u="x">{inner}</u:{action}Response></s:Body>'
        "</s:Envelope>"
    ).encode()


async def serve_igd(
    unique_id: str, heard: list[tuple[str, bytes]], *, task_status: trio.TaskStatus[int]
) -> None:
    """An IGD v2 on [::1]: its description, and the pinhole actions answered."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length")),
                0,
            )  # fmt: skip
            while len(body) < length:
                body += await stream.receive_some(4096)
            request_line = head.split(b"\r\n")[0].decode()
            heard.append((request_line, body))
            if request_line.startswith("GET"):
                payload = DESCRIPTION6
            else:
                action = body.split(b"<u:")[1].split(b" ")[0].decode()
                inner = f"<UniqueID>{unique_id}</UniqueID>" if action == "AddPinhole" else ""
                payload = soap_response(action, inner)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )

    listeners = await trio.open_tcp_listeners(0, host="::1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


def upnp_pinhole(
    monkeypatch: pytest.MonkeyPatch, unique_id: str
) -> tuple[portmap._Lease | Exception, list[tuple[str, bytes]]]:
    heard: list[tuple[str, bytes]] = []

    async def main() -> portmap._Lease | Exception:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_igd, unique_id, heard)

            async def found(*_args: object, **_kwargs: object) -> str:
                return f"http://[::1]:{port}/rootDesc.xml"

            monkeypatch.setattr(portmap, "_ssdp_search", found)
            try:
                lease: portmap._Lease | Exception = await portmap.open_upnp_pinhole(
                    "::1", PORT, "lo"
                )
            except portmap.RemoteProtocolError as exc:
                lease = exc
            else:
                assert isinstance(lease, portmap._Lease)
                await lease.renew()
                await lease.delete()
            nursery.cancel_scope.cancel()
        return lease

    return trio.run(main), heard


def test_an_igd_opens_renews_and_deletes_a_pinhole_for_our_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease, heard = upnp_pinhole(monkeypatch, "7")
    assert isinstance(lease, portmap._Lease)
    assert lease.reply == wire.MapReply(PORT, portmap.LEASE, "::1")
    assert [line.split()[0:2] for line, _ in heard] == [
        ["GET", "/rootDesc.xml"],
        ["POST", "/ctl/IP6FCtl"],
        ["POST", "/ctl/IP6FCtl"],
        ["POST", "/ctl/IP6FCtl"],
    ]
    add, update, delete = (body for _, body in heard[1:])
    for field_ in (b"<RemoteHost></RemoteHost>", b"<RemotePort>0</RemotePort>",
                   b"<InternalClient>::1</InternalClient>", b"<InternalPort>7337</InternalPort>",
                   b"<Protocol>17</Protocol>", b"<LeaseTime>3600</LeaseTime>"):  # fmt: skip
        assert field_ in add, add
    assert b"<u:UpdatePinhole" in update and b"<UniqueID>7</UniqueID>" in update
    assert b"<NewLeaseTime>3600</NewLeaseTime>" in update
    assert b"<u:DeletePinhole" in delete and b"<UniqueID>7</UniqueID>" in delete


@pytest.mark.parametrize("unique_id", ["", "x1", "\u00b2", "70000"])
def test_an_igd_answer_without_a_pinhole_id_is_no_pinhole(
    monkeypatch: pytest.MonkeyPatch, unique_id: str
) -> None:
    lease, heard = upnp_pinhole(monkeypatch, unique_id)
    assert isinstance(lease, portmap.RemoteProtocolError)
    assert "no pinhole id" in str(lease)
    assert len(heard) == 2  # nothing renewed or deleted


def test_an_answer_may_name_its_link_local_address_with_or_without_a_zone() -> None:
    assert portmap._same_host("fe80::1%25eth0", "fe80::1%eth0")
    assert portmap._same_host("fe80::1", "fe80::1%eth0")
    assert portmap._same_host("2001:db8::1", "2001:db8:0::1")
    assert not portmap._same_host("fe80::2", "fe80::1%eth0")
    assert not portmap._same_host("gateway.lan", "192.168.1.1")
    assert not portmap._same_host(None, "192.168.1.1")


def test_the_address_book_asks_for_its_default_routes_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``AddressBook.pinhole_ipv6``: the kernel's source on the default route, among the
    addresses the node advertises; nothing for a node that listens on IPv4 alone."""
    stable, temporary = "2001:db8:1::2", "2001:db8:1:0:a1b2:c3d4:e5f6:1"
    monkeypatch.setattr(addresses, "interface_addresses", lambda *_: [stable, temporary, "fd00::2"])
    monkeypatch.setattr(addresses, "_unadvertised_here", lambda: frozenset({temporary}))
    monkeypatch.setattr(addresses, "default_route_source6", lambda: temporary)
    assert AddressBook("::", PORT, dual_stack=True).pinhole_ipv6() == stable
    assert AddressBook("0.0.0.0", PORT).pinhole_ipv6() is None
    monkeypatch.setattr(addresses, "default_route_source6", lambda: None)  # no IPv6 route
    assert AddressBook("::", PORT, dual_stack=True).pinhole_ipv6() is None


def test_a_node_without_an_ipv6_socket_asks_for_no_pinhole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listening on IPv4 alone (``--listen 0.0.0.0:PORT``): no pinhole is asked for, and
    `id` gives no reason for its absence (there is none to give)."""
    gateway = ScriptedGateway()
    isolate(monkeypatch, gateway)

    async def main() -> None:
        mapper = portmap.PortMapper(PORT, lambda _: None, route_table6=route_table(tmp_path))
        async with trio.open_nursery() as nursery:
            await nursery.start(mapper.serve)
            await trio.sleep(portmap.PINHOLE_RETRY)
            info = mapper.info()
            assert info["ipv6_pinhole"] is None and info["ipv6_pinhole_error"] is None
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert gateway.log == []
