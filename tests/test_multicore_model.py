"""The multi-core model of ``simulations/multicore`` on the costs stored beside it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

SCRIPT = Path(__file__).resolve().parent.parent / "simulations" / "multicore" / "model.py"


@pytest.fixture(scope="module")
def model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("p2pfs_multicore_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_one_core_gains_nothing_and_one_connection_gets_one_core(model: ModuleType) -> None:
    costs = model.Costs.load()
    single = model.Design("single process", 1.0)
    workers = model.Design("workers write", 0.1)
    # On one core, splitting the work over processes cannot beat doing it all in one.
    assert workers.fetch_rate(costs, 1, 1, 1) == pytest.approx(single.fetch_rate(costs, 1, 1, 1))
    # One peer over one connection: at most what moving control out of its core frees.
    one = workers.fetch_rate(costs, 32, 1, 1)
    assert one <= 1 / (0.9 * min(costs.sender, costs.receiver)) + 1e-9
    # Stripes (or peers) are what lets a transfer use more cores.
    assert workers.fetch_rate(costs, 32, 1, 4) > 3 * one
    assert workers.fetch_rate(costs, 8, 16, 1) > 6 * single.fetch_rate(costs, 8, 16, 1)


@given(
    cores=st.integers(1, 63),
    peers=st.integers(1, 63),
    stripes=st.integers(1, 8),
    share=st.floats(0.01, 0.5),
    via_main=st.booleans(),
)
def test_more_cores_or_peers_never_slow_a_node(
    model: ModuleType, cores: int, peers: int, stripes: int, share: float, via_main: bool
) -> None:
    costs = model.Costs.load()
    design = model.Design("workers write", share, payload_via_main=via_main)
    rate = design.fetch_rate(costs, cores, peers, stripes)
    assert design.fetch_rate(costs, cores + 1, peers, stripes) >= rate - 1e-12
    assert design.fetch_rate(costs, cores, peers + 1, stripes) >= rate - 1e-12
    # Never more work than the cores have: each GiB costs the receiver at least today's total.
    assert rate * costs.receiver <= cores + 1e-9
