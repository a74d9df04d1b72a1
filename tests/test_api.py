"""The HTTP API: the event bus, rates and metrics alone (fast), then two real daemons driven
over HTTP only (key required, a folder joined by ticket, a file seen arriving through the
event stream, /metrics parsed, every example of protocol/API.md checked against answers)."""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pfs.api.app import ApiApp
from p2pfs.api.metrics import Histogram, PeerTraffic, Snapshot, render
from p2pfs.daemon.events import SUBSCRIBER_BUFFER, EventBus, RateMeter
from tests.e2e_helpers import wait_until
from tests.support.daemons import DaemonProcess

PAUSE_PROOF_WAIT = 1.5
CAP = 1_000_000
CAPPED_FILE = 1_500_000
API_MD = Path(__file__).resolve().parent.parent / "protocol" / "API.md"

# -- the parts alone -------------------------------------------------------------------------


def test_event_bus_keeps_recent_events_and_drops_a_slow_subscriber() -> None:
    async def main() -> None:
        bus = EventBus(recent=5)
        with bus.subscribe() as fast, bus.subscribe() as slow:
            first = bus.emit("a", n=1)
            assert (await fast.receive()) is first
            for n in range(SUBSCRIBER_BUFFER + 1):
                bus.emit("b", n=n)
                assert (await fast.receive()).data == {"n": n}
            # ``slow`` read nothing: it was dropped at the buffer's end, its stream ends.
            received = [event async for event in slow]
            assert len(received) == SUBSCRIBER_BUFFER
            assert bus.subscribers == 1
        assert bus.subscribers == 0
        assert [e.id for e in bus.recent()] == list(range(bus.last_id - 4, bus.last_id + 1))
        assert [e.id for e in bus.recent(after=bus.last_id - 2)] == [bus.last_id - 1, bus.last_id]
        assert bus.recent()[0].to_json().keys() == {"id", "time", "type", "data"}

    trio.run(main)


def test_rate_meter_measures_over_a_window_and_forgets() -> None:
    meter = RateMeter()
    assert meter.rate("p", 0, now=10.0) == 0.0
    assert meter.rate("p", 500, now=10.5) == 0.0  # under a window: the last rate stands
    assert meter.rate("p", 3000, now=11.5) == pytest.approx(2000.0)
    assert meter.rate("p", 3000, now=12.0) == pytest.approx(2000.0)
    meter.keep_only(set())
    assert meter.rate("p", 9000, now=13.0) == 0.0  # forgotten: starts again


def test_metrics_render_parses_as_prometheus_text() -> None:
    latency = Histogram()
    for seconds in (0.001, 0.02, 0.02, 3.0, 60.0):
        latency.observe(seconds)
    text = render(
        Snapshot(
            bytes_by_kind={("sent", "payload"): 10, ("received", "protocol"): 7},
            peers=[PeerTraffic('a"b\\c', "relayed", 5, 6, 2, 3)],
            chunks={"received": 3, "rejected": 1},
            dht_lookups=4,
            lookup_latency=latency,
            folders_by_state={"syncing": 2},
            event_subscribers=1,
            events_emitted=9,
            udp_buffers={"receive": 4096, "send": 2048},
            udp_kernel_drops=12,
        )
    ).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("p2pfs_bytes_total", (("direction", "sent"), ("kind", "payload")))] == 10
    peer = (("direction", "received"), ("kind", "udp"), ("path", "relayed"), ("peer", 'a"b\\c'))
    assert samples[("p2pfs_peer_bytes_total", peer)] == 6
    peer = (("direction", "sent"), ("kind", "payload"), ("path", "relayed"), ("peer", 'a"b\\c'))
    assert samples[("p2pfs_peer_bytes_total", peer)] == 2
    assert samples[("p2pfs_connections", (("path", "relayed"),))] == 1
    assert samples[("p2pfs_folders", (("state", "syncing"),))] == 2
    assert samples[("p2pfs_folders", (("state", "idle"),))] == 0
    assert samples[("p2pfs_discovery_lookup_seconds_bucket", (("le", "0.025"),))] == 3
    assert samples[("p2pfs_discovery_lookup_seconds_bucket", (("le", "+Inf"),))] == 5
    assert samples[("p2pfs_discovery_lookup_seconds_count", ())] == 5
    assert samples[("p2pfs_chunks_total", (("outcome", "rejected"),))] == 1
    assert samples[("p2pfs_udp_buffer_bytes", (("direction", "receive"),))] == 4096
    assert samples[("p2pfs_udp_kernel_drops_total", ())] == 12


