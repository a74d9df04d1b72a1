"""The batch queue folder links share between their connections' streams."""

from __future__ import annotations

import trio

from p2pfs.daemon.folders.client import _BatchQueue


def test_batches_given_back_are_taken_again_and_takers_end_only_when_all_are_done() -> None:
    async def main() -> None:
        work = _BatchQueue(3)
        first = [await work.take(), await work.take()]
        assert first == [0, 1]
        work.give_back([1])  # a stripe failed with batch 1 asked
        assert await work.take() == 1
        assert await work.take() == 2
        ended: list[int | None] = []

        async def taker() -> None:
            ended.append(await work.take())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(taker)
            await trio.sleep(0.01)
            assert ended == []  # batches are out: one may still come back
            work.give_back([2])
            await trio.sleep(0.01)
            assert ended == [2]
            for _ in range(3):
                work.done()
            assert await work.take() is None

    trio.run(main)


def test_an_empty_queue_ends_at_once() -> None:
    async def main() -> None:
        assert await _BatchQueue(0).take() is None

    trio.run(main)
