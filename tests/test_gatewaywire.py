"""The gateway messages of port mapping (p2pfs/daemon/gatewaywire.py): PCP and NAT-PMP
laid out as RFC 6887 and RFC 6886 draw them, UPnP IGD's SSDP, description and SOAP; and
anything a LAN device sends parses or fails with RemoteProtocolError, nothing else."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.daemon import gatewaywire as wire
from p2pfs.errors import RemoteProtocolError

NONCE = bytes(range(12))


def pcp_reply(
    result: int = 0,
    *,
    nonce: bytes = NONCE,
    port: int = 7337,
    external: int = 40000,
    host: str = "203.0.113.7",
    lifetime: int = 3600,
    opcode: int = 0x81,
) -> bytes:
    mapped = ipaddress.IPv6Address("::ffff:" + host).packed
    header = struct.pack("!BBBBII", 2, opcode, 0, result, lifetime, 99) + bytes(12)
    return header + nonce + struct.pack("!B3xHH", 17, port, external) + mapped


def test_pcp_map_request_is_laid_out_as_rfc_6887() -> None:
    request = wire.pcp_map_request("192.168.2.2", 7337, 7337, 3600, NONCE)
    assert len(request) == 60
    assert request[:4] == bytes([2, 1, 0, 0])
    assert struct.unpack_from("!I", request, 4)[0] == 3600
    assert ipaddress.IPv6Address(request[8:24]).ipv4_mapped == ipaddress.IPv4Address("192.168.2.2")
    assert request[24:36] == NONCE
    assert request[36] == 17 and request[37:40] == b"\0\0\0"
    assert struct.unpack_from("!HH", request, 40) == (7337, 7337)
    with pytest.raises(ValueError):
        wire.pcp_map_request("192.168.2.2", 7337, 7337, 3600, b"short")
    # No preference for the external address: IPv4's "any", in its mapped spelling.
    assert ipaddress.IPv6Address(request[44:60]).ipv4_mapped == ipaddress.IPv4Address("0.0.0.0")


def test_a_pcp_request_from_ipv6_asks_for_a_pinhole_to_that_address() -> None:
    request = wire.pcp_map_request("2001:db8:1::2", 7337, 7337, 3600, NONCE)
    assert len(request) == 60
    assert ipaddress.IPv6Address(request[8:24]) == ipaddress.IPv6Address("2001:db8:1::2")
    # The suggested external address is IPv6's unspecified one (RFC 6887 11.1), not the
    # mapped IPv4 "any", which a router would read as a request for a NAT mapping.
    assert request[44:60] == bytes(16)


def test_pcp_reply_gives_port_lifetime_and_address() -> None:
    reply = wire.parse_pcp_map(pcp_reply(), NONCE, 7337)
    assert reply == wire.MapReply(40000, 3600, "203.0.113.7")


def test_pcp_reply_to_another_request_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="another request"):
        wire.parse_pcp_map(pcp_reply(nonce=bytes(12)), NONCE, 7337)
    with pytest.raises(RemoteProtocolError, match="another request"):
        wire.parse_pcp_map(pcp_reply(port=1), NONCE, 7337)
    with pytest.raises(RemoteProtocolError, match="opcode"):
        wire.parse_pcp_map(pcp_reply(opcode=0x82), NONCE, 7337)


def test_pcp_refusals_name_the_reason_and_code() -> None:
    with pytest.raises(wire.GatewayRefusedError, match="not authorized") as caught:
        wire.parse_pcp_map(pcp_reply(result=2), NONCE, 7337)
    assert caught.value.code == 2


def test_a_pcp_refusal_without_our_nonce_is_not_believed() -> None:
    """A refusal names the request it refuses (RFC 6887 7.2): one with another nonce, or
    cut short, may be a LAN device forging the gateway's address, and is ignored (the
    caller waits for the gateway's own answer); only "cannot read your request" refusals
    may come without the request's fields."""
    with pytest.raises(RemoteProtocolError, match="another request"):
        wire.parse_pcp_map(pcp_reply(result=2, nonce=bytes(12)), NONCE, 7337)
    with pytest.raises(RemoteProtocolError, match="shorter"):
        wire.parse_pcp_map(pcp_reply(result=2)[:24], NONCE, 7337)
    with pytest.raises(wire.GatewayRefusedError) as caught:
        wire.parse_pcp_map(pcp_reply(result=3)[:24], NONCE, 7337)
    assert caught.value.code == 3


