"""Real node daemons in real processes, each with its own home: for end-to-end tests and
benchmarks. Only processes started here are ever signalled, by their own PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pfs.daemon.control_client import SOCKET_NAME, DaemonNotRunning, call

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TEST_LAN_PORT = 21140
"""Loopback daemons beacon on this port plus the pytest-xdist worker's number, not on the
shipped 21029: the suite runs on every core, and a daemon of one test must not find another
test's holders (or a user's node on this host) through LAN discovery."""


def lan_port_of_this_worker() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return TEST_LAN_PORT + int(worker.removeprefix("gw"))


class DaemonProcess:
    def __init__(
        self,
        home: Path,
        listen: str | None = "127.0.0.1:0",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        program: tuple[str, ...] = (sys.executable, "-m", "p2pfs"),
    ) -> None:
        """``prefix``: a command the daemon runs under that execs it (``ip netns exec NS``),
        so the PID is still the daemon's. ``listen`` None: the daemon's default, as
        `make run` starts it. ``program``: what takes the CLI's arguments (a test entry
        point may stand in for the shipped CLI)."""
        self.home = Path(home)
        self.listen = listen
        self.extra_args = extra_args
        self.prefix = prefix
        self.program = program
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def socket_path(self) -> str:
        return str(self.home / SOCKET_NAME)

    @property
    def log_path(self) -> Path:
        return self.home / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> DaemonProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        if self._log is not None:  # restarted after a kill
            self._log.close()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *self.prefix,
                *self.program,
                "--home",
                str(self.home),
                "daemon",
                *(("--listen", self.listen) if self.listen is not None else ()),
                *self._lan_port_args(),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.01
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log_tail()}")
            try:
                self.call("id")
                return self
            except (DaemonNotRunning, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start:\n{self.log_tail()}") from None
                # A harness waiting for a process to come up (~0.55 s): polled every 20 ms,
                # not up to 200 ms, which cost ~0.14 s a start, hundreds of them a suite.
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def _lan_port_args(self) -> tuple[str, ...]:
        """A daemon in a namespace of its own (``prefix``) is a machine at its defaults; one
        in this host's namespace shares the link with every other test's daemons."""
        if self.prefix or "--no-lan" in self.extra_args or "--lan-port" in self.extra_args:
            return ()
        return ("--lan-port", str(lan_port_of_this_worker()))

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return call(self.socket_path, method, params)

    def node_id(self) -> str:
        return str(self.call("id")["node_id"])

    def address(self) -> str:
        return str(self.call("id")["addresses"][0])

    def cli(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(
            [sys.executable, "-m", "p2pfs", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and completed.returncode != 0:
            raise RuntimeError(
                f"p2pfs {' '.join(args)} exited {completed.returncode}:\n{completed.stderr}"
            )
        return completed

    def cli_json(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        completed = self.cli(*args, "--json", timeout=timeout)
        result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
        return result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within STOP_TIMEOUT."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
