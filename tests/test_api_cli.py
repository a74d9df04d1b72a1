"""The daily-use side of the CLI without a daemon: config.toml under the daemon's flags,
--json errors as JSON objects, plural forms."""

from __future__ import annotations

import configparser
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfs.cli import daemon_config, parse_args, plural
from p2pfs.config import CONFIG_NAME
from p2pfs.errors import LocalProtocolError


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / CONFIG_NAME).write_text(text)


def test_config_file_sets_daemon_flags_and_flags_win(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_config(
        home,
        'listen = "127.0.0.1:7400"\n'
        "no-lan = true\n"
        'peer = ["192.0.2.7:7337"]\n'
        "max_upload_rate = 1000\n"
        "keep-versions-days = 2\n"
        'gui = "127.0.0.1:9000"\n',
    )
    args = parse_args(["--home", str(home), "daemon"])
    config = daemon_config(args)
    assert str(config.listen) == "127.0.0.1:7400"
    assert config.discovery.lan is False
    assert [str(p) for p in config.peers] == ["192.0.2.7:7337"]
    assert config.max_upload_rate == 1000
    assert config.folders.keep_versions_s == 2 * 86400
    assert str(config.gui) == "127.0.0.1:9000"

    flags = ["--listen", "127.0.0.1:7500", "--peer", "192.0.2.8:1", "--no-gui"]
    config = daemon_config(parse_args(["--home", str(home), "daemon", *flags]))
    assert str(config.listen) == "127.0.0.1:7500"  # the flag wins
    assert [str(p) for p in config.peers] == ["192.0.2.7:7337", "192.0.2.8:1"]  # adds
    assert config.gui is None
    # Other commands never read it.
    assert parse_args(["--home", str(home), "id"]).command == "id"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("lisen = '1.2.3.4:5'\n", "unknown setting 'lisen'"),
        ("no-lan = 1\n", "no-lan must be true or false"),
        ("max-upload-rate = true\n", "max-upload-rate must be an integer"),
        ("max-upload-rate = '5'\n", "max-upload-rate must be an integer"),
        ("listen = \n", "config.toml"),
        ("test-case-insensitive = true\n", "unknown setting"),  # hidden test flags stay out
    ],
)
def test_config_file_mistakes_are_named(tmp_path: Path, text: str, complaint: str) -> None:
    write_config(tmp_path, text)
    with pytest.raises(LocalProtocolError, match=complaint):
        parse_args(["--home", str(tmp_path), "daemon"])


def test_a_bad_config_file_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    write_config(tmp_path, "lisen = '1.2.3.4:5'\n")
    done = subprocess.run(
        [sys.executable, "-m", "p2pfs", "--home", str(tmp_path), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"p2pfs: error: {tmp_path / CONFIG_NAME}: unknown setting")


def test_json_errors_are_json_objects_on_stdout(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfs", "--home", str(tmp_path), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "no-daemon" and error["exit"] == 3
    assert "no p2pfs daemon is running" in error["message"]
    assert "no p2pfs daemon is running" in done.stderr


def test_plural_forms() -> None:
    assert plural(0, "file") == "0 files"
    assert plural(1, "file") == "1 file"
    assert plural(2, "byte") == "2 bytes"
    assert plural(1, "directory", "directories") == "1 directory"
    assert plural(3, "directory", "directories") == "3 directories"


def test_systemd_unit_runs_the_daemon_with_flags_we_have() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(__file__).resolve().parent.parent / "contrib" / "p2pfs.service")
    assert unit["Install"]["WantedBy"] == "default.target"  # a user unit
    command = shlex.split(unit["Service"]["ExecStart"])
    assert command[0].endswith("/p2pfs") and command[1] == "daemon"
    assert parse_args(command[1:]).command == "daemon"
    assert int(unit["Service"]["TimeoutStopSec"]) > 5  # the node stops within ~5 s
