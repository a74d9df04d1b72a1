"""Benchmarks: each prints a table comparing p2pfs with a reference measured in the same run.

Run from a checkout (they are not in the wheel): ``python -m benchmarks SUITE``. The daemon
harness they share with the tests is ``tests/support``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: ``benchmarks`` and ``tests.support`` import from here."""


def child_env() -> dict[str, str]:
    """The environment of a benchmark's own child processes (``python -m benchmarks.X``):
    the checkout on the import path, whatever directory the benchmark was started from."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
