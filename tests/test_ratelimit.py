from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.daemon.ratelimit import TokenBucket


def test_burst_then_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=500)
    assert bucket.delay_for(500, now=0.0) == 0.0
    assert bucket.delay_for(100, now=0.0) == 0.1
    # Half a second later 500 tokens came back; the 100 owed leave 400.
    assert bucket.delay_for(400, now=0.5) == 0.0


@given(st.lists(st.tuples(st.integers(1, 100_000), st.floats(0, 0.5)), min_size=1, max_size=50))
def test_long_run_rate_never_exceeds_the_limit(steps: list[tuple[int, float]]) -> None:
    rate = 50_000.0
    bucket = TokenBucket(rate=rate, burst=10_000)
    now = 0.0
    moved = 0
    for amount, gap in steps:
        now += gap
        now += bucket.delay_for(amount, now)  # the caller waits as told
        moved += amount
    assert moved <= 10_000 + rate * now + 1e-6
