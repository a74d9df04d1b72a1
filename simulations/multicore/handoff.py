"""What handing bulk data between two processes costs: CPU seconds per GiB of each side.

    python simulations/multicore/handoff.py [--gib 1] [--json]

Two ways a worker process could pass received payload to another process (the main daemon),
each moving ``--gib`` GiB in 1 MiB blocks between two forked processes:

- ``pipe``: ``os.write`` of each block into a pipe (1 MiB pipe buffer), ``os.readv`` into a
  preallocated buffer on the other side (two copies through the kernel);
- ``shm``: a ring of 8 x 1 MiB slots in ``multiprocessing.shared_memory``; the writer copies a
  block into a free slot and sends its number over a pipe, the reader copies it out and sends
  the number back (one copy a side, two tiny pipe messages per block).

Each side reports its own ``getrusage`` CPU time. The multi-core model (model.py) reads the
figures from ``handoff.json`` next to this file (written with ``--save``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import resource
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
SLOTS = 8
HERE = Path(__file__).resolve().parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, MiB)
    return read_end, write_end


def _pipe_writer(read_end: int, write_end: int, blocks: int, out: Any) -> None:
    os.close(read_end)  # so the reader sees EOF once this side closes its end
    block = os.urandom(MiB)
    cpu0, started = _cpu(), time.perf_counter()
    for _ in range(blocks):
        view = memoryview(block)
        while view:
            view = view[os.write(write_end, view) :]
    os.close(write_end)
    out.put(("writer", _cpu() - cpu0, time.perf_counter() - started))


def _pipe_reader(read_end: int, write_end: int, blocks: int, out: Any) -> None:
    os.close(write_end)
    buffer = bytearray(MiB)
    cpu0, started = _cpu(), time.perf_counter()
    total = 0
    while n := os.readv(read_end, [buffer]):
        total += n
    assert total == blocks * MiB
    out.put(("reader", _cpu() - cpu0, time.perf_counter() - started))


def _shm_writer(name: str, to_reader: int, from_reader: int, blocks: int, out: Any) -> None:
    memory = shared_memory.SharedMemory(name=name)
    block = os.urandom(MiB)
    free = list(range(SLOTS))
    cpu0, started = _cpu(), time.perf_counter()
    for _ in range(blocks):
        if not free:
            free += list(os.read(from_reader, SLOTS))
        slot = free.pop()
        memory.buf[slot * MiB : (slot + 1) * MiB] = block
        os.write(to_reader, bytes([slot]))
    os.write(to_reader, b"\xff")
    out.put(("writer", _cpu() - cpu0, time.perf_counter() - started))
    memory.close()


def _shm_reader(name: str, from_writer: int, to_writer: int, blocks: int, out: Any) -> None:
    memory = shared_memory.SharedMemory(name=name)
    buffer = bytearray(MiB)
    cpu0, started = _cpu(), time.perf_counter()
    received = 0
    done = False
    while not done:
        for slot in os.read(from_writer, SLOTS + 1):
            if slot == 0xFF:
                done = True
                break
            buffer[:] = memory.buf[slot * MiB : (slot + 1) * MiB]
            received += 1
            os.write(to_writer, bytes([slot]))
    assert received == blocks
    out.put(("reader", _cpu() - cpu0, time.perf_counter() - started))
    memory.close()


def measure(kind: str, gib: float) -> dict[str, float]:
    blocks = int(gib * GiB) // MiB
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    memory = None
    if kind == "pipe":
        read_end, write_end = _pipe()
        writer = context.Process(target=_pipe_writer, args=(read_end, write_end, blocks, out))
        reader = context.Process(target=_pipe_reader, args=(read_end, write_end, blocks, out))
        closing = [read_end, write_end]
    else:
        memory = shared_memory.SharedMemory(create=True, size=SLOTS * MiB)
        forward, backward = _pipe(), _pipe()
        writer = context.Process(
            target=_shm_writer, args=(memory.name, forward[1], backward[0], blocks, out)
        )
        reader = context.Process(
            target=_shm_reader, args=(memory.name, forward[0], backward[1], blocks, out)
        )
        closing = [*forward, *backward]
    reader.start()
    writer.start()
    for fd in closing:  # the children hold their own copies; EOF needs ours closed
        os.close(fd)
    results = {role: (cpu, seconds) for role, cpu, seconds in (out.get() for _ in range(2))}
    writer.join()
    reader.join()
    if memory is not None:
        memory.close()
        memory.unlink()
    moved = blocks * MiB / GiB
    return {
        "kind": kind,
        "gib": moved,
        "gb_per_s": blocks * MiB / results["reader"][1] / 1e9,
        "writer_cpu_s_per_gib": results["writer"][0] / moved,
        "reader_cpu_s_per_gib": results["reader"][0] / moved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save", action="store_true", help="write handoff.json for model.py")
    args = parser.parse_args()
    rows = [measure(kind, args.gib) for kind in ("pipe", "shm")]
    if args.save:
        (HERE / "handoff.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'hand-off':<8}{'GiB':>5}{'GB/s':>7}{'writer CPU s/GiB':>18}{'reader CPU s/GiB':>18}")
    for row in rows:
        print(
            f"{row['kind']:<8}{row['gib']:>5.1f}{row['gb_per_s']:>7.2f}"
            f"{row['writer_cpu_s_per_gib']:>18.3f}{row['reader_cpu_s_per_gib']:>18.3f}"
        )


if __name__ == "__main__":
    main()
