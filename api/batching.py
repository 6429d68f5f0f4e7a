"""Group commit: the database work of every request in flight, in one round trip.

Under a burst of webhooks, dozens of requests want the same kind of statement
at the same moment (look up an org, write a log row). A `Batcher` queues their
items and runs them as one call of a blocking batch function in the thread
pool; while that call runs, new items queue up for the next one. Each caller
still gets its own answer (or its own error), only once the batch it was part
of has returned, so a write is never reported done before it committed.

Every caller waits at most `timeout` seconds from the moment it asked, however
long the batch before its own took: a frozen database is a prompt error for
each request, as with `api.store.bounded`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from api.store import DB_CALL_TIMEOUT_SECONDS, DatabaseTimeoutError, bounded

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 500


class DatabaseBatchError(SQLAlchemyError):
    """The batch this request was part of failed; the cause is chained."""


class Batcher(Generic[Item, Result]):
    """Runs `run(items) -> results` (same length, same order) for concurrent callers."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        timeout: float = DB_CALL_TIMEOUT_SECONDS,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.name = name
        self._run = run
        self._timeout = timeout
        self._max_batch = max_batch
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """`item`'s result, once the batch holding it has run; errors are per caller."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain(), name=f"batch-{self.name}")
        deadline = loop.call_later(self._timeout, self._expire, future)
        try:
            # A caller that leaves (cancelled) cancels its future: the drain skips it.
            return await future
        finally:
            deadline.cancel()

    def _expire(self, future: asyncio.Future[Result]) -> None:
        if not future.done():
            future.set_exception(
                DatabaseTimeoutError(
                    f"no answer from the database within {self._timeout:.0f} s ({self.name})"
                )
            )

    async def _drain(self) -> None:
        while self._queue:
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            while self._queue and len(batch) < self._max_batch:
                item, future = self._queue.popleft()
                if not future.done():  # expired or abandoned while queued
                    batch.append((item, future))
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await bounded(lambda: self._run(items), self._timeout)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_for_one_caller(err))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def _for_one_caller(err: Exception) -> Exception:
    """A fresh exception per caller (one instance raised in many tasks would pile up
    their tracebacks); database errors stay database errors, so they answer 503."""
    if isinstance(err, DatabaseTimeoutError):
        return DatabaseTimeoutError(str(err))
    if isinstance(err, SQLAlchemyError):
        fresh = DatabaseBatchError(f"{type(err).__name__}: {err}")
        fresh.__cause__ = err
        return fresh
    fresh_error = RuntimeError(f"batch failed: {type(err).__name__}: {err}")
    fresh_error.__cause__ = err
    return fresh_error
