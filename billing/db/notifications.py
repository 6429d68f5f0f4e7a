"""The notifications outbox: written by org workflows, drained by the delivery loop.

Delivery follows `position` per org: only the oldest pending notification of an
org is ever handed out (and leased, so two worker processes never send it at
once); the next one waits until it is delivered or recorded as failed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, aliased

from billing.db.models import Notification, NotificationStatus
from billing.domain import BillingNotification


def enqueue(session: Session, notifications: Sequence[BillingNotification]) -> int:
    """Add notifications in order; one already there (same id) is left alone. Returns how many
    were new."""
    added = 0
    for notification in notifications:
        result = session.execute(
            insert(Notification)
            .values(
                id=notification.id,
                org_id=notification.org_id,
                type=notification.type.value,
                body=json.dumps(notification.body(), separators=(",", ":")),
                status=NotificationStatus.PENDING,
                attempts=0,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(Notification.id)
        )
        added += len(result.all())
    return added


def claim_due(session: Session, now: datetime, lease: timedelta, limit: int) -> list[Notification]:
    """Lease the notifications to send now: the oldest pending one of each org, if it is due.

    Rows leased by another process are skipped (`SKIP LOCKED` and the lease).
    """
    earlier = aliased(Notification)
    heads = (
        select(Notification.id)
        .where(
            Notification.status == NotificationStatus.PENDING,
            Notification.next_attempt_at <= now,
            or_(Notification.lease_until.is_(None), Notification.lease_until < now),
            ~exists().where(
                and_(
                    earlier.org_id == Notification.org_id,
                    earlier.status == NotificationStatus.PENDING,
                    earlier.position < Notification.position,
                )
            ),
        )
        .order_by(Notification.position)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Notification)
    )
    ids = list(session.scalars(heads))
    if not ids:
        return []
    session.execute(
        update(Notification)
        .where(Notification.id.in_(ids))
        .values(lease_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    rows = session.scalars(
        select(Notification).where(Notification.id.in_(ids)).order_by(Notification.position)
    )
    return list(rows)


def mark_delivered(session: Session, notification_id: str, now: datetime, code: int) -> None:
    session.execute(
        update(Notification)
        .where(Notification.id == notification_id)
        .values(
            status=NotificationStatus.DELIVERED,
            attempts=Notification.attempts + 1,
            delivered_at=now,
            lease_until=None,
            last_status_code=code,
            last_error=None,
        )
        .execution_options(synchronize_session=False)
    )


def mark_attempt_failed(
    session: Session,
    notification_id: str,
    *,
    error: str,
    code: int | None,
    retry_at: datetime | None,
) -> None:
    """One failed attempt: retried at `retry_at`, or (None) recorded as failed for good."""
    values: dict[str, object] = {
        "attempts": Notification.attempts + 1,
        "lease_until": None,
        "last_status_code": code,
        "last_error": error[:2000],
    }
    if retry_at is None:
        values["status"] = NotificationStatus.FAILED
    else:
        values["next_attempt_at"] = retry_at
    session.execute(
        update(Notification)
        .where(Notification.id == notification_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def list_notifications(
    session: Session, *, org_id: int | None = None, failed: bool = False, limit: int = 100
) -> list[Notification]:
    """The newest notifications first, of one org and/or only the failed ones."""
    query = select(Notification).order_by(Notification.position.desc()).limit(limit)
    if org_id is not None:
        query = query.where(Notification.org_id == org_id)
    if failed:
        query = query.where(Notification.status == NotificationStatus.FAILED)
    return list(session.scalars(query))


def redeliver(session: Session, notification_id: str, now: datetime) -> Notification | None:
    """Send a notification again (failed or delivered): pending, due now, with the same id.

    It keeps its position, so it goes out before the org's later pending ones.
    """
    row = session.get(Notification, notification_id, with_for_update=True)
    if row is None:
        return None
    row.status = NotificationStatus.PENDING
    row.next_attempt_at = now
    row.lease_until = None
    row.created_at = now
    return row


def prune(session: Session, *, before: datetime, include_failed: bool, limit: int) -> int:
    """Delete up to `limit` finished notifications older than `before`; returns how many.

    Delivered ones count from `delivered_at`; failed ones (only with `include_failed`)
    from `created_at`, the time they were written or queued again. Pending ones are
    never deleted. Callers commit each batch, so a large delete never holds one long
    transaction (docs/operations.md#notifications-retention).
    """
    if limit < 1:
        raise ValueError(f"The batch size must be at least 1, not {limit}.")
    condition = "(status = 'delivered' AND delivered_at < :before)"
    if include_failed:
        condition += " OR (status = 'failed' AND created_at < :before)"
    result = session.execute(
        text(
            "DELETE FROM notifications WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM notifications WHERE {condition} LIMIT :limit))"
        ),
        {"before": before, "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)