def test_a_handler_bug_is_a_json_500_and_the_app_serves_on() -> None:
    """The ASGI app alone (no server): a handler raising something unforeseen is answered
    as our fault, as the control socket does, and the next request is served."""
    key = "k" * 24

    async def broken(params: dict[str, Any], emit: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def fine(params: dict[str, Any], emit: Any) -> dict[str, Any]:
        return {"echo": params}

    async def metrics() -> bytes:
        return b""

    app = ApiApp(key, {"broken": broken, "fine": fine}, EventBus(), metrics)

    async def call(name: str) -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b'{"a": 1}', "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": f"/api/control/{name}",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8384"), (b"x-api-key", key.encode())],
        }
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    async def main() -> None:
        status, body = await call("broken")
        assert status == 500
        assert body == {
            "error": {"kind": "internal", "message": "internal error: RuntimeError: boom"}
        }
        assert await call("fine") == (200, {"echo": {"a": 1}})

    trio.run(main)


# -- over HTTP, with real daemons ------------------------------------------------------------


class Api:
    def __init__(self, daemon: DaemonProcess) -> None:
        # The control socket answers while the HTTP server is still starting.
        wait_until(lambda: daemon.call("id")["api"] is not None, timeout=30)
        info = daemon.cli_json("id")["api"]
        self.url: str = info["url"]
        self.key: str = info["key"]
        assert info["ui"] == f"{self.url}/#key={self.key}"

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        for name, value in (headers if headers is not None else {"X-API-Key": self.key}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers["content-type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["content-type"], error.read()

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, content_type, payload = self.request(method, path, body)
        assert content_type == "application/json"
        assert status == 200, payload
        return json.loads(payload)


class EventStream:
    """An SSE client in a thread: every event it reads lands in ``events``."""

    def __init__(self, api: Api) -> None:
        request = urllib.request.Request(api.url + "/api/events/stream")
        request.add_header("X-API-Key", api.key)
        self.response = urllib.request.urlopen(request, timeout=60)
        assert self.response.headers["content-type"] == "text/event-stream"
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in fields:
                        event = json.loads(fields["data"])
                        assert str(event["id"]) == fields["id"]
                        assert event["type"] == fields["event"]
                        self.events.put(event)
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
        except (OSError, ValueError, AttributeError):
            # Closed by the test (http.client drops its file on close: AttributeError).
            return

    def wait_for(self, kind: str, path: str, timeout: float = 30) -> dict[str, Any]:
        while True:
            event = self.events.get(timeout=timeout)
            if event["type"] == kind and path in event["data"].get("paths", []):
                return event

    def close(self) -> None:
        self.response.close()


def documented_examples() -> dict[str, Any]:
    """Heading "### `METHOD /path`" -> the JSON example under it in protocol/API.md."""
    text = API_MD.read_text()
    found = {}
    for match in re.finditer(
        r"^### `(\w+ [^`? ]+)[^`]*`[^\n]*\n(?:(?!```|#)[^\n]*\n)*```json\n(.*?)\n```",
        text,
        re.M | re.S,
    ):
        found[match.group(1)] = json.loads(match.group(2))
    return found


def assert_same_shape(example: Any, real: Any, where: str) -> None:
    """The keys of every object, and of a list's first item where both have one."""
    if isinstance(example, dict):
        assert isinstance(real, dict), where
        assert set(example) == set(real), f"{where}: doc {sorted(example)} vs {sorted(real)}"
        for key in example:
            if isinstance(example[key], dict) and example[key] and key not in ("dht",):
                assert_same_shape(example[key], real[key], f"{where}.{key}")
            if isinstance(example[key], list):
                assert_same_shape(example[key], real[key], f"{where}.{key}")
    elif isinstance(example, list) and example and real:
        assert_same_shape(example[0], real[0], f"{where}[0]")


def check_access(api: Api) -> None:
    """The key is required, as a header or a bearer token; the Host must be an address."""
    for headers in ({}, {"X-API-Key": "wrong-key-of-some-length"}):
        status, content_type, payload = api.request("GET", "/api/id", headers=headers)
        assert status == 401 and content_type == "application/json"
        assert json.loads(payload)["error"]["kind"] == "unauthorized"
    status, _, _ = api.request("GET", "/metrics", headers={})
    assert status == 401
    bearer = {"Authorization": f"Bearer {api.key}"}
    assert api.request("GET", "/api/status", headers=bearer)[0] == 200
    rebound = {"X-API-Key": api.key, "Host": "evil.example:8384"}
    assert api.request("GET", "/api/status", headers=rebound)[0] == 403


def check_errors(api: Api, tmp_path: Path) -> None:
    # Errors are JSON objects with whose fault it is.
    status, _, payload = api.request("DELETE", f"/api/folders?path={tmp_path / 'nowhere'}")
    assert status == 400 and json.loads(payload)["error"]["kind"] == "local"
    status, _, payload = api.request("POST", "/api/control/no_such_method", {})
    assert status == 404 and json.loads(payload)["error"]["kind"] == "not-found"
    status, _, payload = api.request("POST", "/api/folders", None)
    assert status == 400


def check_metrics(api: Api) -> None:
    # Metrics parse, and count what happened.
    status, content_type, payload = api.request("GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(payload.decode())
        for s in family.samples
    }
    assert samples[("p2pfs_connections", (("path", "direct"),))] >= 1
    assert sum(v for (n, _), v in samples.items() if n == "p2pfs_folders") == 1
    assert samples[("p2pfs_chunks_total", (("outcome", "received"),))] >= 1
    assert samples[("p2pfs_bytes_total", (("direction", "received"), ("kind", "payload")))] >= 15
    per_peer = [
        value
        for (name, labels), value in samples.items()
        if name == "p2pfs_peer_bytes_total"
        and ("kind", "payload") in labels
        and ("direction", "received") in labels
    ]
    assert per_peer and max(per_peer) >= 15  # hello.txt's bytes, from A


def check_page(api: Api, ticket: str) -> None:
    # The page and its files come from the daemon itself, without a key.
    status, content_type, page = api.request("GET", "/", headers={})
    assert status == 200 and content_type.startswith("text/html")
    assert b'src="/ui/app.js"' in page and b"://" not in page
    assert api.request("GET", "/ui/app.js", headers={})[0] == 200
    status, content_type, svg = api.request("GET", f"/api/qr.svg?text={ticket}")
    assert status == 200 and content_type == "image/svg+xml" and svg.startswith(b"<svg")


def local_changes(api: Api) -> list[str]:
    return [change["path"] for change in api.json("GET", "/api/local-changes")["local_changes"]]


def check_revert(b: DaemonProcess, api_b: Api, tmp_path: Path) -> None:
    # Revert: the new file is put aside, the edited one comes back from A.
    (tmp_path / "fb" / "hello.txt").write_bytes(b"edited on a read-only member")
    wait_until(lambda: "hello.txt" in local_changes(api_b), timeout=30)
    reverted = b.cli_json("sync", "revert", str(tmp_path / "fb"))
    assert reverted["reverted"] == ["hello.txt", "mine.txt"] and reverted["pending"] == []
    assert (tmp_path / "fb" / "hello.txt").read_bytes() == b"hello over http"
    assert not (tmp_path / "fb" / "mine.txt").exists()
    kept = {
        p.name.split("~")[0]: p.read_bytes()
        for p in (tmp_path / "fb" / ".p2pfs" / "versions").iterdir()
    }
    assert kept == {"hello": b"edited on a read-only member", "mine": b"kept here"}
    assert local_changes(api_b) == []
    assert "no local changes" in b.cli("sync", "revert", str(tmp_path / "fb")).stdout


def check_shares(
    a: DaemonProcess, api_a: Api, api_b: Api, tmp_path: Path, examples: dict[str, Any]
) -> None:
    shared_path = str(tmp_path / "fa" / "hello.txt")
    shared = api_a.json("POST", "/api/shares", {"path": shared_path})
    assert_same_shape(examples["POST /api/shares"], shared, "POST /api/shares")
    assert api_a.json("GET", "/api/shares")["shares"][0]["root"] == shared["root"]
    # A shared file changed since: its old ticket is answered so, and the sharer indexes
    # it again at once and lists the new ticket beside the root it replaces.
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"first words")
    first = api_a.json("POST", "/api/shares", {"path": str(plain)})
    plain.write_bytes(b"other words")
    for attempt in ("chunk read fails", "old root asked again"):
        fetch = {"ticket": first["ticket"], "dest": str(tmp_path / "got.bin"), "give_up_after": 1}
        status, _, payload = api_b.request("POST", "/api/fetches", fetch)
        error = json.loads(payload)["error"]
        assert status == 502 and error["kind"] == "remote", attempt
        if attempt == "old root asked again":  # the first may meet the chunk read failing
            assert "changed since its ticket was made" in error["message"], error

        def listed() -> dict[str, Any]:
            shares = api_a.json("GET", "/api/shares")["shares"]
            return next(s for s in shares if s["path"] == str(plain))

        wait_until(lambda: listed()["replaces"] == [first["root"]], timeout=30)
    now = listed()
    assert now["root"] != first["root"] and now["stale"] is False
    assert not (tmp_path / "got.bin").exists()
    fetch = {"ticket": now["ticket"], "dest": str(tmp_path / "got.bin")}
    assert api_b.json("POST", "/api/fetches", fetch)["root"] == now["root"]
    assert (tmp_path / "got.bin").read_bytes() == b"other words"
    assert now["ticket"] in a.cli("status").stdout
    changed = api_a.json("GET", "/api/events?types=share-changed")["events"]
    assert changed[-1]["data"] == {
        "path": str(plain),
        "root": now["root"],
        "previous": first["root"],
    }
    failed = api_b.json("GET", "/api/events?types=error")["events"]
    assert failed[-1]["data"]["what"] == "fetch"
    a.cli("unshare", str(plain))

    gone = a.cli_json("unshare", shared["root"][:10])
    assert gone == {
        "root": shared["root"],
        "path": str(tmp_path / "fa" / "hello.txt"),
        "unshared": True,
    }
    assert api_a.json("GET", "/api/shares") == {"shares": []}
    again = a.cli("unshare", str(tmp_path / "fa" / "hello.txt"), "--json", check=False)
    assert (
        again.returncode == 2
        and "is not shared here" in json.loads(again.stdout)["error"]["message"]
    )


def check_pause(b: DaemonProcess, api_b: Api, tmp_path: Path) -> None:
    # Paused, B takes nothing; resumed, it catches up.
    paused = b.cli_json("sync", "pause", str(tmp_path / "fb"))
    assert paused["paused"] is True
    assert api_b.json("GET", "/api/folders")["folders"][0]["state"] == "paused"
    (tmp_path / "fa" / "later.txt").write_bytes(b"while paused")
    time.sleep(PAUSE_PROOF_WAIT)  # sync takes ~0.2 s on loopback when not paused
    assert not (tmp_path / "fb" / "later.txt").exists()
    assert api_b.json("POST", "/api/control/sync_resume", {"path": str(tmp_path / "fb")}) == {
        **paused,
        "paused": False,
    }
    wait_until((tmp_path / "fb" / "later.txt").exists, timeout=30)


def test_http_api_drives_two_daemons(
    pair: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    a, b = pair
    api_a, api_b = Api(a), Api(b)
    assert api_a.url != api_b.url  # one of them fell back from the default port
    examples = documented_examples()
    assert len(examples) >= 12

    check_access(api_a)
    # A starts a folder, B joins it read-only, both over HTTP.
    (tmp_path / "fa").mkdir()
    stream = EventStream(api_b)
    try:
        created = api_a.json("POST", "/api/folders", {"path": str(tmp_path / "fa")})
        assert_same_shape(examples["POST /api/folders"], created, "POST /api/folders")
        shown = api_a.json("GET", f"/api/folders/tickets?path={tmp_path / 'fa'}")
        assert shown["rw"] == created["rw"] and shown["ro"] == created["ro"]
        # The CLI shows the same tickets again (`p2pfs sync show DIR`).
        assert a.cli_json("sync", "show", str(tmp_path / "fa")) == shown
        assert created["ro"] in a.cli("sync", "show", str(tmp_path / "fa")).stdout
        joined = api_b.json(
            "POST", "/api/folders", {"path": str(tmp_path / "fb"), "ticket": created["ro"]}
        )
        assert joined["mode"] == "ro" and "rw" not in joined

        # A file written at A arrives at B, and B's event stream says so.
        (tmp_path / "fa" / "hello.txt").write_bytes(b"hello over http")
        event = stream.wait_for("folder-changes", "hello.txt")
        assert event["data"]["member"] == a.node_id()
        assert (tmp_path / "fb" / "hello.txt").read_bytes() == b"hello over http"
    finally:
        stream.close()

    check_pause(b, api_b, tmp_path)
    # B's own edit stays local (read-only member) and is listed as such.
    (tmp_path / "fb" / "mine.txt").write_bytes(b"kept here")
    wait_until(
        lambda: any(
            c["path"] == "mine.txt"
            for c in api_b.json("GET", "/api/local-changes")["local_changes"]
        ),
        timeout=30,
    )
    check_revert(b, api_b, tmp_path)
    folders = api_b.json("GET", "/api/folders")
    assert folders == api_b.json("POST", "/api/control/sync_list")
    [folder] = folders["folders"]
    assert folder["state"] in ("idle", "scanning", "syncing")
    assert re.fullmatch("[a-z2-7]{7}", folder["device"])  # as conflict copies spell it
    wait_until(lambda: api_b.json("GET", "/api/folders")["folders"][0]["members"] != [])
    member = api_b.json("GET", "/api/folders")["folders"][0]["members"][0]
    assert member["node_id"] == a.node_id() and member["path"] == "direct"

    check_shares(a, api_a, api_b, tmp_path, examples)

    # Every documented view answers with the documented keys.
    for name, example in examples.items():
        method, path = name.split(" ", 1)
        if method != "GET" or path == "/api/folders/tickets":
            continue
        if path == "/api/events":  # the example is of this type; the first event is not
            path += "?types=folder-changes"
        assert_same_shape(example, api_b.json("GET", path), name)
    history = api_b.json("GET", "/api/events?types=folder-changes")["events"]
    assert any("hello.txt" in e["data"]["paths"] for e in history)
    assert api_b.json("GET", f"/api/events?since={history[-1]['id']}&types=folder-changes") == {
        "events": []
    }

    check_errors(api_b, tmp_path)
    check_metrics(api_b)
    check_page(api_b, created["ro"])


def test_no_gui_and_the_download_cap_covers_sync(tmp_path: Path) -> None:
    """Without --gui there is no API; and a capped member receives a sync file no faster
    than its --max-download-rate (it once took 8 MB in 0.37 s under a cap)."""
    a = DaemonProcess(tmp_path / "a", extra_args=("--no-lan", "--no-gui")).start()
    try:
        capped = ("--no-lan", "--no-gui", "--max-download-rate", str(CAP))
        b = DaemonProcess(tmp_path / "b", extra_args=capped).start()
        try:
            assert b.call("id")["api"] is None
            # Empty lists say so.
            assert b.cli("sync", "list").stdout.startswith("no sync folders")
            assert b.cli("conflicts").stdout == "no conflicts\n"
            assert "web UI" not in b.cli("id").stdout

            (tmp_path / "fa").mkdir()
            (tmp_path / "fa" / "big.bin").write_bytes(os.urandom(CAPPED_FILE))
            ticket = a.call("sync", {"path": str(tmp_path / "fa")})["ro"]
            started = time.monotonic()
            b.call("sync", {"path": str(tmp_path / "fb"), "ticket": ticket})
            # Mid-sync, B reports its need to A (FolderRoot) and shows it itself.
            seen_at_a = wait_for_value(lambda: member_completion(a), lambda c: c["need_items"])
            assert seen_at_a["need_items"] == 1 and 0 < seen_at_a["need_bytes"] <= CAPPED_FILE
            assert (seen_at_a["global_items"], seen_at_a["global_bytes"]) == (1, CAPPED_FILE)
            assert seen_at_a["percent"] < 100
            own = b.call("sync_list")["folders"][0]
            assert own["completion"]["global_bytes"] == CAPPED_FILE
            if own["completion"]["need_items"]:  # else it finished in between
                assert own["progress"] == own["completion"]["percent"] < 100
            wait_until(lambda: size_of(tmp_path / "fb" / "big.bin") == CAPPED_FILE, timeout=60)
            # The bucket's burst (256 KiB) is free; the rest waits on the rate.
            assert time.monotonic() - started >= (CAPPED_FILE - 256 * 1024) / CAP * 0.9
            done = wait_for_value(lambda: member_completion(a), lambda c: c["percent"] == 100)
            assert done == {
                "need_items": 0,
                "need_bytes": 0,
                "global_items": 1,
                "global_bytes": CAPPED_FILE,
                "percent": 100.0,
            }
            assert b.call("sync_list")["folders"][0]["completion"] == done
            # A pause survives a restart; resume ends it.
            b.call("sync_pause", {"path": str(tmp_path / "fb")})
            b.stop()
            b.start()
            assert b.call("sync_list")["folders"][0]["state"] == "paused"
            b.call("sync_resume", {"path": str(tmp_path / "fb")})
            assert b.call("sync_list")["folders"][0]["state"] != "paused"
        finally:
            b.stop()
    finally:
        a.stop()


def member_completion(daemon: DaemonProcess) -> dict[str, Any] | None:
    """The completion the first linked member of the daemon's first folder reports."""
    folders = daemon.call("sync_list")["folders"]
    members = folders[0]["members"] if folders else []
    return members[0]["completion"] if members else None


def wait_for_value(
    read: Callable[[], dict[str, Any] | None],
    wanted: Callable[[dict[str, Any]], object],
    timeout: float = 30,
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        value = read()
        if value is not None and wanted(value):
            found.append(value)
            return True
        return False

    wait_until(check, timeout=timeout)
    return found[-1]


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1