def test_a_natpmp_gateway_answering_pcp_means_fall_back() -> None:
    # RFC 6886 servers answer any other version with version 0, result 1.
    answer = struct.pack("!BBHI", 0, 0x81, 1, 12345)
    with pytest.raises(wire.GatewayRefusedError) as caught:
        wire.parse_pcp_map(answer, NONCE, 7337)
    assert caught.value.code == wire.PCP_UNSUPPORTED_VERSION
    with pytest.raises(wire.GatewayRefusedError) as caught:
        wire.parse_pcp_map(pcp_reply(result=1), NONCE, 7337)
    assert caught.value.code == wire.PCP_UNSUPPORTED_VERSION


def test_natpmp_messages_are_laid_out_as_rfc_6886() -> None:
    assert wire.natpmp_address_request() == b"\0\0"
    assert wire.natpmp_map_request(7337, 7337, 3600) == struct.pack(
        "!BBHHHI", 0, 1, 0, 7337, 7337, 3600
    )
    address = struct.pack("!BBHI", 0, 128, 0, 5) + ipaddress.IPv4Address("198.51.100.4").packed
    assert wire.parse_natpmp_address(address) == "198.51.100.4"
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 5, 7337, 7400, 1800)
    assert wire.parse_natpmp_map(mapped, 7337) == wire.MapReply(7400, 1800)
    with pytest.raises(RemoteProtocolError, match="another port"):
        wire.parse_natpmp_map(mapped, 1)
    refused = struct.pack("!BBHIHHI", 0, 129, 2, 5, 7337, 0, 0)
    with pytest.raises(wire.GatewayRefusedError, match="refused"):
        wire.parse_natpmp_map(refused, 7337)


def test_ssdp_answer_names_the_description() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
        b"Location: http://192.168.2.1:5000/rootDesc.xml\r\nST: x\r\n\r\n"
    )
    assert wire.parse_ssdp_location(answer) == "http://192.168.2.1:5000/rootDesc.xml"
    assert b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1" in wire.ssdp_search(
        wire.IGD_SEARCH_TARGETS[0]
    )
    for bad in (
        b"NOTIFY * HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.2.1:99999/d.xml\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://[192.168.2.1/d.xml\r\n\r\n",
    ):
        with pytest.raises(RemoteProtocolError):
            wire.parse_ssdp_location(bad)


DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList><device><deviceList><device>
<serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
<controlURL>/ppp</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<controlURL>/ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"""


def test_the_most_capable_wan_service_is_chosen() -> None:
    service = wire.find_wan_service(DESCRIPTION, "http://192.168.2.1:5000/rootDesc.xml")
    assert service == wire.WanService(
        "urn:schemas-upnp-org:service:WANIPConnection:2", "http://192.168.2.1:5000/ctl/IPConn"
    )
    with pytest.raises(RemoteProtocolError, match="no WAN"):
        wire.find_wan_service(b"<root/>", "http://192.168.2.1/")
    with pytest.raises(RemoteProtocolError, match="DTD"):
        wire.find_wan_service(
            b'<!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>', "http://192.168.2.1/"
        )


def test_an_ipv6_search_and_the_firewall_control_service() -> None:
    """IGD v2 over IPv6: the search goes to SSDP's IPv6 group (its HOST in brackets), and
    the description's WANIPv6FirewallControl service is the one that opens pinholes."""
    search = wire.ssdp_search(wire.PINHOLE_SEARCH_TARGETS[0], wire.SSDP_GROUP6)
    assert b"HOST: [FF02::C]:1900\r\n" in search
    assert b"ST: urn:schemas-upnp-org:service:WANIPv6FirewallControl:1\r\n" in search
    description = DESCRIPTION.replace(
        b"</serviceList>",
        b"<service><serviceType>urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
        b"</serviceType><controlURL>/ctl/IP6FCtl</controlURL></service></serviceList>",
    )
    location = "http://[2001:db8:1::1]:5000/rootDesc.xml"
    service = wire.find_service(
        description, location, wire.PINHOLE_SERVICES, "IPv6 firewall control service"
    )
    assert service.control_url == "http://[2001:db8:1::1]:5000/ctl/IP6FCtl"
    with pytest.raises(RemoteProtocolError, match="no IPv6 firewall control"):
        wire.find_service(DESCRIPTION, location, wire.PINHOLE_SERVICES, "IPv6 firewall control")


def test_what_a_lan_device_can_send_is_a_protocol_error() -> None:
    """A URL the request line cannot carry, or XML in an encoding Python does not know,
    fail as the gateway's protocol error (a round of port mapping ends alone), not as a
    UnicodeEncodeError or LookupError that ended the mapper."""
    with pytest.raises(RemoteProtocolError, match="not ASCII"):
        wire.http_url("http://192.168.1.1:5000/ctl/\u0100")
    description = DESCRIPTION.replace(b"/ctl/IPConn", "/ctl/\u0100".encode())
    with pytest.raises(RemoteProtocolError):
        wire.find_wan_service(description, "http://192.168.1.1:5000/rootDesc.xml")
    with pytest.raises(RemoteProtocolError, match="malformed XML"):
        wire.find_wan_service(
            b'<?xml version="1.0" encoding="no-such"?><root/>', "http://192.168.1.1/"
        )


