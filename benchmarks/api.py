"""``python -m benchmarks api``: what the web UI costs a daemon, and how fast it hears.

Two daemons on loopback (their defaults, ``--no-lan``) sync one folder (A read-write, B
joined read-write), then, on B:
- **idle cost**: B's CPU seconds and RSS over ``--window`` seconds with no HTTP client, then
  with the UI's steady state (one event stream connected and the page's first refresh of
  its views), then without again; the overhead is the UI window against the mean of the two
  plain windows (goal: at most 5% more RSS and CPU);
- **event latency**: with the stream connected, a file written into B's folder until B's
  ``local-changes`` event for it is read by the client (``local``), and a file written into
  A's folder until B's ``folder-changes`` event for it (``remote``: A's scan, the exchange,
  the placement at B), ``--events`` times each (goal: at most 100 ms locally).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from tests.support.daemons import DaemonProcess


class Stream:
    """An SSE reader in a thread: (arrival time, event) pairs land in ``events``."""

    def __init__(self, url: str, key: str) -> None:
        request = urllib.request.Request(url + "/api/events/stream")
        request.add_header("X-API-Key", key)
        self.response = urllib.request.urlopen(request, timeout=120)
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.response:
                if raw.startswith(b"data: "):
                    self.events.put((time.perf_counter(), json.loads(raw[6:])))
        except (OSError, ValueError, AttributeError):
            return  # closed (http.client drops its file on close: AttributeError)

    def wait_for(self, kind: str, path: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            arrived, event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event["type"] == kind and path in event["data"].get("paths", []):
                return arrived

    def close(self) -> None:
        self.response.close()


def api_of(daemon: DaemonProcess) -> dict[str, str]:
    """The daemon's API address and key, once its HTTP server is up."""
    deadline = time.monotonic() + 30
    while (info := daemon.call("id")["api"]) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon's HTTP API did not start")
        time.sleep(0.05)  # waiting on another process
    result: dict[str, str] = info
    return result


def get(info: dict[str, str], path: str) -> Any:
    request = urllib.request.Request(info["url"] + path)
    request.add_header("X-API-Key", info["key"])
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def post(info: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(info["url"] + path, json.dumps(body).encode(), method="POST")
    request.add_header("X-API-Key", info["key"])
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def idle_window(process: psutil.Process, seconds: float) -> tuple[float, int]:
    """CPU seconds the process used over ``seconds`` of wall time, and its RSS at the end."""
    before = process.cpu_times()
    time.sleep(seconds)  # a harness measuring another process
    after = process.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu, process.memory_info().rss


def latencies(stream: Stream, folder: Path, kind: str, runs: int, tag: str) -> list[float]:
    found = []
    for run in range(runs):
        name = f"{tag}-{run}.txt"
        written = time.perf_counter()
        (folder / name).write_bytes(f"event {run}".encode())
        found.append(stream.wait_for(kind, name) - written)
        time.sleep(0.3)  # let the folder settle: each sample starts from idle
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks api")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per idle window")
    parser.add_argument("--events", type=int, default=20, help="latency samples per kind")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="p2pfs-bench-api-") as scratch:
        report = run(Path(scratch), args.window, args.events)
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    return 0


def run(base: Path, window: float, events: int) -> dict[str, Any]:
    a = DaemonProcess(base / "a", extra_args=("--no-lan",)).start()
    b = DaemonProcess(base / "b", extra_args=("--no-lan",)).start()
    try:
        info_a, info_b = api_of(a), api_of(b)
        (base / "fa").mkdir()
        created = post(info_a, "/api/folders", {"path": str(base / "fa")})
        post(info_b, "/api/folders", {"path": str(base / "fb"), "ticket": created["rw"]})
        deadline = time.monotonic() + 30
        while not get(info_b, "/api/folders")["folders"][0]["members"]:
            if time.monotonic() > deadline:
                raise RuntimeError("B never linked with A")
            time.sleep(0.1)
        process = psutil.Process(b.pid)
        time.sleep(2.0)  # the join's scans and first exchange are over
        plain_before = idle_window(process, window)
        stream = Stream(info_b["url"], info_b["key"])
        try:
            for view in ("/api/id", "/api/folders", "/api/conflicts", "/api/status"):
                get(info_b, view)  # the page's first refresh
            with_ui = idle_window(process, window)
            local = latencies(stream, base / "fb", "local-changes", events, "local")
            remote = latencies(stream, base / "fa", "folder-changes", events, "remote")
        finally:
            stream.close()
        plain_after = idle_window(process, window)
    finally:
        a.stop()
        b.stop()
    plain_cpu = (plain_before[0] + plain_after[0]) / 2
    plain_rss = (plain_before[1] + plain_after[1]) / 2
    return {
        "window_s": window,
        "cpu_s": {"plain_before": plain_before[0], "ui": with_ui[0], "plain_after": plain_after[0]},
        "rss": {"plain_before": plain_before[1], "ui": with_ui[1], "plain_after": plain_after[1]},
        "cpu_overhead_pct": 100 * (with_ui[0] - plain_cpu) / plain_cpu if plain_cpu else None,
        "rss_overhead_pct": 100 * (with_ui[1] - plain_rss) / plain_rss,
        "latency_ms": {
            kind: {
                "p50": 1000 * statistics.median(samples),
                "p95": 1000 * statistics.quantiles(samples, n=20, method="inclusive")[-1],
                "max": 1000 * max(samples),
            }
            for kind, samples in (("local", local), ("remote", remote))
        },
    }


def show(report: dict[str, Any]) -> None:
    console = Console(file=sys.stdout)
    table = Table(title=f"daemon B idle, {report['window_s']:.0f} s windows")
    for column in ("", "plain (before)", "UI: event stream open", "plain (after)", "overhead"):
        table.add_column(column, justify="right")
    cpu, rss = report["cpu_s"], report["rss"]
    cpu_over = report["cpu_overhead_pct"]
    table.add_row(
        "CPU seconds",
        f"{cpu['plain_before']:.3f}",
        f"{cpu['ui']:.3f}",
        f"{cpu['plain_after']:.3f}",
        "n/a" if cpu_over is None else f"{cpu_over:+.1f}%",
    )
    table.add_row(
        "RSS MiB",
        *(f"{rss[k] / (1 << 20):.1f}" for k in ("plain_before", "ui", "plain_after")),
        f"{report['rss_overhead_pct']:+.1f}%",
    )
    console.print(table)
    latency = Table(title="file change -> event read by the stream's client (ms)")
    for column in ("", "p50", "p95", "max"):
        latency.add_column(column, justify="right")
    for kind, figures in report["latency_ms"].items():
        latency.add_row(kind, *(f"{figures[k]:.1f}" for k in ("p50", "p95", "max")))
    console.print(latency)
