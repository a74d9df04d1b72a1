"""What a home gateway is told and answers when we ask it to map a port, without I/O.

Three protocols, as the router speaks them:
- PCP (RFC 6887) MAP requests, and NAT-PMP (RFC 6886), its predecessor, for a gateway that
  answers PCP with "unsupported version". Both are single UDP datagrams to port 5351.
- UPnP IGD: an SSDP search (multicast HTTP over UDP), the device description (XML over
  HTTP) naming the WAN connection service's control URL, and SOAP calls to it.

Everything here parses what a device on the LAN sent: any input, however malformed, gives a
``RemoteProtocolError`` (or a ``GatewayRefusedError`` for a well-formed refusal), never
another exception. Sizes are bounded by the caller's reads (``HTTP_LIMIT``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from p2pfs.errors import RemoteProtocolError

GATEWAY_PORT = 5351
"""PCP and NAT-PMP servers listen here on the gateway."""
SSDP_GROUP = ("239.255.255.250", 1900)
SSDP_GROUP6 = ("ff02::c", 1900)
"""SSDP's IPv6 link-local group (UPnP Device Architecture 1.1)."""
HTTP_LIMIT = 64 * 1024
"""Bytes read from a gateway's HTTP answer at most (a description is a few KiB)."""
UDP = 17

PCP_VERSION = 2
PCP_MAP = 1
PCP_UNSUPPORTED_VERSION = 1
_PCP_UNREAD = (1, 3, 4)
"""Results whose reply may come without the request's fields: unsupported version,
malformed request, unsupported opcode."""
NATPMP_VERSION = 0
NATPMP_ADDRESS = 0
NATPMP_MAP_UDP = 1

_PCP_RESULTS = {
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide the external port",
    12: "address mismatch",
    13: "excessive remote peers",
}
_NATPMP_RESULTS = {
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}

WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
"""Services that can map a port, most capable first."""
PINHOLE_SERVICES = ("urn:schemas-upnp-org:service:WANIPv6FirewallControl:1",)
"""IGD v2's service that opens IPv6 firewall pinholes."""
PINHOLE_SEARCH_TARGETS = (
    "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
IGD_SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
UPNP_ONLY_PERMANENT_LEASES = 725
"""A UPnP IGD v1 error: the device maps only with lease duration 0 (no expiry)."""


class GatewayRefusedError(RemoteProtocolError):
    """The gateway understood the request and said no."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- PCP and NAT-PMP ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MapReply:
    """A granted mapping: the external port (and, from PCP, the external address)."""

    external_port: int
    lifetime: int
    external_host: str | None = None


def pcp_map_request(
    client_host: str, internal_port: int, external_port: int, lifetime: int, nonce: bytes
) -> bytes:
    """A PCP MAP request for UDP ``internal_port``; lifetime 0 deletes the mapping. From an
    IPv6 ``client_host`` it asks for a firewall pinhole to that address."""
    if len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    client = ipaddress.ip_address(client_host)
    client16 = (
        client.packed
        if isinstance(client, ipaddress.IPv6Address)
        else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + client.packed).packed
    )
    header = struct.pack("!BBHI", PCP_VERSION, PCP_MAP, 0, lifetime) + client16
    # No preference for the external address, in the client's family: an IPv6 client asks
    # its router's firewall for a pinhole (RFC 6887 section 11.1), an IPv4 one for a NAT
    # mapping.
    suggested = (
        bytes(16)
        if isinstance(client, ipaddress.IPv6Address)
        else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + b"\0\0\0\0").packed
    )
    body = nonce + struct.pack("!B3xHH", UDP, internal_port, external_port) + suggested
    return header + body


def parse_pcp_map(data: bytes, nonce: bytes, internal_port: int) -> MapReply:
    """The answer to our MAP request (same nonce and port), or the gateway's refusal.

    A reply of NAT-PMP's version (0) or with result "unsupported version" raises
    ``GatewayRefusedError`` with code ``PCP_UNSUPPORTED_VERSION``: the caller falls back."""
    if len(data) >= 4 and data[0] == NATPMP_VERSION:
        raise GatewayRefusedError("the gateway speaks NAT-PMP only", PCP_UNSUPPORTED_VERSION)
    if len(data) < 24 or data[0] != PCP_VERSION:
        raise RemoteProtocolError("not a PCP reply")
    version, r_opcode, _reserved, result, lifetime, _epoch = struct.unpack_from("!BBBBII", data)
    del version
    if r_opcode != 0x80 | PCP_MAP:
        raise RemoteProtocolError(f"not an answer to a PCP MAP (opcode {r_opcode:#x})")
    # A refusal carries our request's nonce too (RFC 6887 7.2), except where the server
    # could not read the request at all: any other refusal without it is not believed
    # (a LAN device forging the gateway's address could otherwise refuse for it).
    if result in _PCP_UNREAD:
        raise GatewayRefusedError(f"PCP: {_PCP_RESULTS[result]}", result)
    if len(data) < 60:
        raise RemoteProtocolError("a PCP MAP reply shorter than 60 bytes")
    reply_nonce = data[24:36]
    protocol, reply_internal, external_port = struct.unpack_from("!B3xHH", data, 36)
    if reply_nonce != nonce or protocol != UDP or reply_internal != internal_port:
        raise RemoteProtocolError("a PCP MAP reply to another request")
    if result != 0:
        reason = _PCP_RESULTS.get(result, f"result {result}")
        raise GatewayRefusedError(f"PCP: {reason}", result)
    external = ipaddress.IPv6Address(data[44:60])
    mapped = external.ipv4_mapped
    host = str(mapped) if mapped is not None else str(external)
    return MapReply(external_port, lifetime, host)


def natpmp_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_ADDRESS)


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A NAT-PMP UDP mapping request; lifetime 0 (with external port 0) deletes it."""
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, NATPMP_MAP_UDP, 0, internal_port, external_port, lifetime
    )


