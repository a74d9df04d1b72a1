"""The ``p2pfs`` command line: argument parsing and output formatting, nothing else.

Every command but ``daemon`` and ``manifest`` is one call to the running daemon's control
API. Exit codes: 0 success, 1 done but some paths were skipped, 2 usage, input or local
error (a bad ticket or address included), 3 no daemon is running for this home, 4 the peer
or network failed (unreachable, refused, bad data), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from p2pfs import __version__
from p2pfs.address import parse_address
from p2pfs.config import Option, load_config
from p2pfs.daemon.control_client import SOCKET_NAME, DaemonError, DaemonNotRunning, call
from p2pfs.errors import LocalProtocolError, P2pfsError, explaining_error
from p2pfs.home import resolve_home
from p2pfs.swarm.stripes import DEFAULT_MAX_STRIPES, STRIPE_MIN_RTT
from p2pfs.wire.ticket import parse_ticket_untrusted

DEFAULT_LISTEN = "[::]:7337"
"""A fixed default port, so tickets made before a restart still name the right address."""
DEFAULT_GUI = "127.0.0.1:8384"
"""Loopback only: the API key guards it from other local users, not from the network."""
EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_FATAL = 2
EXIT_NO_DAEMON = 3
EXIT_REMOTE = 4
EXIT_INTERRUPTED = 130
STOP_WAIT = 15.0
SYNC_VERBS = ("list", "show", "pause", "resume", "revert", "remove")
"""`sync VERB DIR`; any other first word is a directory to sync."""


if TYPE_CHECKING:
    from p2pfs.daemon.node import NodeConfig
    from p2pfs.store.index import IndexStore
    from p2pfs.store.scanner import ScanResult


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_FATAL, f"{self.prog}: error: {message}\n")


def _add_ticket_commands(commands: Any) -> None:
    """share, and the commands that take a ticket to look at (ls, find, connect)."""
    share = commands.add_parser("share", help="share a file or folder; prints a ticket")
    share.add_argument("path", metavar="PATH")
    share.add_argument(
        "--no-hints", action="store_true", help="ticket names only content, not this node"
    )
    share.add_argument("--json", action="store_true", help="print one JSON object")
    unshare = commands.add_parser(
        "unshare", help="stop sharing (by the shared path or 8+ digits of the share's root)"
    )
    unshare.add_argument("target", metavar="ROOT | PATH")
    unshare.add_argument("--json", action="store_true", help="print one JSON object")
    ls = commands.add_parser("ls", help="list what a ticket's share holds")
    ls.add_argument("ticket", metavar="TICKET")
    ls.add_argument("--peer", metavar="HOST:PORT", action="append", default=[])
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    find = commands.add_parser("find", help="who holds a ticket's share (discovery only)")
    find.add_argument("ticket", metavar="TICKET")
    find.add_argument("--json", action="store_true", help="print one JSON object")
    connect = commands.add_parser(
        "connect",
        help="connect to a ticket's node now and say how (direct, punched or relayed) and how fast",
    )
    connect.add_argument("ticket", metavar="TICKET")
    connect.add_argument("--json", action="store_true", help="print one JSON object")


def _parser(daemon_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line; ``daemon_defaults`` (from the home's config.toml) replace the
    daemon flags' defaults, so flags given still win."""
    parser = _Parser(prog="p2pfs", description="Peer-to-peer file sync.")
    parser.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="node state directory (default: $P2PFS_HOME, else the user data dir)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    manifest = commands.add_parser(
        "manifest", help="index a file or folder offline and print its share root and counts"
    )
    manifest.add_argument("path", metavar="PATH")
    manifest.add_argument(
        "--json", action="store_true", help="print one JSON object with per-file chunk lists"
    )
    daemon = commands.add_parser(
        "daemon",
        help="run this home's node in the foreground",
        description="Run this home's node in the foreground. Every option below can also be "
        "set in HOME/config.toml under its long name without the dashes (`no-lan = true`, "
        '`peer = ["HOST:PORT"]`); options given here win.',
    )
    _daemon_arguments(daemon)
    if daemon_defaults:
        daemon.set_defaults(**daemon_defaults)
    for name, help_text in (
        ("id", "this node's id and addresses"),
        ("status", "peers, shares, transfers, counters"),
        ("stop", "stop this home's daemon (as Ctrl-C in its terminal would)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ticket_commands(commands)
    sync = commands.add_parser(
        "sync",
        help="sync a folder: `sync DIR` starts one, `sync DIR TICKET` joins one, "
        "`sync list`, `sync show DIR` (its tickets again), `sync pause|resume DIR`, "
        "`sync revert DIR` (a read-only member's local edits), `sync remove DIR`",
    )
    sync.add_argument("target", metavar="DIR | list | show | pause | resume | revert | remove")
    sync.add_argument("argument", metavar="TICKET | DIR", nargs="?")
    sync.add_argument("--json", action="store_true", help="print one JSON object")
    conflicts = commands.add_parser("conflicts", help="conflict copies in sync folders")
    conflicts.add_argument("--json", action="store_true", help="print one JSON object")
    fetch = commands.add_parser("fetch", help="fetch a ticket's share into DEST")
    fetch.add_argument("ticket", metavar="TICKET")
    fetch.add_argument("dest", metavar="DEST")
    fetch.add_argument("--peer", metavar="HOST:PORT", action="append", default=[])
    fetch.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files at DEST that differ from the share (old ones kept in "
        "DEST/.p2pfs/versions/); without it such a fetch stops before writing",
    )
    fetch.add_argument(
        "--give-up-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="end (resumable) when no holder has served anything for this long (default 60)",
    )
    fetch.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as ``main`` reads it (test entry points that run a daemon of their
    own, such as tests/support/hooked_daemon.py, take the same arguments), with the home's
    config.toml under a ``daemon`` command's flags."""
    args = _parser().parse_args(argv)
    return _with_config(argv, args) if args.command == "daemon" else args


def _with_config(argv: Sequence[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    settings = load_config(resolve_home(args.home), _daemon_options())
    return _parser(settings).parse_args(argv) if settings else args


def _daemon_options() -> dict[str, Option]:
    """Every documented ``daemon`` flag, by its long name without dashes."""
    probe = argparse.ArgumentParser()
    _daemon_arguments(probe)
    options = {}
    for action in probe._actions:  # argparse's only list of them
        names = [name for name in action.option_strings if name.startswith("--")]
        if not names or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        if isinstance(action, argparse._StoreTrueAction):
            kind: type = bool
        else:
            kind = action.type if isinstance(action.type, type) else str
        repeated = isinstance(action, argparse._AppendAction)
        options[names[0][2:]] = Option(action.dest, kind, repeated)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "daemon":
        try:
            args = _with_config(argv, args)
        except LocalProtocolError as exc:
            print(f"p2pfs: error: {exc}", file=sys.stderr)
            return EXIT_FATAL
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_FATAL
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "manifest":
            return _manifest(args.home, args.path, args.json)
        if args.command == "daemon":
            return _daemon(args)
        return _call_daemon(args)
    except BrokenPipeError:
        # The reader stopped early (`| head`): not our failure. Point stdout at /dev/null so
        # the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except DaemonNotRunning as exc:
        return _failed(args, "no-daemon", exc, EXIT_NO_DAEMON)
    except DaemonError as exc:
        return _failed(args, exc.kind, exc, EXIT_REMOTE if exc.kind == "remote" else EXIT_FATAL)
    except (P2pfsError, OSError) as exc:
        return _failed(args, "local", exc, EXIT_FATAL)
    except KeyboardInterrupt:
        # Closing the control socket (on the way out) cancels the request in the daemon.
        what = "; partial data is kept: run it again to resume" if args.command == "fetch" else ""
        print(f"p2pfs: interrupted{what}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _daemon_arguments(daemon: argparse.ArgumentParser) -> None:
    daemon.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"UDP address (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    daemon.add_argument(
        "--peer", metavar="HOST:PORT", action="append", default=[], help="a peer to try"
    )
    daemon.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="a node of the private DHT to join, at its main address (e.g. HOST:7337; "
        "a host name is resolved each time the node joins; none: this node starts its own)",
    )
    daemon.add_argument(
        "--dht-port",
        type=int,
        metavar="PORT",
        help="give the private DHT a UDP socket of its own on PORT (0: any) instead of "
        "sharing the node's one port with QUIC",
    )
    daemon.add_argument(
        "--mainline", action="store_true", help="also use the public BitTorrent Mainline DHT"
    )
    daemon.add_argument("--mainline-port", type=int, default=0, help=argparse.SUPPRESS)
    daemon.add_argument("--no-lan", action="store_true", help="no LAN discovery beacons")
    daemon.add_argument(
        "--no-port-mapping",
        action="store_true",
        help="do not ask the gateway (UPnP, NAT-PMP/PCP) to map this node's UDP port, nor "
        "its IPv6 firewall for a pinhole",
    )
    _relay_arguments(daemon)
    daemon.add_argument(
        "--gui",
        metavar="HOST:PORT",
        default=DEFAULT_GUI,
        help=f"serve the HTTP API and web UI here (default {DEFAULT_GUI}; a taken port falls "
        "back to a free one: `p2pfs id` tells the URL)",
    )
    daemon.add_argument("--no-gui", action="store_true", help="no HTTP API or web UI")
    daemon.add_argument(
        "--keep-versions-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="how long sync folders keep replaced and deleted files in .p2pfs/versions/",
    )
    for direction in ("upload", "download"):
        daemon.add_argument(
            f"--max-{direction}-rate",
            metavar="BYTES_PER_S",
            type=int,
            help=f"cap this node's {direction} of chunk data (fetches, shares and sync folders)",
        )
    daemon.add_argument(
        "--data-workers",
        type=int,
        default=0,
        metavar="N",
        help="fetch from up to N peers at once in worker processes, each with its own QUIC "
        "connection (default 0: all in the daemon's process; see SPEC 'Data plane workers')",
    )
    daemon.add_argument(
        "--stripes",
        type=int,
        default=DEFAULT_MAX_STRIPES,
        metavar="N",
        help="fetch from one peer (or sync with one member) over up to N QUIC connections "
        "where its path is long "
        f"(round trip >= {STRIPE_MIN_RTT * 1000:.0f} ms; default {DEFAULT_MAX_STRIPES}; "
        "1: one connection; see SPEC 'Stripes')",
    )
    daemon.add_argument(
        "--no-link-datagrams",
        action="store_true",
        help="send QUIC datagrams of the base 1,350 bytes to every peer, even on loopback "
        "and on-link networks (default: as big as the link carries; see SPEC 'Identity and "
        "transport')",
    )


def _failed(args: argparse.Namespace, kind: str, exc: Exception, code: int) -> int:
    """One line on stderr; with ``--json`` also one JSON object on stdout, so a script
    reading stdout gets an object either way."""
    print(f"p2pfs: error: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"kind": kind, "message": str(exc), "exit": code}}))
    return code


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 file``, ``2 files``, ``0 files``."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def _relay_arguments(daemon: argparse.ArgumentParser) -> None:
    daemon.add_argument(
        "--relay",
        action="store_true",
        help="relay for nodes behind NATs (run this on a publicly reachable machine)",
    )
    daemon.add_argument(
        "--relay-via",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="stay reachable through this relay (repeatable); tickets then name it",
    )
    daemon.add_argument(
        "--relay-client-rate",
        type=int,
        metavar="BYTES_PER_S",
        help="with --relay: bytes/s one client's circuits may carry (default 8 MiB/s)",
    )
    daemon.add_argument(
        "--relay-client-budget",
        type=int,
        metavar="BYTES",
        help="with --relay: bytes one client may move through this relay (default 4 GiB)",
    )
    daemon.add_argument("--lan-port", type=int, help=argparse.SUPPRESS)
    daemon.add_argument("--profile-to", metavar="FILE", help=argparse.SUPPRESS)
    # Seconds between a sync folder's full rescans (the watcher's safety net; default 60):
    # a benchmark shortens it so edits meet a rescan.
    daemon.add_argument("--rescan-interval", type=float, help=argparse.SUPPRESS)


def daemon_config(args: argparse.Namespace) -> NodeConfig:
    """The node configuration of a parsed ``daemon`` command line."""
    from p2pfs.daemon.discovery import DiscoveryConfig  # noqa: PLC0415
    from p2pfs.daemon.folders.manager import FolderConfig  # noqa: PLC0415
    from p2pfs.daemon.node import NodeConfig  # noqa: PLC0415
    from p2pfs.daemon.relay import RelayLimits  # noqa: PLC0415
    from p2pfs.discovery.lan import LAN_PORT  # noqa: PLC0415

    listen = parse_address(args.listen)
    limits = RelayLimits()
    if args.relay_client_rate:
        limits = dataclasses.replace(limits, rate=args.relay_client_rate)
    if args.relay_client_budget:
        limits = dataclasses.replace(limits, budget=args.relay_client_budget)
    folders = FolderConfig(
        keep_versions_s=args.keep_versions_days * 86400, max_stripes=max(1, args.stripes)
    )
    if args.rescan_interval is not None:
        folders = dataclasses.replace(
            folders, rescan_interval=args.rescan_interval, rescan_interval_fixed=True
        )
    return NodeConfig(
        relay=limits if args.relay else None,
        relay_via=tuple(parse_address(r, allow_names=True) for r in args.relay_via),
        home=resolve_home(args.home),
        listen=listen,
        peers=tuple(parse_address(peer, allow_names=True) for peer in args.peer),
        max_upload_rate=args.max_upload_rate,
        max_download_rate=args.max_download_rate,
        data_workers=max(0, args.data_workers),
        max_stripes=max(1, args.stripes),
        link_datagrams=not args.no_link_datagrams,
        port_mapping=not args.no_port_mapping,
        gui=None if args.no_gui else parse_address(args.gui),
        folders=folders,
        discovery=DiscoveryConfig(
            dht_host=listen.host,
            dht_port=args.dht_port,
            # Names stay names: the DHT resolves them each time it joins (a daemon started
            # before its network, or a name that moved, still gets there).
            bootstrap=tuple(parse_address(n, allow_names=True) for n in args.bootstrap),
            mainline=args.mainline,
            mainline_port=args.mainline_port,
            lan=not args.no_lan,
            lan_port=LAN_PORT if args.lan_port is None else args.lan_port,
        ),
    )


def _daemon(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415 -- only the daemon pays for the async runtime and QUIC

    from p2pfs.daemon.node import run_node  # noqa: PLC0415

    config = daemon_config(args)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger().setLevel(level)
    # The QUIC engine logs every orderly peer close as a warning; only its errors matter here.
    logging.getLogger("quic").setLevel(logging.ERROR)
    # The DHT package warns of every unanswered call: normal on any real network.
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    try:
        if args.profile_to:  # a developer's aid: the main thread's profile, written at exit
            import cProfile  # noqa: PLC0415

            with cProfile.Profile() as profile:
                trio.run(run_node, config)
            profile.dump_stats(args.profile_to)
        else:
            trio.run(run_node, config)
    except BaseExceptionGroup as group:
        # A failure at start (a port taken, the home locked) arrives wrapped by the
        # nurseries it passed through: say it in one line, not as a traceback.
        ours = explaining_error(group)
        if ours is None:
            raise
        raise ours from None
    return EXIT_OK


def _call_daemon(args: argparse.Namespace) -> int:
    socket_path = str(resolve_home(args.home) / SOCKET_NAME)
    # Input the user typed is checked here, so a typo is a usage error (2), never taken
    # for a network failure.
    if getattr(args, "ticket", None) is not None:
        parse_ticket_untrusted(args.ticket)
    if args.command == "sync" and args.target not in SYNC_VERBS and args.argument:
        parse_ticket_untrusted(args.argument)
    for peer in getattr(args, "peer", None) or []:
        parse_address(peer, allow_names=True)
    if args.command == "stop":
        return _stop(socket_path, args.json)
    if args.command in ("id", "status"):
        result = call(socket_path, args.command)
        _print_result(result, args.json, _human_id if args.command == "id" else _human_status)
        return EXIT_OK
    if args.command == "share":
        params = {"path": os.path.abspath(args.path), "no_hints": args.no_hints}
        result = call(socket_path, "share", params)
        for problem in result["problems"]:
            print(f"p2pfs: skipped {problem['path']}: {problem['reason']}", file=sys.stderr)
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"shared {result['name']}: {plural(result['files'], 'file')}, "
                f"{plural(result['bytes'], 'byte')}"
            )
            print(result["ticket"])  # the ticket is the last line, for scripts
        return EXIT_PROBLEMS if result["problems"] else EXIT_OK
    if args.command == "unshare":
        target = os.path.abspath(args.target) if os.path.exists(args.target) else args.target
        result = call(socket_path, "unshare", {"what": target})
        _print_result(result, args.json, lambda r: print(f"stopped sharing {r['path']}"))
        return EXIT_OK
    if args.command == "find":
        result = call(socket_path, "find", {"ticket": args.ticket})
        _print_result(result, args.json, _human_find)
        return EXIT_OK if result["providers"] else EXIT_REMOTE
    if args.command == "connect":
        result = call(socket_path, "connect", {"ticket": args.ticket})
        _print_result(result, args.json, _human_connect)
        return EXIT_OK
    if args.command == "sync":
        return _sync(socket_path, args)
    if args.command == "conflicts":
        result = call(socket_path, "conflicts")
        _print_result(result, args.json, _human_conflicts)
        return EXIT_OK
    if args.command == "ls":
        result = call(socket_path, "ls", {"ticket": args.ticket, "peers": args.peer})
        _print_result(result, args.json, _human_ls)
        return EXIT_OK
    params = {
        "ticket": args.ticket,
        "dest": os.path.abspath(args.dest),
        "peers": args.peer,
        "overwrite": args.overwrite,
        "give_up_after": args.give_up_after,
    }
    with _fetch_progress(sys.stderr) as on_event:
        result = call(socket_path, "fetch", params, on_event)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"fetched {result['name']} into {result['destination']}: "
            f"{plural(result['files'], 'file')}, "
            f"{plural(result['bytes'], 'byte')} ({result['bytes_from_peer']} from the peer, "
            f"{result['bytes_local']} copied locally, {result['bytes_resumed']} resumed)"
        )
    return EXIT_OK


def _stop(socket_path: str, as_json: bool) -> int:
    """Ask the daemon to stop, then wait until its socket stops answering."""
    result = call(socket_path, "stop")
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        try:
            call(socket_path, "id")
        except DaemonNotRunning:
            break
        except (P2pfsError, OSError):
            pass  # answering no more, socket not yet gone
        time.sleep(0.1)  # waiting on another process to exit
    else:
        print(f"p2pfs: the daemon (pid {result['pid']}) is still stopping", file=sys.stderr)
        return EXIT_FATAL
    if as_json:
        print(json.dumps({"stopped": True, "pid": result["pid"]}))
    else:
        print(f"stopped the daemon (pid {result['pid']})")
    return EXIT_OK


def _sync(socket_path: str, args: argparse.Namespace) -> int:
    if args.target == "list" and args.argument is None:
        result = call(socket_path, "sync_list")
        _print_result(result, args.json, _human_folders)
        return EXIT_OK
    if args.target == "show" and args.argument is not None:
        result = call(socket_path, "sync_show", {"path": os.path.abspath(args.argument)})
        _print_result(result, args.json, _human_tickets)
        return EXIT_OK
    if args.target in ("pause", "resume") and args.argument is not None:
        result = call(socket_path, f"sync_{args.target}", {"path": os.path.abspath(args.argument)})
        done = "paused" if result["paused"] else "resumed"
        _print_result(result, args.json, lambda r: print(f"{done} {r['path']}"))
        return EXIT_OK
    if args.target == "revert" and args.argument is not None:
        result = call(socket_path, "sync_revert", {"path": os.path.abspath(args.argument)})
        _print_result(result, args.json, _human_reverted)
        return EXIT_OK
    if args.target == "remove" and args.argument is not None:
        result = call(socket_path, "sync_remove", {"path": os.path.abspath(args.argument)})
        _print_result(result, args.json, lambda r: print(f"stopped syncing {r['path']}"))
        return EXIT_OK
    params = {"path": os.path.abspath(args.target), "ticket": args.argument}
    result = call(socket_path, "sync", params)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(f"syncing {result['path']} ({result['mode']})")
    _human_tickets(result)
    return EXIT_OK


def _human_reverted(result: dict[str, Any]) -> None:
    if not result["reverted"]:
        print(f"no local changes in {result['path']}")
        return
    print(
        f"reverted {plural(len(result['reverted']), 'local change')} in {result['path']} "
        "(kept in .p2pfs/versions/)"
    )
    for path in result["pending"]:
        print(f"  not fetched yet (no member has it now): {path}")


def _human_tickets(result: dict[str, Any]) -> None:
    if "rw" in result:
        print(f"read-write ticket: {result['rw']}")
    print(f"read-only ticket:  {result['ro']}")


def _human_folders(result: dict[str, Any]) -> None:
    if not result["folders"]:
        print("no sync folders (start one with `p2pfs sync DIR`)")
    for folder in result["folders"]:
        state = folder.get("state", "idle")
        if folder.get("progress") is not None:
            state += f" {int(folder['progress'])}%"  # never "100%" while bytes are missing
        print(
            f"{folder['path']}  {folder['mode']}  {state}  {plural(folder['files'], 'file')}  "
            f"{plural(folder['peers'], 'peer')}  root {folder['root'][:12]}  "
            f"device {folder.get('device', '')}"
        )
        completion = folder.get("completion")
        if completion and completion["need_items"]:
            print(f"  this node: {_completion(completion)}")
        for member in folder.get("members", []):
            print(
                f"  member {member['node_id'][:12]}  {member['path']}  {_member_state(member)}"
                + (f"  device {member['device']}" if member.get("device") else "")
            )
        for conflict in folder.get("conflicts", []):
            print(f"  conflict copy: {conflict['path']}  (by {_conflict_maker(conflict)})")
        for path in folder["local_changes"]:
            print(f"  local change, not sent: {path}")
        for problem in folder["problems"]:
            print(f"  problem: {problem}")


def _completion(need: dict[str, Any]) -> str:
    """``45% (3 files, 1.2 MB to fetch)``, or ``100%``."""
    if not need["need_items"] and not need["need_bytes"]:
        return "100%"
    return (
        f"{int(need['percent'])}% ({plural(need['need_items'], 'file')}, "
        f"{_bytes(need['need_bytes'])} to fetch)"
    )


def _member_state(member: dict[str, Any]) -> str:
    """A member's completion as it reports it; a member too old to report one: whether
    its index equals ours."""
    completion = member.get("completion")
    if completion is None:
        return "up to date" if member["in_sync"] else "differs"
    if member["in_sync"] and not completion["need_items"]:
        return "up to date"
    return _completion(completion) + ("" if member["in_sync"] else ", index differs")


def _conflict_maker(conflict: dict[str, Any]) -> str:
    if conflict.get("own"):
        return f"this node, device {conflict['device']}"
    if conflict.get("member"):
        return f"member {conflict['member'][:12]}, device {conflict['device']}"
    return f"device {conflict.get('device') or '?'}, not a member met since start"


def _bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return plural(count, "byte")


def _human_conflicts(result: dict[str, Any]) -> None:
    if not result["conflicts"]:
        print("no conflicts")
    for conflict in result["conflicts"]:
        line = f"{conflict['dir']}/{conflict['path']}  (conflicts with {conflict['original']}"
        if conflict["kind"] == "conflict copy":
            line += f"; by {_conflict_maker(conflict)}"
        print(line + ")")


def _print_result(
    result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]
) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        human(result)


def _human_id(result: dict[str, Any]) -> None:
    print(f"node      {result['node_id']}")
    for address in result["addresses"]:
        print(f"address   {address}")
    # How peers elsewhere reach this node: what they saw, the router's mapping and IPv6
    # pinhole, the relays it is registered with (the first things to read when a machine
    # elsewhere cannot connect).
    for seen in result.get("observed", []):
        print(f"seen as   {seen['address']} (by peers in {plural(seen['reporters'], 'network')})")
    mapping = result.get("port_mapping")
    if mapping is not None:
        print(f"port map  {_port_map_text(mapping)}")
        if mapping.get("ipv6_pinhole"):
            via = f", {mapping['ipv6_pinhole_via']}" if mapping.get("ipv6_pinhole_via") else ""
            opened = f"the router's IPv6 firewall lets peers in{via}"
            print(f"pinhole   {mapping['ipv6_pinhole']} ({opened})")
        elif mapping.get("ipv6_pinhole_error"):
            print(f"pinhole   none ({mapping['ipv6_pinhole_error']})")
    for family, found in sorted((result.get("reachability") or {}).items()):
        print(f"reach     {_reach_text(family, found)}")
    for relay in result.get("relays", []):
        print(f"relay     {relay['address']} (registered, {relay['node_id'][:12]})")
    if result.get("api"):
        print(f"web UI    {result['api']['ui']}")


def _reach_text(family: str, found: dict[str, Any]) -> str:
    """Whether peers elsewhere reach us in ``family`` ("ipv4"), as their dial-backs found."""
    name = "IPv" + family.removeprefix("ipv")
    probes = found.get("probes") or []
    arrived = [p for p in probes if p["reached"]]
    if found.get("verdict") == "reachable":
        by = arrived[0]
        more = f" and {plural(len(arrived) - 1, 'more network')}" if len(arrived) > 1 else ""
        return (
            f"{name}: peers elsewhere reach us (the probe of {by['by']} in {by['place']}"
            f"{more} arrived)"
        )
    if found.get("verdict") == "unreachable":
        lost = plural(len(probes) - len(arrived), "network")
        why = (
            f"from {len(arrived)} they did"
            if arrived
            else "a firewall or NAT drops what we did not ask for"
        )
        return (
            f"{name}: peers elsewhere cannot reach us (probes from {lost} never arrived"
            f"{', ' if arrived else ': '}{why}); relays carry the way in"
        )
    return f"{name}: not checked yet (no peer beyond our own links to ask)"


def _port_map_text(mapping: dict[str, Any]) -> str:
    """The router's mapping of our UDP port, as ``id`` prints it."""
    if mapping.get("state") == "mapped":
        via = ", ".join(mapping.get("via") or [])
        external = mapping.get("external") or "an external address the router does not name"
        return f"UDP {mapping['local_port']} -> {external} (by the router, {via})"
    if mapping.get("state") == "failed":
        errors = "; ".join(f"{k}: {v}" for k, v in (mapping.get("errors") or {}).items())
        return f"none ({errors})" if errors else "none"
    return "asking the router"


def _human_status(result: dict[str, Any]) -> None:
    print(f"node      {result['node_id']}")
    print(f"peers     {len(result['peers']) or 'none'}")
    for peer in result["peers"]:
        datagrams = f"  datagrams of {peer['datagram_size']:,} B" if "datagram_size" in peer else ""
        print(
            f"  {peer['node_id'][:12]}  {peer['address']}  {peer.get('path', 'direct')}{datagrams}"
        )
    print(f"shares    {len(result['shares']) or 'none'}")
    for share in result["shares"]:
        stale = "  (stale: a chunk no longer reads back; share it again)" if share["stale"] else ""
        print(f"  {share['root'][:16]}  {share['path']}{stale}")
        if share.get("replaces"):
            earlier = ", ".join(root[:16] for root in share["replaces"])
            print(f"    its files changed: indexed again (before: {earlier}); ticket now:")
            print(f"    {share['ticket']}")
    print(f"transfers {len(result['transfers']) or 'none'}")
    for transfer in result["transfers"]:
        print(f"  {transfer['destination']}: {transfer['bytes_done']}/{transfer['bytes_total']}")
    print(f"sent      {plural(result['bytes_sent'], 'byte')}")
    print(f"received  {plural(result['bytes_received'], 'byte')}")
    transport = result["transport"]
    drops = transport.get("kernel_drops")
    dropped = "" if drops is None else f"; {plural(drops, 'datagram')} dropped by the kernel"
    print(
        f"udp       buffers {transport['receive_buffer'] // 1024} KiB in, "
        f"{transport['send_buffer'] // 1024} KiB out{dropped}"
    )
    if (
        min(transport["receive_buffer"], transport["send_buffer"])
        < transport["socket_buffer_wanted"]
    ):
        print(
            f"  below the {transport['socket_buffer_wanted'] // 1024} KiB asked: the kernel "
            "caps them (Linux: net.core.rmem_max and wmem_max); fast transfers lose datagrams"
        )


def _human_connect(result: dict[str, Any]) -> None:
    print(
        f"connected to {result['node_id']} {result['path']} at {result['address']} "
        f"in {result['connect_seconds'] * 1000:.0f} ms"
    )
    punch = result["punch"]
    if punch is not None and punch["succeeded"]:
        print(f"punched a direct path at {punch['address']} in {punch['seconds'] * 1000:.0f} ms")
    elif punch is not None:
        print("no direct path: the hole punch did not get through, staying relayed")


def _human_find(result: dict[str, Any]) -> None:
    for provider in result["providers"]:
        node = provider["node_id"] or "(no node id)"
        print(f"{provider['address']:<24} {node}  via {provider['source']}")
    if not result["providers"]:
        print("no provider found", file=sys.stderr)


def _human_ls(result: dict[str, Any]) -> None:
    if not result["entries"]:
        print("(the share is empty)")
    for entry in result["entries"]:
        if entry["kind"] == "directory":
            print(f"{'':>14}  {entry['path']}/")
        else:
            flag = "*" if entry["executable"] else ""
            print(f"{entry['size']:>14}  {entry['path']}{flag}")


@contextmanager
def _fetch_progress(stream: TextIO) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """Bytes, rate and ETA on a terminal; nothing when stderr is piped."""
    if not stream.isatty():
        yield None
        return
    # Imported here: the daemon (this module is its entry point) never draws a bar.
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("fetching from {task.fields[peers]}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream),
        transient=True,
    )
    task = bar.add_task("fetch", total=None, peers="...")

    def update(event: dict[str, Any]) -> None:
        peers = event.get("peers") or []
        live = sum(1 for peer in peers if not peer["failed"])
        bar.update(
            task,
            completed=event["bytes_done"],
            total=event["bytes_total"] or None,
            peers=f"{live} peer{'s' if live != 1 else ''}",
        )

    with bar:
        yield update


def _manifest(home_arg: str | None, path: str, as_json: bool) -> int:
    # The only command that indexes in this process: the index and scanner (50 of the
    # CLI's 130 ms of imports) load here, not for every command.
    from p2pfs.store.index import INDEX_FILENAME, IndexStore  # noqa: PLC0415
    from p2pfs.store.scanner import scan_share  # noqa: PLC0415

    home = resolve_home(home_arg)
    with IndexStore(home / INDEX_FILENAME) as index:
        with _progress(sys.stderr) as progress:
            result = scan_share(path, index, progress=progress)
        for problem in result.problems:
            print(f"p2pfs: skipped {problem}", file=sys.stderr)
        if as_json:
            _write_json(sys.stdout, result, index)
        else:
            print(f"root    {result.root.hex()}")
            print(f"name    {result.manifest.name}")
            print(f"files   {result.files}")
            print(f"bytes   {result.bytes}")
            print(f"chunks  {result.chunks}")
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def _write_json(out: TextIO, result: ScanResult, index: IndexStore) -> None:
    """One JSON object, written file by file so a big share is never one string."""
    from p2pfs.store.index import CHUNK_RECORD  # noqa: PLC0415

    head = {
        "root": result.root.hex(),
        "name": result.manifest.name,
        "files": result.files,
        "bytes": result.bytes,
        "chunks": result.chunks,
        "problems": [{"path": p.path, "reason": p.reason} for p in result.problems],
    }
    out.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "entries": [')
    for position, record in enumerate(index.share_files(result.share_id)):
        entry = {
            "path": record.path,
            "size": record.size,
            "root": record.root.hex(),
            "chunks": [
                [cid.hex(), length] for cid, length in CHUNK_RECORD.iter_unpack(record.chunks)
            ],
        }
        out.write(("," if position else "") + "\n  " + json.dumps(entry, ensure_ascii=False))
    out.write("\n]}\n")


@contextmanager
def _progress(stream: TextIO) -> Iterator[Callable[[int, int], None] | None]:
    """A bytes-and-rate bar on a terminal; nothing when stderr is piped."""
    if not stream.isatty():
        yield None
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        SpinnerColumn(),
        TextColumn("indexing {task.fields[files]} files"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=True,
    )
    task = bar.add_task("index", total=None, files=0)

    def update(done_bytes: int, done_files: int) -> None:
        bar.update(task, completed=done_bytes, files=done_files)

    with bar:
        yield update
