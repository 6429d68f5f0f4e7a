"""`billing notifications list`, `redeliver` and `prune`, against real Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.db import notifications
from billing.db.models import Notification, NotificationStatus
from billing.domain import BillingNotification, NotificationType
from tests.cli.conftest import Invoke, assert_clean_error
from tests.factories.stack import create_org


def _written(session_factory: sessionmaker[Session], org_id: int, *keys: str) -> list[str]:
    items = [
        BillingNotification(
            id=f"msg_{org_id}_{key}",
            type=NotificationType.PAYMENT_FAILED,
            org_id=org_id,
            data={"key": key},
            created=datetime.now(UTC),
        )
        for key in keys
    ]
    with session_factory.begin() as session:
        notifications.enqueue(session, items)
    return [n.id for n in items]


def _give_up(session_factory: sessionmaker[Session], notification_id: str) -> None:
    with session_factory.begin() as session:
        notifications.mark_attempt_failed(
            session, notification_id, error="HTTP 410", code=410, retry_at=None
        )


def test_list_filters_by_org_and_failed_and_redeliver_queues_again(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    acme, other = create_org(session_factory), create_org(session_factory, name="Other")
    first, second = _written(session_factory, acme, "a", "b")
    (third,) = _written(session_factory, other, "c")
    _give_up(session_factory, second)

    everything = json.loads(invoke("notifications", "list", "--json").stdout)
    assert [n["id"] for n in everything] == [third, second, first]  # newest first
    of_acme = json.loads(invoke("notifications", "list", "--org", str(acme), "--json").stdout)
    assert [n["id"] for n in of_acme] == [second, first]
    failed = json.loads(invoke("notifications", "list", "--failed", "--json").stdout)
    assert [(n["id"], n["status"], n["last_status_code"]) for n in failed] == [
        (second, "failed", 410)
    ]
    table = invoke("notifications", "list", "--failed")
    assert table.exit_code == 0 and second in table.stdout and "HTTP 410" in table.stdout

    result = invoke("notifications", "redeliver", second)
    assert result.exit_code == 0, result.output
    assert second in result.stdout
    with session_factory() as session:
        row = session.get(Notification, second)
        assert row is not None and row.status is NotificationStatus.PENDING
    assert json.loads(invoke("notifications", "list", "--failed", "--json").stdout) == []


def test_bad_input_is_a_clear_error(invoke: Invoke) -> None:
    assert_clean_error(invoke("notifications", "redeliver", "msg_nope"), "No notification")
    assert_clean_error(invoke("notifications", "list", "--org", "0"), "--org")
    assert_clean_error(invoke("notifications", "list", "--limit", "0"), "--limit")
    assert invoke("notifications", "list").stdout.strip() == "No notifications."


def _age(
    session_factory: sessionmaker[Session], notification_id: str, *, days: int, delivered: bool
) -> None:
    """Make a notification `days` old: written then, and delivered then if `delivered`."""
    at = datetime.now(UTC) - timedelta(days=days)
    with session_factory.begin() as session:
        if delivered:
            notifications.mark_delivered(session, notification_id, at, 200)
        row = session.get(Notification, notification_id)
        assert row is not None
        row.created_at = at


def test_prune_deletes_old_delivered_and_with_include_failed_old_failed_never_pending(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    acme = create_org(session_factory)
    old_delivered, older_delivered, new_delivered, old_failed, new_failed, old_pending = (
        _written(session_factory, acme, "a", "b", "c", "d", "e", "f")
    )
    _age(session_factory, old_delivered, days=40, delivered=True)
    _age(session_factory, older_delivered, days=400, delivered=True)
    _age(session_factory, new_delivered, days=10, delivered=True)
    _give_up(session_factory, old_failed)
    _age(session_factory, old_failed, days=40, delivered=False)
    _give_up(session_factory, new_failed)
    _age(session_factory, old_pending, days=400, delivered=False)

    def left() -> set[str]:
        with session_factory() as session:
            return set(session.scalars(select(Notification.id)))

    pruned = invoke("notifications", "prune", "--batch-size", "1", "--json")
    assert pruned.exit_code == 0, pruned.output
    document = json.loads(pruned.stdout)
    assert document["deleted"] == 2  # the 40- and 400-day delivered ones, one per batch
    assert document["include_failed"] is False
    assert left() == {new_delivered, old_failed, new_failed, old_pending}

    with_failed = invoke("notifications", "prune", "--include-failed")
    assert with_failed.exit_code == 0, with_failed.output
    assert "Deleted 1 delivered and failed notifications older than" in with_failed.stdout
    assert left() == {new_delivered, new_failed, old_pending}

    everything = invoke("notifications", "prune", "--older-than-days", "0", "--include-failed")
    assert everything.exit_code == 0, everything.output
    assert left() == {old_pending}  # pending ones are never deleted, however old


def test_prune_bad_input_is_a_clear_error(invoke: Invoke) -> None:
    assert_clean_error(
        invoke("notifications", "prune", "--older-than-days", "-1"), "--older-than-days"
    )
    assert_clean_error(invoke("notifications", "prune", "--batch-size", "0"), "--batch-size")
