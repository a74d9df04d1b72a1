"""One worker thread at a time for a fetch's writes: batches queued while a thread call runs
go together into the next call.

Why: a fetch of small files wrote each answered request (up to 64 files) in its own thread
call, up to one per request stream at once. Each such thread gives the GIL up at every
system call (~8 a file) and waits to get it back from the event loop and the other writers;
the hand-overs, not the writes, took the time (issue 13's small-files profile). One writer
thread competes with the event loop alone, and one call per merged batch saves the hops.
"""

from __future__ import annotations

import threading
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
    never returns (not even cancelled) while its batch is being run.

    The thread goes on to the batches queued meanwhile without coming back to the event
    loop: between one call and the next, a return to the loop and a new thread call cost
    ~6 ms each on a busy loop (10,000 small files: 84 calls, 0.48 s of the writer idle in
    a 1.76 s transfer while the request streams waited on it). Answers go to the loop as
    each call ends."""

    def __init__(self, function: BatchFunction[B]) -> None:
        self._function = function
        self._lock = threading.Lock()
        # Under _lock: the jobs no call has taken, and whether a thread is running that
        # will take them (then a new batch needs no wake-up).
        self._queued: list[_Job[B]] = []
        self._draining = False
        self._wake = trio.Event()

    async def serve(self) -> None:
        token = trio.lowlevel.current_trio_token()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            with self._lock:
                if not self._queued:
                    continue  # every batch queued since was withdrawn (its caller cancelled)
                self._draining = True
            # Not cancellable once started (trio waits for the thread), so every job taken
            # is answered.
            await in_thread(self._drain, token)

    def _drain(self, token: trio.lowlevel.TrioToken) -> None:
        """In the worker thread: call ``function`` until nothing is queued."""
        while True:
            with self._lock:
                jobs, self._queued = self._queued, []
                if not jobs:
                    self._draining = False
                    return
            try:
                errors = self._function([job.batch for job in jobs])
            except Exception as exc:
                # A bug in the function ends serve; its callers are answered first (one
                # cancelled meanwhile waits for exactly this).
                with self._lock:
                    self._draining = False
                token.run_sync_soon(_fail, jobs, exc)
                raise
            token.run_sync_soon(_answer, jobs, errors)

    async def call(self, batch: B) -> None:
        """Queue ``batch`` and wait for its call. Cancelled, a batch no call has taken yet
        is withdrawn (never run); one being run is waited for first (the thread cannot be
        stopped, and the caller may close what it writes to once this returns)."""
        job = _Job(batch)
        with self._lock:
            self._queued.append(job)
            taken_by_the_running_call = self._draining
        if not taken_by_the_running_call:
            self._wake.set()
        try:
            await job.done.wait()
        except trio.Cancelled:
            with self._lock:
                withdrawn = job in self._queued
                if withdrawn:
                    self._queued.remove(job)
            if not withdrawn:
                with trio.CancelScope(shield=True):
                    # Taken by a call under way: its answer sets this.
                    await job.done.wait()
            raise
        if job.error is not None:
            raise job.error


def _answer(jobs: list[_Job[B]], errors: list[Exception | None]) -> None:
    """In the event loop: each job's own outcome."""
    for job, error in zip(jobs, errors, strict=True):
        job.error = error
        job.done.set()


def _fail(jobs: list[_Job[B]], exc: Exception) -> None:
    for job in jobs:
        job.error = RuntimeError(f"the merged call failed: {exc!r}")
        job.done.set()
