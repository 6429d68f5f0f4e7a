"""What the `OrgBilling` workflow tells the org row and the console, as plain functions.

After its work, the workflow asks `plan_publish` whether the org's status or
entitlement changed since it last published, or a notice (a payment, a trial
ending) is waiting. If so it writes the row's `entitled`/`access_until` and the
notifications to the outbox in one activity, then calls `published`. Delivery
is the worker's separate loop (billing/notify.py): nothing here waits on the
console. Each notification's id is derived from the org, its type and the
change (a publish count, a Stripe event id, a trial end), so a retried
activity or a replay writes the same ids and the outbox keeps one of each.
No I/O, no clock: `now` is a parameter.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.models import PublishInput
    from billing.domain import (
        BillingNotification,
        BillingStatus,
        NotificationType,
        OrgBillingState,
        PublishedBilling,
        StripeEventSignal,
    )
    from billing.entitlement import Entitlement, next_change, of_state

PAYMENT_FAILED_EVENT = "invoice.payment_failed"
PAYMENT_SUCCEEDED_EVENTS = frozenset({"invoice.payment_succeeded", "invoice.paid"})
# Statuses that mean a payment failed and is still unpaid.
UNPAID_STATUSES = frozenset({BillingStatus.PAST_DUE, BillingStatus.UNPAID})


def notification_id(org_id: int, type: NotificationType, key: str) -> str:
    """A stable id per change: the same org, type and change key give the same id."""
    digest = hashlib.sha256(f"{org_id}|{type.value}|{key}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def track_payment_failure(state: OrgBillingState, now: datetime) -> None:
    """Changes the state: remember when a failed payment was first seen, until it is paid."""
    if state.status in UNPAID_STATUSES:
        if state.payment_failed_at is None:
            state.payment_failed_at = now
    elif state.payment_failed_at is not None:
        state.payment_failed_at = None


def entitlement_of(state: OrgBillingState, now: datetime, grace_days: int) -> Entitlement:
    """The org's entitlement at `now` by the one rule (billing/entitlement.py).

    `grace_days` is the workflow's own (its tuning), kept in the state too.
    """
    state.past_due_grace_days = grace_days
    return of_state(state, now, grace_days)


def _entitlement_data(entitlement: Entitlement) -> dict[str, Any]:
    return entitlement.model_dump(mode="json")


def _notice(
    state: OrgBillingState,
    type: NotificationType,
    key: str,
    data: dict[str, Any],
    now: datetime,
) -> BillingNotification:
    return BillingNotification(
        id=notification_id(state.org_id, type, key),
        type=type,
        org_id=state.org_id,
        data=data,
        created=now,
    )


def queue_trial_will_end(
    state: OrgBillingState, trial_end: datetime, now: datetime, grace_days: int
) -> None:
    """Changes the state: a trial-end notice (once per trial end; the caller dedupes)."""
    data = {
        "trial_end": trial_end.isoformat(),
        "entitlement": _entitlement_data(entitlement_of(state, now, grace_days)),
    }
    state.pending_notifications.append(
        _notice(state, NotificationType.TRIAL_WILL_END, trial_end.isoformat(), data, now)
    )


def payment_notice_type(
    state: OrgBillingState, event: StripeEventSignal
) -> NotificationType | None:
    """The notice a Stripe invoice event gives, if it is about the org's own billing."""
    if event.type == PAYMENT_FAILED_EVENT:
        kind = NotificationType.PAYMENT_FAILED
    elif event.type in PAYMENT_SUCCEEDED_EVENTS:
        kind = NotificationType.PAYMENT_SUCCEEDED
    else:
        return None
    if state.stripe_customer_id is None or event.customer_id not in (
        None,
        state.stripe_customer_id,
    ):
        return None
    if event.subscription_id not in (None, state.stripe_subscription_id):
        return None
    return kind


def queue_payment(
    state: OrgBillingState, event: StripeEventSignal, now: datetime, grace_days: int
) -> bool:
    """Changes the state: a payment notice for an applied invoice event; False if none.

    The id comes from the Stripe event's id (Stripe redelivers an event with the
    same id), and `invoice.paid` with `invoice.payment_succeeded` of one invoice
    give one notice (keyed by the invoice).
    """
    kind = payment_notice_type(state, event)
    if kind is None:
        return False
    track_payment_failure(state, now)
    if kind is NotificationType.PAYMENT_SUCCEEDED:
        key = f"invoice:{event.object_id}"
        if any(
            n.id == notification_id(state.org_id, kind, key) for n in state.pending_notifications
        ):
            return False
    else:
        key = f"event:{event.event_id}"
    data = {
        "invoice_id": event.object_id,
        "stripe_event_id": event.event_id,
        "entitlement": _entitlement_data(entitlement_of(state, now, grace_days)),
    }
    state.pending_notifications.append(_notice(state, kind, key, data, now))
    return True


def plan_publish(state: OrgBillingState, now: datetime, grace_days: int) -> PublishInput | None:
    """What to write now (the row's values and the notifications), or None when nothing changed.

    Changes the state only to track a failed payment's start.
    """
    track_payment_failure(state, now)
    entitlement = entitlement_of(state, now, grace_days)
    before = state.published
    current = PublishedBilling(
        status=state.status,
        entitled=entitlement.entitled,
        access_until=entitlement.access_until,
    )
    if before == current and not state.pending_notifications:
        return None
    notifications = list(state.pending_notifications)
    change = f"{state.published_changes + 1}@{now.isoformat()}"
    data = _entitlement_data(entitlement)
    if before is None or before.status != current.status:
        notifications.append(
            _notice(
                state,
                NotificationType.STATUS_CHANGED,
                change,
                {**data, "previous_status": before.status.value if before else None},
                now,
            )
        )
    if before is not None and before.entitled != current.entitled:
        notifications.append(
            _notice(
                state,
                NotificationType.ENTITLEMENT_CHANGED,
                change,
                {**data, "previous_entitled": before.entitled},
                now,
            )
        )
    return PublishInput(
        org_id=state.org_id,
        published=current,
        row_changed=before is None
        or (before.entitled, before.access_until) != (current.entitled, current.access_until),
        notifications=notifications,
    )


def published(state: OrgBillingState, plan: PublishInput) -> None:
    """Changes the state: the plan is written; the next change compares against it."""
    state.published = plan.published
    state.published_changes += 1
    written = {n.id for n in plan.notifications}
    state.pending_notifications = [n for n in state.pending_notifications if n.id not in written]


def wake_for_entitlement(
    state: OrgBillingState, now: datetime, grace_days: int
) -> timedelta | None:
    """How long until the entitlement changes by time alone (then the workflow publishes)."""
    at = next_change(entitlement_of(state, now, grace_days), now)
    if at is None:
        return None
    return max(at - now, timedelta(seconds=1))
