"""The notifications outbox delivered to a real HTTP receiver (billing/notify.py).

Real Postgres; the receiver verifies every delivery with `standardwebhooks`.
Retry intervals are shortened through the settings (3 days is the default cap).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.config import Settings
from billing.db import notifications
from billing.db.models import Notification, NotificationStatus
from billing.domain import BillingNotification, NotificationType
from billing.notify import NotificationDelivery, NotifyNotConfiguredError
from tests.factories.receiver import Receiver
from tests.factories.stack import create_org, eventually
from workflows.notifications import notification_id


def settings_for(database_url: str, receiver: Receiver, **overrides: object) -> Settings:
    return Settings.model_validate(
        {
            "database_url": database_url,
            "billing_notify_url": receiver.url,
            "billing_notify_secret": receiver.secret,
            "billing_notify_retry_initial_seconds": 0.1,
            "billing_notify_retry_max_seconds": 0.4,
            "billing_notify_poll_seconds": 0.05,
            "billing_notify_timeout_seconds": 2.0,
            **overrides,
        }
    )


@contextlib.asynccontextmanager
async def delivering(
    settings: Settings, session_factory: sessionmaker[Session]
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(NotificationDelivery(settings, session_factory).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


def notices(org_id: int, count: int, start: int = 0) -> list[BillingNotification]:
    return [
        BillingNotification(
            id=notification_id(org_id, NotificationType.STATUS_CHANGED, f"test-{n}"),
            type=NotificationType.STATUS_CHANGED,
            org_id=org_id,
            data={"seq": n},
            created=datetime.now(UTC),
        )
        for n in range(start, start + count)
    ]


def firsts(rs: list[Notification]) -> set[int]:
    """The position of each org's first notification."""
    return {min(r.position for r in rs if r.org_id == org) for org in {r.org_id for r in rs}}


def rows(session_factory: sessionmaker[Session]) -> list[Notification]:
    with session_factory() as session:
        return list(session.scalars(select(Notification).order_by(Notification.position)))


async def test_down_then_up_every_notification_arrives_once_per_id_in_order_per_org(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    receiver = Receiver()  # not started: the console is down
    orgs = [create_org(session_factory, name=f"Org {n}") for n in range(3)]
    with session_factory.begin() as session:
        for org_id in orgs:
            assert notifications.enqueue(session, notices(org_id, 4)) == 4
        # Written again (a retried activity): nothing new.
        assert notifications.enqueue(session, notices(orgs[0], 4)) == 0
    settings = settings_for(database_url, receiver)
    async with delivering(settings, session_factory):
        await eventually(
            lambda: asyncio.to_thread(rows, session_factory),
            lambda rs: all(r.attempts >= 2 for r in rs if r.position in firsts(rs)),
            timeout=20,
        )
        # Only each org's first notification was tried while the console was down.
        waiting = rows(session_factory)
        assert all(r.attempts == 0 for r in waiting if r.position not in firsts(waiting))
        with session_factory.begin() as session:
            # Written while the console is down: delivered after the earlier ones.
            notifications.enqueue(session, notices(orgs[1], 2, start=4))
        receiver.start()
        try:
            await eventually(
                lambda: asyncio.to_thread(rows, session_factory),
                lambda rs: all(r.status is NotificationStatus.DELIVERED for r in rs),
                timeout=30,
            )
        finally:
            receiver.stop()
    assert receiver.unverified == []
    accepted = receiver.accepted()
    assert len(accepted) == 14
    for org_id in orgs:
        seqs = [d.body["data"]["seq"] for d in accepted if d.body["org_id"] == org_id]
        assert seqs == list(range(6 if org_id == orgs[1] else 4))
    # One id per notification, and the id the workflow derived.
    by_body: dict[tuple[int, int], set[str]] = {}
    for d in accepted:
        by_body.setdefault((d.body["org_id"], d.body["data"]["seq"]), set()).add(d.id)
    assert all(len(ids) == 1 for ids in by_body.values())
    assert {d.id for d in accepted} == {r.id for r in rows(session_factory)}
    assert all(d.body["type"] == "org.billing.status_changed" for d in accepted)
    assert set(accepted[0].body) == {"type", "org_id", "data", "created"}


async def test_a_4xx_is_recorded_failed_at_once_and_the_org_s_next_one_goes_out(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    refused = {1}
    receiver = Receiver(answer=lambda body: 422 if body["data"]["seq"] in refused else 200)
    org_id = create_org(session_factory)
    with session_factory.begin() as session:
        notifications.enqueue(session, notices(org_id, 3))
    receiver.start()
    try:
        async with delivering(settings_for(database_url, receiver), session_factory):
            await eventually(
                lambda: asyncio.to_thread(rows, session_factory),
                lambda rs: all(r.status is not NotificationStatus.PENDING for r in rs),
                timeout=20,
            )
            await asyncio.sleep(0.5)  # a retry, if there were one, would come now
    finally:
        receiver.stop()
    states = [(r.status, r.attempts, r.last_status_code) for r in rows(session_factory)]
    assert states == [
        (NotificationStatus.DELIVERED, 1, 200),
        (NotificationStatus.FAILED, 1, 422),
        (NotificationStatus.DELIVERED, 1, 200),
    ]
    assert [d.body["data"]["seq"] for d in receiver.deliveries] == [0, 1, 2]

    # Redelivered by an operator once the console accepts it: the same id again.
    failed = rows(session_factory)[1]
    refused.clear()
    with session_factory.begin() as session:
        assert notifications.redeliver(session, failed.id, datetime.now(UTC)) is not None
    receiver.start()
    try:
        async with delivering(settings_for(database_url, receiver), session_factory):
            await eventually(
                lambda: asyncio.to_thread(rows, session_factory),
                lambda rs: rs[1].status is NotificationStatus.DELIVERED,
                timeout=20,
            )
    finally:
        receiver.stop()
    assert receiver.deliveries[-1].id == failed.id


async def test_429_and_5xx_are_retried_and_a_notification_too_old_is_given_up(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    answers = iter([429, 503, 200])
    receiver = Receiver(answer=lambda body: next(answers))
    org_id = create_org(session_factory)
    with session_factory.begin() as session:
        notifications.enqueue(session, notices(org_id, 1))
    receiver.start()
    try:
        async with delivering(settings_for(database_url, receiver), session_factory):
            await eventually(
                lambda: asyncio.to_thread(rows, session_factory),
                lambda rs: rs[0].status is NotificationStatus.DELIVERED,
                timeout=20,
            )
    finally:
        receiver.stop()
    assert [d.answered for d in receiver.deliveries] == [429, 503, 200]
    assert len({d.id for d in receiver.deliveries}) == 1

    # The console stays down past the give-up age: recorded failed, not retried forever.
    down = Receiver()
    other = create_org(session_factory)
    with session_factory.begin() as session:
        notifications.enqueue(session, notices(other, 1))
    settings = settings_for(database_url, down, billing_notify_give_up_seconds=1.0)
    async with delivering(settings, session_factory):
        final = await eventually(
            lambda: asyncio.to_thread(rows, session_factory),
            lambda rs: rs[-1].status is NotificationStatus.FAILED,
            timeout=20,
        )
    assert final[-1].attempts >= 2 and final[-1].last_status_code is None
    assert final[-1].last_error


def test_a_url_without_a_usable_secret_is_refused_at_start(database_url: str) -> None:
    receiver = Receiver()
    for secret in (None, "whsec_not base64!"):
        settings = settings_for(database_url, receiver, billing_notify_secret=secret)
        with pytest.raises(NotifyNotConfiguredError):
            settings.require_notify()
