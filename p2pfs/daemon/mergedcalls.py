"""One worker thread at a time for a fetch's writes: batches queued while a thread call runs
go together into the next call.

Why: a fetch of small files wrote each answered request (up to 64 files) in its own thread
call, up to one per request stream at once. Each such thread gives the GIL up at every
system call (~8 a file) and waits to get it back from the event loop and the other writers;
the hand-overs, not the writes, took the time (issue 13's small-files profile). One writer
thread competes with the event loop alone, and one call per merged batch saves the hops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from .storage import in_thread

B = TypeVar("B")

BatchFunction = Callable[[list[B]], list[Exception | None]]
"""Runs in a worker thread: per batch, None (done) or the error that batch raised."""


@dataclass(slots=True)
class _Job(Generic[B]):
    batch: B
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class MergedCalls(Generic[B]):
    """Run ``function`` on batches in a worker thread, one call at a time, each call taking
    every batch queued until then. ``serve`` runs the calls (in the caller's nursery);
    ``call`` queues a batch and returns once it was handled, raising its own error, and
    never returns (not even cancelled) while its batch is being run."""

    def __init__(self, function: BatchFunction[B]) -> None:
        self._function = function
        self._queued: list[_Job[B]] = []
        self._wake = trio.Event()

    async def serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            jobs, self._queued = self._queued, []
            if not jobs:
                continue  # every batch queued since was withdrawn (its caller cancelled)
            # Not cancellable once started (trio waits for the thread), so every job taken
            # here is answered.
            try:
                errors = await in_thread(self._function, [job.batch for job in jobs])
            except Exception as exc:
                # A bug in the function ends serve; its callers are answered first (one
                # cancelled meanwhile waits for exactly this).
                for job in jobs:
                    job.error = RuntimeError(f"the merged call failed: {exc!r}")
                    job.done.set()
                raise
            for job, error in zip(jobs, errors, strict=True):
                job.error = error
                job.done.set()

    async def call(self, batch: B) -> None:
        """Queue ``batch`` and wait for its call. Cancelled, a batch no call has taken yet
        is withdrawn (never run); one being run is waited for first (the thread cannot be
        stopped, and the caller may close what it writes to once this returns)."""
        job = _Job(batch)
        self._queued.append(job)
        self._wake.set()
        try:
            await job.done.wait()
        except trio.Cancelled:
            if job in self._queued:
                self._queued.remove(job)
            else:
                with trio.CancelScope(shield=True):
                    # Taken by a call under way: its thread sets this when it returns.
                    await job.done.wait()
            raise
        if job.error is not None:
            raise job.error
