"""The API's database access: org reads through the kernel, and the webhook log.

The engine is synchronous, so handlers run these in the thread pool. The API
never writes billing state: only the `stripe_events` log of what it received.
Org data is read through `billing.db.orgs`, the one owner of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import func, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from billing.db.models import StripeEventLog

SessionFactory = sessionmaker[Session]
T = TypeVar("T")

# Stripe waits ~10 s for an answer: a database that does not answer within this
# is reported as unavailable (503, Stripe retries) well before that.
DB_CALL_TIMEOUT_SECONDS = 3.0


class DatabaseTimeoutError(SQLAlchemyTimeoutError):
    """The database did not answer in time (it may be frozen or overloaded)."""


async def bounded(work: Callable[[], T], timeout: float = DB_CALL_TIMEOUT_SECONDS) -> T:
    """Run blocking database work in the thread pool, giving up after `timeout`.

    A thread stuck on a frozen server stays stuck until the server answers, but
    the request is answered now; the engine's statement timeout frees it later.
    """
    try:
        return await asyncio.wait_for(run_in_threadpool(work), timeout)
    except TimeoutError:
        raise DatabaseTimeoutError(f"no answer from the database within {timeout:.0f} s") from None


async def read(factory: SessionFactory, query: Callable[[Session], T]) -> T:
    """Run one read (e.g. `lambda s: orgs.org_exists(s, 7)`) in its own session."""

    def run() -> T:
        with factory() as session:
            return query(session)

    return await bounded(run)


@dataclass(frozen=True)
class EventRecord:
    """One row of the webhook log."""

    event_id: str
    type: str
    created: int
    object_id: str | None
    org_id: int | None
    outcome: str
    detail: str | None


def ping(factory: SessionFactory) -> None:
    with factory() as session:
        session.execute(text("SELECT 1"))


def record_event(factory: SessionFactory, event: EventRecord) -> None:
    """Upsert on the event id: a redelivery updates the row instead of failing."""
    values = {
        "id": event.event_id,
        "type": event.type,
        "created": event.created,
        "object_id": event.object_id,
        "org_id": event.org_id,
        "outcome": event.outcome,
        "detail": event.detail,
    }
    statement = insert(StripeEventLog).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[StripeEventLog.id],
        set_={
            "type": statement.excluded.type,
            "created": statement.excluded.created,
            "object_id": statement.excluded.object_id,
            "org_id": statement.excluded.org_id,
            "outcome": statement.excluded.outcome,
            "detail": statement.excluded.detail,
            "received_at": func.now(),
        },
    )
    with factory.begin() as session:
        session.execute(statement)
