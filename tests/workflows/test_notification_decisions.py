"""What the workflow publishes (workflows/notifications.py), without a Temporal server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing.domain import (
    BillingStatus,
    NotificationType,
    OrgBillingState,
    StripeEventSignal,
    SubscriptionStatus,
)
from workflows import notifications

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def billed(status: BillingStatus = BillingStatus.ACTIVE) -> OrgBillingState:
    return OrgBillingState(
        org_id=7,
        status=status,
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        subscription_status=SubscriptionStatus(status.value),
        current_period_start=NOW - 10 * DAY,
        current_period_end=NOW + 20 * DAY,
    )


def publish(state: OrgBillingState, now: datetime) -> list[tuple[NotificationType, str]]:
    plan = notifications.plan_publish(state, now, 7)
    if plan is None:
        return []
    notifications.published(state, plan)
    return [(n.type, n.id) for n in plan.notifications]


def event(kind: str, event_id: str, invoice: str = "in_1", **fields: str) -> StripeEventSignal:
    values = {"customer_id": "cus_1", "subscription_id": "sub_1", **fields}
    return StripeEventSignal(event_id=event_id, type=kind, created=1, object_id=invoice, **values)


def test_first_publish_tells_the_status_and_writes_the_row_then_nothing_until_a_change() -> None:
    state = billed()
    plan = notifications.plan_publish(state, NOW, 7)
    assert plan is not None and plan.row_changed and plan.published.entitled
    assert [n.type for n in plan.notifications] == [NotificationType.STATUS_CHANGED]
    assert plan.notifications[0].data["previous_status"] is None
    notifications.published(state, plan)
    assert notifications.plan_publish(state, NOW + DAY, 7) is None


def test_past_due_then_grace_over_then_paid() -> None:
    state = billed()
    publish(state, NOW)
    state.status = BillingStatus.PAST_DUE
    sent = publish(state, NOW)
    assert [t for t, _ in sent] == [NotificationType.STATUS_CHANGED]
    assert state.payment_failed_at == NOW
    # Still within the grace: the workflow wakes when it runs out.
    assert notifications.wake_for_entitlement(state, NOW + DAY, 7) == 6 * DAY
    assert publish(state, NOW + DAY) == []
    over = publish(state, NOW + 7 * DAY)
    assert [t for t, _ in over] == [NotificationType.ENTITLEMENT_CHANGED]
    assert state.published is not None and not state.published.entitled
    state.status = BillingStatus.ACTIVE
    back = publish(state, NOW + 8 * DAY)
    assert [t for t, _ in back] == [
        NotificationType.STATUS_CHANGED,
        NotificationType.ENTITLEMENT_CHANGED,
    ]
    assert state.payment_failed_at is None
    ids = [i for _, i in [*sent, *over, *back]]
    assert len(set(ids)) == len(ids)


def test_ids_are_stable_for_the_same_change() -> None:
    first, second = billed(), billed()
    assert publish(first, NOW) == publish(second, NOW)
    assert notifications.notification_id(
        7, NotificationType.TRIAL_WILL_END, "x"
    ) != notifications.notification_id(8, NotificationType.TRIAL_WILL_END, "x")


def test_trial_will_end_notice_is_keyed_by_the_trial_end() -> None:
    state = billed(BillingStatus.TRIALING)
    publish(state, NOW)
    trial_end = NOW + 3 * DAY
    notifications.queue_trial_will_end(state, trial_end, NOW, 7)
    sent = publish(state, NOW)
    assert [t for t, _ in sent] == [NotificationType.TRIAL_WILL_END]
    again = billed(BillingStatus.TRIALING)
    notifications.queue_trial_will_end(again, trial_end, NOW + DAY, 7)
    assert again.pending_notifications[0].id == sent[0][1]


def test_payment_notices_of_the_org_only_and_one_per_paid_invoice() -> None:
    state = billed()
    publish(state, NOW)
    assert notifications.queue_payment(state, event("invoice.payment_succeeded", "evt_1"), NOW, 7)
    assert not notifications.queue_payment(state, event("invoice.paid", "evt_2"), NOW, 7)
    assert not notifications.queue_payment(
        state, event("invoice.payment_failed", "evt_3", customer_id="cus_other"), NOW, 7
    )
    assert not notifications.queue_payment(
        state, event("invoice.payment_failed", "evt_4", subscription_id="sub_other"), NOW, 7
    )
    assert not notifications.queue_payment(
        state, event("customer.subscription.updated", "evt_5"), NOW, 7
    )
    assert notifications.queue_payment(state, event("invoice.payment_failed", "evt_6"), NOW, 7)
    sent = publish(state, NOW)
    assert [t for t, _ in sent] == [
        NotificationType.PAYMENT_SUCCEEDED,
        NotificationType.PAYMENT_FAILED,
    ]
    assert state.pending_notifications == []


def test_provisioning_failed_is_entitled_and_flagged() -> None:
    state = OrgBillingState(org_id=3, status=BillingStatus.PROVISIONING_FAILED)
    plan = notifications.plan_publish(state, NOW, 7)
    assert plan is not None and plan.published.entitled
    assert plan.notifications[0].data["reason"] == "provisioning_failed"
