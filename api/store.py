"""The few database reads the API needs, and the webhook log it writes.

The engine is synchronous, so handlers run these in the thread pool. The API
never writes billing state: only the `stripe_events` log of what it received.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from billing.db.models import Membership, Org, StripeEventLog

SessionFactory = sessionmaker[Session]


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


def get_org(factory: SessionFactory, org_id: int) -> Org | None:
    with factory() as session:
        return session.get(Org, org_id)


def org_exists(factory: SessionFactory, org_id: int) -> bool:
    with factory() as session:
        return session.scalar(select(Org.id).where(Org.id == org_id)) is not None


def org_id_for_customer(factory: SessionFactory, customer_id: str) -> int | None:
    with factory() as session:
        return session.scalar(select(Org.id).where(Org.stripe_customer_id == customer_id))


def is_member(factory: SessionFactory, org_id: int, user_id: int) -> bool:
    with factory() as session:
        found = session.scalar(
            select(Membership.id).where(Membership.org_id == org_id, Membership.user_id == user_id)
        )
        return found is not None


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
