"""The ``p2pfs`` command line: argument parsing and output formatting, nothing else.

Exit codes: 0 success, 1 done but some paths were skipped, 2 usage or fatal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from p2pfs import __version__
from p2pfs.errors import P2pfsError
from p2pfs.home import resolve_home
from p2pfs.store.index import CHUNK_RECORD, INDEX_FILENAME, IndexStore
from p2pfs.store.scanner import ScanResult, scan_share

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_FATAL = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_FATAL, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pfs", description="Peer-to-peer file sync.")
    parser.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="node state directory (default: $P2PFS_HOME, else the user data dir)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    manifest = commands.add_parser(
        "manifest", help="index a file or folder and print its share root and counts"
    )
    manifest.add_argument("path", metavar="PATH")
    manifest.add_argument(
        "--json", action="store_true", help="print one JSON object with per-file chunk lists"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_FATAL
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _manifest(args.home, args.path, args.json)
    except BrokenPipeError:
        # The reader stopped early (`| head`): not our failure. Point stdout at /dev/null so
        # the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (P2pfsError, OSError) as exc:
        print(f"p2pfs: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("p2pfs: interrupted", file=sys.stderr)
        return EXIT_FATAL


def _manifest(home_arg: str | None, path: str, as_json: bool) -> int:
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
