"""Shared fixtures of the hostile suite: a fuzz seed that every failure message names."""

from __future__ import annotations

import os
import random

import pytest


@pytest.fixture
def fuzz_seed() -> int:
    """``P2PFS_FUZZ_SEED`` to replay a failure; otherwise a fresh seed each run."""
    value = os.environ.get("P2PFS_FUZZ_SEED")
    return int(value) if value else random.randrange(1 << 32)
