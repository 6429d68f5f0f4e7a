"""The API's database access: org reads through the kernel, and the webhook log.

The engine is synchronous, so handlers run these in the thread pool. The API
never writes billing state: only the `stripe_events` log of what it received.
Org data is read through `billing.db.orgs`, the one owner of it. The webhook
route's reads and log writes are batched (`api.webhook_store`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson
from sqlalchemy import Connection, text
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

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


# Upsert on the event id: a redelivery updates the row instead of failing. The rows
# travel as one JSON document, so one statement (prepared once) takes any number.
_RECORD_EVENTS = text(
    """
    INSERT INTO stripe_events (id, type, created, object_id, org_id, outcome, detail)
    SELECT id, type, created, object_id, org_id, outcome, detail
    FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS e(
        id varchar, type varchar, created bigint, object_id varchar, org_id integer,
        outcome varchar, detail text)
    ON CONFLICT (id) DO UPDATE SET
        type = EXCLUDED.type, created = EXCLUDED.created, object_id = EXCLUDED.object_id,
        org_id = EXCLUDED.org_id, outcome = EXCLUDED.outcome, detail = EXCLUDED.detail,
        received_at = now()
    """
)


def record_events(connection: Connection, events: Sequence[EventRecord]) -> None:
    """Write (or overwrite) the log rows of `events` with one statement.

    An event delivered twice in one batch keeps its last record: Postgres
    refuses an upsert that touches the same row twice. The caller commits (or
    runs in autocommit, where the statement is its own transaction).
    """
    latest = {event.event_id: event for event in events}
    if not latest:
        return
    document = [
        {
            "id": e.event_id,
            "type": e.type,
            "created": e.created,
            "object_id": e.object_id,
            "org_id": e.org_id,
            "outcome": e.outcome,
            "detail": e.detail,
        }
        for e in latest.values()
    ]
    connection.execute(_RECORD_EVENTS, {"events": orjson.dumps(document).decode()})
