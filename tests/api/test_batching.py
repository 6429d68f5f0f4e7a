"""Group commit (`api.batching.Batcher`): one call for the callers in flight, answers per caller."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from api.batching import Batcher
from api.store import DatabaseTimeoutError


class Recorder:
    """A batch function that remembers each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        return [item * 10 for item in items]


async def test_callers_in_flight_share_one_call_and_get_their_own_answers() -> None:
    run = Recorder()
    batcher = Batcher("test", run)

    answers = await asyncio.gather(*(batcher.submit(i) for i in range(50)))

    assert answers == [i * 10 for i in range(50)]
    assert run.batches == [list(range(50))]


async def test_items_that_arrive_during_a_batch_go_into_the_next_one() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(5)
        return list(items)

    batcher = Batcher("test", run)
    first = asyncio.ensure_future(batcher.submit(1))
    while not batches:
        await asyncio.sleep(0.005)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)
    release.set()

    assert await first == 1
    assert await asyncio.gather(*later) == [2, 3, 4]
    assert batches == [[1], [2, 3, 4]]


async def test_a_batch_larger_than_the_limit_is_split() -> None:
    run = Recorder()
    batcher = Batcher("test", run, max_batch=20)

    await asyncio.gather(*(batcher.submit(i) for i in range(50)))

    assert [len(b) for b in run.batches] == [20, 20, 10]


async def test_a_failed_batch_is_a_database_error_for_each_caller() -> None:
    def run(items: Sequence[int]) -> list[int]:
        raise OperationalError("SELECT", {}, ConnectionError("server closed the connection"))

    batcher = Batcher("test", run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)

    errors = [r for r in results if isinstance(r, SQLAlchemyError)]
    assert len(errors) == 3
    # One exception object per caller: raised in many tasks, one would pile up tracebacks.
    assert len({id(e) for e in errors}) == 3
    assert all(isinstance(e.__cause__, OperationalError) for e in errors)


async def test_a_wrong_number_of_results_fails_every_caller() -> None:
    batcher: Batcher[int, int] = Batcher("test", lambda items: [1])

    results = await asyncio.gather(*(batcher.submit(i) for i in range(2)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_frozen_batch_fails_each_caller_within_its_own_timeout() -> None:
    """A caller that queues behind a stuck batch waits its timeout, not the stuck one's too."""
    release = threading.Event()

    def run(items: Sequence[int]) -> list[int]:
        release.wait(10)
        return list(items)

    batcher = Batcher("test", run, timeout=0.5)
    try:
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.3)
        queued_at = time.monotonic()
        second = asyncio.ensure_future(batcher.submit(2))
        with pytest.raises(DatabaseTimeoutError):
            await first
        assert time.monotonic() - started < 0.9
        with pytest.raises(DatabaseTimeoutError):
            await second
        assert time.monotonic() - queued_at < 0.9
    finally:
        release.set()


async def test_a_caller_that_leaves_is_not_in_the_next_batch() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(5)
        return list(items)

    batcher = Batcher("test", run)
    first = asyncio.ensure_future(batcher.submit(1))
    while not batches:
        await asyncio.sleep(0.005)
    leaving = asyncio.ensure_future(batcher.submit(2))
    staying = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0.01)
    leaving.cancel()
    release.set()

    assert await first == 1
    assert await staying == 3
    assert batches == [[1], [3]]
