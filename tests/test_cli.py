"""``p2pfs manifest`` in a real subprocess: output, JSON, exit codes, the home; ``id``'s
human form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfs import cli
from p2pfs.content.chunking import Chunker


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfs", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def make_share(root: Path) -> bytes:
    big = os.urandom(300_000)
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "sub" / "big.bin").write_bytes(big)
    return big


def test_manifest_prints_root_and_counts(tmp_path: Path) -> None:
    make_share(tmp_path / "share")
    done = run("--home", str(tmp_path / "home"), "manifest", str(tmp_path / "share"))
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert len(fields["root"]) == 64 and int(fields["files"]) == 2
    assert int(fields["bytes"]) == 300_006 and int(fields["chunks"]) >= 3
    assert done.stderr == ""  # no progress bar when stderr is not a terminal
    assert (tmp_path / "home" / "index.sqlite3").exists()
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700


def test_manifest_json_has_per_file_chunks(tmp_path: Path) -> None:
    big = make_share(tmp_path / "share")
    done = run("--home", str(tmp_path / "home"), "manifest", "--json", str(tmp_path / "share"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["name"] == "share" and report["files"] == 2 and report["problems"] == []
    entries = {entry["path"]: entry for entry in report["entries"]}
    assert set(entries) == {"hello.txt", "sub/big.bin"}
    expected = [[ref.id.hex(), ref.length] for ref in Chunker().chunk_refs(big)]
    assert entries["sub/big.bin"]["chunks"] == expected
    assert report["chunks"] == len(expected) + 1
    plain = run("--home", str(tmp_path / "home"), "manifest", str(tmp_path / "share"))
    assert plain.stdout.split()[1] == report["root"]


def test_home_from_environment(tmp_path: Path) -> None:
    make_share(tmp_path / "share")
    done = run("manifest", str(tmp_path / "share"), env={"P2PFS_HOME": str(tmp_path / "envhome")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "envhome" / "index.sqlite3").exists()


def test_skipped_paths_exit_1_and_name_the_path(tmp_path: Path) -> None:
    make_share(tmp_path / "share")
    os.mkfifo(tmp_path / "share" / "pipe")
    done = run("--home", str(tmp_path / "home"), "manifest", str(tmp_path / "share"))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert str(tmp_path / "share" / "pipe") in line


def test_fatal_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    missing = run("--home", str(tmp_path / "home"), "manifest", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert str(tmp_path / "nope") in missing.stderr
    usage = run("--home", str(tmp_path / "home"), "frobnicate")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    (tmp_path / "home2").mkdir()
    (tmp_path / "home2" / "index.sqlite3").write_bytes(b"garbage" * 1000)
    corrupt = run("--home", str(tmp_path / "home2"), "manifest", str(tmp_path))
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert len(corrupt.stderr.splitlines()) == 1


def test_commands_that_call_the_daemon_load_neither_the_index_nor_the_key_libraries() -> None:
    """Every CLI command but ``daemon`` and ``manifest`` is one call to the daemon: importing
    the index, the scanner or X.509 for it cost 80 of 130 ms per command (a fetch's wall
    time includes it)."""
    probe = (
        "import sys, p2pfs.cli; "
        "print(sorted(m for m in ('p2pfs.store.index', 'p2pfs.store.scanner', "
        "'cryptography.x509', 'p2pfs.identity', 'trio') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_id_prints_how_peers_elsewhere_reach_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    """`p2pfs id` names what peers saw, the router's mapping and IPv6 pinhole, and the
    relays: what a user reads first when a machine elsewhere cannot connect."""
    mapping = {
        "protocol": "udp",
        "local_port": 7337,
        "external": "203.0.113.5:7337",
        "state": "mapped",
        "via": ["natpmp"],
        "errors": {},
        "ipv6_pinhole": "[2001:db8:1::2]:7337",
        "ipv6_pinhole_via": "pcp",
        "ipv6_pinhole_error": None,
    }
    result = {
        "node_id": "n" * 52,
        "addresses": ["203.0.113.5:7337", "[2001:db8:1::2]:7337", "192.168.1.2:7337"],
        "observed": [{"address": "203.0.113.5:7337", "reporters": 2}],
        "relays": [{"node_id": "r" * 52, "address": "198.51.100.7:7337"}],
        "port_mapping": mapping,
        "api": None,
    }
    cli._human_id(result)
    lines = capsys.readouterr().out.splitlines()
    assert "seen as   203.0.113.5:7337 (by peers in 2 networks)" in lines
    assert "port map  UDP 7337 -> 203.0.113.5:7337 (by the router, natpmp)" in lines
    assert "pinhole   [2001:db8:1::2]:7337 (the router's IPv6 firewall lets peers in, pcp)" in lines
    assert f"relay     198.51.100.7:7337 (registered, {'r' * 12})" in lines

    failed = {
        **mapping,
        "state": "failed",
        "external": None,
        "via": [],
        "errors": {"natpmp": "no answer from the gateway", "upnp": "no IGD answered"},
        "ipv6_pinhole": None,
        "ipv6_pinhole_error": "no lasting IPv6 address",
    }
    cli._human_id({**result, "observed": [], "relays": [], "port_mapping": failed})
    lines = capsys.readouterr().out.splitlines()
    assert "port map  none (natpmp: no answer from the gateway; upnp: no IGD answered)" in lines
    assert "pinhole   none (no lasting IPv6 address)" in lines
    cli._human_id({**result, "port_mapping": None})
    assert "port map" not in capsys.readouterr().out  # --no-port-mapping: nothing to say


def test_id_says_whether_peers_elsewhere_reach_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    probe = {"by": "abcdefabcdef", "place": "198.51.100.0/24", "seconds_ago": 3.0}
    result = {
        "node_id": "n" * 52,
        "addresses": [],
        "reachability": {
            "ipv4": {"verdict": "unreachable", "probes": [{**probe, "reached": False}] * 2},
            "ipv6": {"verdict": "reachable", "probes": [{**probe, "reached": True}]},
        },
    }
    cli._human_id(result)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("reach     IPv4: peers elsewhere cannot reach us (probes from 2")
    assert lines[1].endswith("relays carry the way in")
    assert lines[2] == (
        "reach     IPv6: peers elsewhere reach us"
        " (the probe of abcdefabcdef in 198.51.100.0/24 arrived)"
    )
    cli._human_id({**result, "reachability": {"ipv4": {"verdict": "unknown", "probes": []}}})
    assert "IPv4: not checked yet" in capsys.readouterr().out
    split = [{**probe, "reached": True}, {**probe, "reached": False}]
    cli._human_id({**result, "reachability": {"ipv4": {"verdict": "unreachable", "probes": split}}})
    assert (
        "reach     IPv4: peers elsewhere cannot reach us (probes from 1 network never arrived,"
        " from 1 they did); relays carry the way in"
    ) in capsys.readouterr().out.splitlines()
    cli._human_id(
        {
            **result,
            "reachability": {
                "ipv4": {"verdict": "reachable", "probes": [split[0]] * 3 + [split[1]]}
            },
        }
    )
    assert "(the probe of abcdefabcdef in 198.51.100.0/24 and 2 more networks arrived)" in (
        capsys.readouterr().out
    )