def _natpmp_header(data: bytes, opcode: int) -> None:
    if len(data) < 8 or data[0] != NATPMP_VERSION:
        raise RemoteProtocolError("not a NAT-PMP reply")
    if data[1] != 0x80 | opcode:
        raise RemoteProtocolError(f"not an answer to NAT-PMP opcode {opcode}")
    (result,) = struct.unpack_from("!H", data, 2)
    if result != 0:
        reason = _NATPMP_RESULTS.get(result, f"result {result}")
        raise GatewayRefusedError(f"NAT-PMP: {reason}", result)


def parse_natpmp_address(data: bytes) -> str:
    _natpmp_header(data, NATPMP_ADDRESS)
    if len(data) < 12:
        raise RemoteProtocolError("a NAT-PMP address reply shorter than 12 bytes")
    return str(ipaddress.IPv4Address(data[8:12]))


def parse_natpmp_map(data: bytes, internal_port: int) -> MapReply:
    _natpmp_header(data, NATPMP_MAP_UDP)
    if len(data) < 16:
        raise RemoteProtocolError("a NAT-PMP mapping reply shorter than 16 bytes")
    reply_internal, external_port, lifetime = struct.unpack_from("!HHI", data, 8)
    if reply_internal != internal_port:
        raise RemoteProtocolError("a NAT-PMP reply for another port")
    return MapReply(external_port, lifetime)


# -- UPnP IGD -----------------------------------------------------------------------------


