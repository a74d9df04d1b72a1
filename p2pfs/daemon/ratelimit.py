"""A token bucket: how long to wait before moving ``n`` more bytes at ``rate`` bytes/s.

Time is a parameter (trio.current_time() in the daemon), so tests drive it directly.
"""

from __future__ import annotations

import trio

from p2pfs.errors import LocalProtocolError


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise LocalProtocolError("a rate limit must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, 256 * 1024)
        self._tokens = self.burst
        self._updated: float | None = None

    def delay_for(self, amount: int, now: float) -> float:
        """Take ``amount`` tokens (going into debt if need be); seconds to wait to repay."""
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take_if_available(self, amount: int, now: float) -> bool:
        """Take ``amount`` tokens only if there are that many (a policer: what it refuses
        is dropped, never delayed)."""
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True


async def throttle(bucket: TokenBucket | None, amount: int) -> None:
    """Wait until ``amount`` bytes may move (no-op without a limit)."""
    if bucket is None:
        return
    delay = bucket.delay_for(amount, trio.current_time())
    if delay > 0:
        await trio.sleep(delay)
