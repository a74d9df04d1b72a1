"""MergedCalls (daemon/mergedcalls.py): batches queued while a thread call runs go together
into the next call, one call at a time, and each caller gets its own batch's error."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from p2pfs.daemon.mergedcalls import MergedCalls
from p2pfs.errors import IntegrityError, StorageError


class Recorder:
    """The blocking side: records each call's batches; the first call waits for ``go`` so
    that batches queue behind it; a batch named "bad" or "full" fails alone."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.started = threading.Event()
        self.go = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, batches: list[str]) -> list[Exception | None]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.started.set()
        if not self.calls:
            self.go.wait(10)
        self.calls.append(list(batches))
        errors: list[Exception | None] = []
        for batch in batches:
            if batch == "bad":
                errors.append(IntegrityError("bad chunk"))
            elif batch == "full":
                errors.append(StorageError("disk full"))
            else:
                errors.append(None)
        with self._lock:
            self.running -= 1
        return errors


def test_batches_queued_during_a_call_go_together_into_the_next_one() -> None:
    recorder = Recorder()
    outcomes: dict[str, str] = {}

    async def main() -> None:
        calls = MergedCalls(recorder)

        async def submit(batch: str) -> None:
            try:
                await calls.call(batch)
            except (IntegrityError, StorageError) as exc:
                outcomes[batch] = type(exc).__name__
            else:
                outcomes[batch] = "done"

        async with trio.open_nursery() as serving:
            serving.start_soon(calls.serve)
            async with trio.open_nursery() as callers:
                callers.start_soon(submit, "first")
                await trio.to_thread.run_sync(recorder.started.wait, 10)
                for batch in ("a", "bad", "b", "full"):
                    callers.start_soon(submit, batch)
                await trio.testing.wait_all_tasks_blocked()
                recorder.go.set()
            serving.cancel_scope.cancel()

    trio.run(main)
    assert [sorted(call) for call in recorder.calls] == [["first"], ["a", "b", "bad", "full"]]
    assert recorder.most_running == 1
    # Each caller sees its own batch's outcome only.
    assert outcomes == {
        "first": "done",
        "a": "done",
        "bad": "IntegrityError",
        "b": "done",
        "full": "StorageError",
    }


def test_an_unexpected_error_in_the_thread_ends_serve() -> None:
    def broken(batches: list[str]) -> list[Exception | None]:
        raise ValueError("a bug")

    async def main() -> None:
        calls = MergedCalls(broken)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.serve)
            nursery.start_soon(calls.call, "x")

    with pytest.raises(BaseExceptionGroup) as raised:
        trio.run(main)
    assert raised.group_contains(ValueError)


def test_a_cancelled_caller_withdraws_a_queued_batch_and_waits_out_a_running_one() -> None:
    """Cancelled while its batch waits, the batch never runs; cancelled while its batch is
    being run, the caller returns (Cancelled) only after the thread is done with it, so it
    may close what the batch writes to."""
    recorder = Recorder()
    finished: dict[str, bool] = {}

    async def main() -> None:
        calls = MergedCalls(recorder)

        async def submit(batch: str, scope: trio.CancelScope) -> None:
            with scope:
                await calls.call(batch)
            finished[batch] = recorder.calls != [] or recorder.go.is_set()

        async with trio.open_nursery() as serving:
            serving.start_soon(calls.serve)
            running, waiting = trio.CancelScope(), trio.CancelScope()
            async with trio.open_nursery() as callers:
                callers.start_soon(submit, "running", running)
                await trio.to_thread.run_sync(recorder.started.wait, 10)
                callers.start_soon(submit, "waiting", waiting)
                await trio.testing.wait_all_tasks_blocked()
                waiting.cancel()
                running.cancel()
                await trio.testing.wait_all_tasks_blocked()
                # The queued batch is gone at once; the running one's caller still waits.
                assert "waiting" in finished and "running" not in finished
                recorder.go.set()
            serving.cancel_scope.cancel()

    trio.run(main)
    assert recorder.calls == [["running"]]  # "waiting" was withdrawn, never run
    assert finished == {"waiting": False, "running": True}