def ssdp_search(target: str, group: tuple[str, int] = SSDP_GROUP) -> bytes:
    host = f"[{group[0].upper()}]" if ":" in group[0] else group[0]
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {host}:{group[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        "MX: 2\r\n"
        f"ST: {target}\r\n"
        "\r\n"
    ).encode("ascii")


def parse_ssdp_location(data: bytes) -> str:
    """The description URL an SSDP answer names (http only)."""
    lines = data.decode("latin-1").split("\r\n")  # latin-1 decodes any bytes
    if not lines[0].startswith("HTTP/1.") or " 200" not in lines[0]:
        raise RemoteProtocolError("not an SSDP search answer")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            return http_url(value.strip())
    raise RemoteProtocolError("an SSDP answer without a location")


def http_url(url: str) -> str:
    """``url`` if it is a plain http URL with a host and a valid port, in ASCII (a request
    line is sent as such)."""
    if not url.isascii():
        raise RemoteProtocolError(f"a URL from the gateway that is not ASCII: {url[:100]!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        raise RemoteProtocolError(f"a malformed URL from the gateway: {url[:100]!r}") from exc
    if parts.scheme != "http" or not parts.hostname:
        raise RemoteProtocolError(f"not an http URL: {url[:100]!r}")
    return url


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes


def http_request(method: str, url: str, body: bytes = b"", soap_action: str | None = None) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = [
        f"{method} {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Connection: close",
        "User-Agent: p2pfs",
    ]
    if body or method == "POST":
        headers.append('Content-Type: text/xml; charset="utf-8"')
        headers.append(f"Content-Length: {len(body)}")
    if soap_action is not None:
        headers.append(f'SOAPAction: "{soap_action}"')
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


def parse_http_response(data: bytes) -> HttpResponse:
    """A whole HTTP/1.x response read to the connection's close (``Connection: close``)."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise RemoteProtocolError("an HTTP answer without the end of its headers")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if (
        len(status_line) < 2
        or not status_line[0].startswith("HTTP/1.")
        or not status_line[1].isdigit()
    ):
        raise RemoteProtocolError("not an HTTP answer")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit() or int(length) > len(body):
            raise RemoteProtocolError("an HTTP answer shorter than its Content-Length")
        body = body[: int(length)]
    return HttpResponse(int(status_line[1]), body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, separator, rest = data.partition(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        if (
            not separator
            or not size_text
            or any(c not in b"0123456789abcdefABCDEF" for c in size_text)
        ):
            raise RemoteProtocolError("a malformed chunked HTTP body")
        size = int(size_text, 16)
        if size == 0:
            return bytes(out)
        if len(rest) < size:
            raise RemoteProtocolError("a chunked HTTP body cut short")
        out += rest[:size]
        data = rest[size:].removeprefix(b"\r\n")


def _xml(body: bytes) -> ElementTree.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        # No device needs a DTD; entity expansion is how an XML reply would blow up.
        raise RemoteProtocolError("an XML answer with a DTD")
    try:
        return ElementTree.fromstring(body)
    except (ElementTree.ParseError, LookupError, ValueError) as exc:
        # LookupError: an XML declaration naming an encoding Python does not know.
        raise RemoteProtocolError(f"malformed XML from the gateway: {exc}") from exc


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


@dataclass(frozen=True, slots=True)
class WanService:
    service_type: str
    control_url: str


def find_wan_service(description: bytes, description_url: str) -> WanService:
    """The WAN connection service of an IGD's device description, most capable first."""
    return find_service(description, description_url, WAN_SERVICES, "WAN connection service")


def find_service(
    description: bytes, description_url: str, wanted: tuple[str, ...], what: str
) -> WanService:
    """The first of the ``wanted`` service types an IGD's device description has (in
    ``wanted``'s order), with its control URL."""
    root = _xml(description)
    base = description_url
    found: dict[str, str] = {}
    for element in root.iter():
        if _local(element.tag) == "URLBase" and element.text and element.text.strip():
            base = element.text.strip()
        if _local(element.tag) != "service":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in element}
        service_type = fields.get("serviceType", "")
        control = fields.get("controlURL", "")
        if service_type in wanted and control:
            found.setdefault(service_type, control)
    for service_type in wanted:
        if service_type in found:
            try:
                url = urljoin(base, found[service_type])
            except ValueError as exc:
                raise RemoteProtocolError("a malformed control URL") from exc
            return WanService(service_type, http_url(url))
    raise RemoteProtocolError(f"the gateway's description names no {what}")


def soap_body(service_type: str, action: str, arguments: dict[str, str | int]) -> bytes:
    inner = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in arguments.items())
    return (
        '<?xml version="1.0"?>'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}>'
        "</s:Body></s:Envelope>"
    ).encode()


def parse_soap(response: HttpResponse) -> dict[str, str]:
    """A SOAP action's output arguments; a UPnP fault raises ``GatewayRefusedError``."""
    if response.status == 200:
        root = _xml(response.body)
        for element in root.iter():
            if _local(element.tag).endswith("Response"):
                return {_local(child.tag): (child.text or "").strip() for child in element}
        raise RemoteProtocolError("a SOAP answer without a response element")
    code, description = 0, f"HTTP {response.status}"
    if response.body:
        try:
            fault: ElementTree.Element | None = _xml(response.body)
        except RemoteProtocolError:
            fault = None
        if fault is not None:
            for element in fault.iter():
                name = _local(element.tag)
                if name == "errorCode" and (element.text or "").strip().isdigit():
                    code = int((element.text or "").strip())
                elif name == "errorDescription" and element.text:
                    description = element.text.strip()
    raise GatewayRefusedError(f"UPnP: {description}" + (f" ({code})" if code else ""), code)
