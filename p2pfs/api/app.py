"""The daemon's HTTP API as an ASGI application (served by hypercorn under trio, see
``server.py``): JSON views of the node, every control-socket action, a Server-Sent Events
stream, Prometheus metrics and the single-page web UI.

Nothing here knows the node: it is handed the control handlers (the same ones the Unix
socket serves, so the CLI and the API cannot drift apart), an event source and a metrics
source. Protocol and examples: protocol/API.md.

Every ``/api/`` and ``/metrics`` request needs the node's key, in ``X-API-Key`` or as
``Authorization: Bearer KEY``. The UI's files carry no data and are served without it (the
page reads the key from its URL fragment, which the browser never sends). The Host header
must name an IP address or ``localhost``: a web page elsewhere cannot reach the API through
a name it rebinds to 127.0.0.1.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs

import trio

from p2pfs.errors import LocalProtocolError, P2pfsError, blame, explaining_error

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
HEARTBEAT_INTERVAL = 15.0
"""Seconds between SSE comment lines on a quiet stream: a dead client is noticed and
proxies keep the stream open."""
MAX_QR_TEXT = 2048

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[dict[str, Any]]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}


class EventLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def type(self) -> str: ...
    def to_json(self) -> dict[str, Any]: ...


class EventSource(Protocol):
    def recent(self, after: int = 0, limit: int = ...) -> Sequence[EventLike]: ...
    def subscribe(self) -> AbstractContextManager[trio.MemoryReceiveChannel[Any]]: ...


class HttpError(LocalProtocolError):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class ApiApp:
    def __init__(
        self,
        key: str,
        handlers: Mapping[str, Handler],
        events: EventSource,
        metrics: Callable[[], Awaitable[bytes]],
    ) -> None:
        self._key = key.encode()
        self._handlers = handlers
        self._events = events
        self._metrics = metrics
        self.requests = 0
        self.streams = 0
        """Event streams open now."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests += 1
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._route(scope, receive, tracked)
        except HttpError as exc:
            await _json(send, exc.status, {"error": {"kind": exc.kind, "message": str(exc)}})
        except (P2pfsError, BaseExceptionGroup) as raised:
            ours = explaining_error(raised)
            if ours is None:
                raise
            kind = blame(ours)
            status = 502 if kind == "remote" else 400 if kind == "local" else 500
            await _json(send, status, {"error": {"kind": kind, "message": str(ours)}})
        except Exception as exc:
            # One request is a failure boundary, as on the control socket: a bug met here
            # is logged with its traceback and answered as ours; the daemon serves on.
            logger.exception("HTTP %s %s failed unexpectedly", scope["method"], scope["path"])
            if not started:
                message = f"internal error: {type(exc).__name__}: {exc}"
                await _json(send, 500, {"error": {"kind": "internal", "message": message}})

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {name.decode("latin-1").lower(): value for name, value in scope["headers"]}
        _check_host(headers.get("host", b"").decode("latin-1"))
        if path in STATIC_FILES and method in ("GET", "HEAD"):
            name, content_type = STATIC_FILES[path]
            body = resources.files("p2pfs.api").joinpath("static", name).read_bytes()
            await _respond(send, 200, content_type, body)
            return
        if not (path.startswith("/api/") or path == "/metrics"):
            raise HttpError(404, "not-found", f"no such page: {path}")
        self._authenticate(headers)
        query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
        if path == "/metrics" and method == "GET":
            body = await self._metrics()
            await _respond(send, 200, "text/plain; version=0.0.4; charset=utf-8", body)
            return
        if path == "/api/events/stream" and method == "GET":
            last = headers.get("last-event-id", b"").decode() or query.get("since", "")
            await self._stream(send, receive, _int(last, "since"), _types(query))
            return
        if path == "/api/events" and method == "GET":
            events = self._events.recent(_int(query.get("since", "0"), "since"))
            wanted = _types(query)
            found = [e.to_json() for e in events if wanted is None or e.type in wanted]
            await _json(send, 200, {"events": found})
            return
        if path == "/api/qr.svg" and method == "GET":
            await _respond(send, 200, "image/svg+xml", _qr_svg(query.get("text", "")))
            return
        route = VIEWS.get((method, path))
        if route is not None:
            handler_name, pick = route
            params = dict(query) if method in ("GET", "DELETE") else await _body(receive)
            result = await self._call(handler_name, params)
            await _json(send, 200, pick(result) if pick is not None else result)
            return
        if path.startswith("/api/control/") and method == "POST":
            name = path.removeprefix("/api/control/")
            await _json(send, 200, await self._call(name, await _body(receive)))
            return
        raise HttpError(404, "not-found", f"no such endpoint: {method} {path}")

    def _authenticate(self, headers: Mapping[str, bytes]) -> None:
        given = headers.get("x-api-key")
        if given is None:
            authorization = headers.get("authorization", b"")
            if authorization[:7].lower() == b"bearer ":
                given = authorization[7:].strip()
        if given is None or not hmac.compare_digest(given, self._key):
            raise HttpError(401, "unauthorized", "a valid X-API-Key header is required")

    async def _call(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = self._handlers.get(name)
        if handler is None:
            raise HttpError(404, "not-found", f"unknown method {name!r}")

        async def ignore(_event: dict[str, Any]) -> None:
            """Progress of a long call is not streamed back over HTTP: the event stream
            and the transfers view show it."""

        return await handler(params, ignore)

    async def _stream(
        self, send: Send, receive: Receive, since: int, types: set[str] | None
    ) -> None:
        """Server-Sent Events: first what the ring holds after ``since`` (a reconnect's
        Last-Event-ID), then live events until the client goes away."""
        with self._events.subscribe() as live:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            self.streams += 1
            try:
                sent = since
                for event in self._events.recent(since):
                    if types is None or event.type in types:
                        await _sse(send, event)
                    sent = event.id
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                    await send(
                        {"type": "http.response.body", "body": b": ok\n\n", "more_body": True}
                    )
                    while True:
                        with trio.move_on_after(HEARTBEAT_INTERVAL):
                            try:
                                event = await live.receive()
                            except trio.EndOfChannel:
                                break  # fell behind: the client reconnects and replays
                            if event.id > sent and (types is None or event.type in types):
                                await _sse(send, event)
                            continue
                        await send(
                            {"type": "http.response.body", "body": b": \n\n", "more_body": True}
                        )
                    nursery.cancel_scope.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                self.streams -= 1


def _pick(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda result: {key: result[key]}


def _local_changes(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "local_changes": [
            {"folder": f["folder"], "dir": f["path"], "path": path}
            for f in result["folders"]
            for path in f["local_changes"]
        ]
    }


VIEWS: dict[tuple[str, str], tuple[str, Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
    ("GET", "/api/id"): ("id", None),
    ("GET", "/api/status"): ("status", None),
    ("GET", "/api/peers"): ("status", _pick("peers")),
    ("GET", "/api/shares"): ("status", _pick("shares")),
    ("GET", "/api/transfers"): ("status", _pick("transfers")),
    ("GET", "/api/folders"): ("sync_list", None),
    ("GET", "/api/folders/tickets"): ("sync_show", None),
    ("GET", "/api/conflicts"): ("conflicts", None),
    ("GET", "/api/local-changes"): ("sync_list", _local_changes),
    ("POST", "/api/shares"): ("share", None),
    ("POST", "/api/folders"): ("sync", None),
    ("DELETE", "/api/folders"): ("sync_remove", None),
    ("POST", "/api/fetches"): ("fetch", None),
}
"""REST names for the common actions; ``POST /api/control/METHOD`` reaches every one."""


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _sse(send: Send, event: EventLike) -> None:
    data = json.dumps(event.to_json(), separators=(",", ":"))
    text = f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"
    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})


async def _body(receive: Receive) -> dict[str, Any]:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "bad-request", "the client went away")
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise HttpError(413, "bad-request", "request body too large")
        if not message.get("more_body", False):
            break
    if not body.strip():
        return {}
    try:
        params = json.loads(body)
    except ValueError as exc:
        raise HttpError(400, "bad-request", f"request body is not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise HttpError(400, "bad-request", "request body must be a JSON object")
    return params


async def _json(send: Send, status: int, obj: dict[str, Any]) -> None:
    await _respond(send, status, "application/json", json.dumps(obj).encode())


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        # The page loads nothing from elsewhere, and nothing elsewhere may frame it.
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _check_host(host: str) -> None:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return
    try:
        ipaddress.ip_address(name)
    except ValueError:
        raise HttpError(403, "forbidden", f"Host {host!r} is not an IP address") from None


def _int(text: str, what: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise HttpError(400, "bad-request", f"{what} must be an event id")
    return int(text)


def _types(query: Mapping[str, str]) -> set[str] | None:
    text = query.get("types")
    return {t for t in text.split(",") if t} if text else None


def _qr_svg(text: str) -> bytes:
    """A QR code of ``text`` (a ticket, a node id) as SVG, drawn here: the page needs no
    script or font from anywhere."""
    import segno  # noqa: PLC0415 -- only the UI asks for codes; the daemon starts without it

    if not text or len(text) > MAX_QR_TEXT:
        raise HttpError(400, "bad-request", f"text must be 1..{MAX_QR_TEXT} characters")
    code = segno.make(text, error="m", micro=False)
    return str(code.svg_inline(scale=4, border=2)).encode()