def test_soap_call_and_answers() -> None:
    body = wire.soap_body(
        "urn:x", "AddPortMapping", {"NewProtocol": "UDP", "NewDescription": "<&>"}
    )
    assert b"<u:AddPortMapping" in body and b"&lt;&amp;&gt;" in body
    request = wire.http_request("POST", "http://192.168.2.1:5000/ctl", body, "urn:x#AddPortMapping")
    assert request.startswith(b"POST /ctl HTTP/1.1\r\nHost: 192.168.2.1:5000\r\n")
    assert f"Content-Length: {len(body)}".encode() in request and request.endswith(body)
    ok = wire.HttpResponse(
        200,
        b'<s:Envelope xmlns:s="s"><s:Body><u:GetExternalIPAddressResponse xmlns:u="x">'
        b"<NewExternalIPAddress>203.0.113.9</NewExternalIPAddress>"
        b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>",
    )
    assert wire.parse_soap(ok) == {"NewExternalIPAddress": "203.0.113.9"}
    fault = wire.HttpResponse(
        500,
        b'<s:Envelope xmlns:s="s"><s:Body><s:Fault><detail><UPnPError xmlns="u">'
        b"<errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription>"
        b"</UPnPError></detail></s:Fault></s:Body></s:Envelope>",
    )
    with pytest.raises(wire.GatewayRefusedError, match="ConflictInMappingEntry") as caught:
        wire.parse_soap(fault)
    assert caught.value.code == 718


def test_http_answers_by_length_and_chunked() -> None:
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more"
    assert wire.parse_http_response(plain) == wire.HttpResponse(200, b"hello")
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n"
    )
    assert wire.parse_http_response(chunked) == wire.HttpResponse(200, b"hello")
    with pytest.raises(RemoteProtocolError):
        wire.parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")


@given(st.text(max_size=60))
def test_any_location_is_an_http_url_or_a_protocol_error(tail: str) -> None:
    answer = f"HTTP/1.1 200 OK\r\nLocation: http://{tail}\r\n\r\n".encode("utf-8", "replace")
    with contextlib.suppress(RemoteProtocolError):
        url = wire.parse_ssdp_location(answer)
        assert urlsplit(url).hostname and (urlsplit(url).port or 80) < 65536


@given(st.binary(max_size=200))
def test_any_datagram_parses_or_is_a_protocol_error(data: bytes) -> None:
    for parse in (
        lambda d: wire.parse_pcp_map(d, NONCE, 7337),
        wire.parse_natpmp_address,
        lambda d: wire.parse_natpmp_map(d, 7337),
        wire.parse_ssdp_location,
        wire.parse_http_response,
        lambda d: wire.find_wan_service(d, "http://192.168.2.1/"),
        lambda d: wire.parse_soap(wire.HttpResponse(200, d)),
        lambda d: wire.parse_soap(wire.HttpResponse(500, d)),
    ):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


@given(st.binary(max_size=60), st.integers(0, 3))
def test_any_answer_after_a_valid_header_parses_or_is_a_protocol_error(
    tail: bytes, kind: int
) -> None:
    heads = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        struct.pack("!BBBBII", 2, 0x81, 0, 0, 60, 1) + bytes(12) + NONCE,
        struct.pack("!BBH", 0, 129, 0),
    ]
    data = heads[kind] + tail
    for parse in (
        wire.parse_http_response,
        lambda d: wire.parse_pcp_map(d, NONCE, 7337),
        lambda d: wire.parse_natpmp_map(d, 7337),
    ):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


@given(
    st.sampled_from(["utf-8", "latin-1", "no-such", "utf-16", "x" * 40, ""]),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_any_description_a_device_writes_is_a_service_or_a_protocol_error(
    encoding: str, service_type: str, control: str
) -> None:
    """What a LAN device puts in a description (its declared encoding, any text where the
    service and its control URL go) ends in a service whose URL a request can carry, or in
    a protocol error; nothing else escapes to end the port mapper."""
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>' if encoding else ""
    body = (
        f"{declaration}<root><device><serviceList><service><serviceType>{service_type}"
        f"</serviceType><controlURL>{control}</controlURL></service></serviceList></device>"
        "</root>"
    ).encode("utf-8", "surrogatepass")
    for wanted in (wire.WAN_SERVICES, (service_type,)):
        with contextlib.suppress(RemoteProtocolError):
            service = wire.find_service(body, "http://192.168.2.1:5000/d.xml", wanted, "x")
            wire.http_request("POST", service.control_url, b"", "x#y")
