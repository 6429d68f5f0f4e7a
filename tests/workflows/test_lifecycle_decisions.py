"""The pure decisions of closing an org and syncing its Stripe customer."""

from __future__ import annotations

from datetime import UTC, datetime

from billing.domain import (
    BillingPeriod,
    BillingStatus,
    CustomerSync,
    OrgBillingState,
    OrgCloseCancels,
    OrgCloseSignal,
    OrgProfile,
    SubscriptionStatus,
)
from workflows import lifecycle
from workflows.lifecycle import CloseStep

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def billed(**changes: object) -> OrgBillingState:
    state = OrgBillingState(
        org_id=7,
        status=BillingStatus.ACTIVE,
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        subscription_status=SubscriptionStatus.ACTIVE,
    )
    return state.model_copy(update=changes)


def test_the_first_close_counts() -> None:
    state = billed()
    lifecycle.note_close(state, OrgCloseSignal(closed_at=T0, cancels=OrgCloseCancels.PERIOD_END))
    lifecycle.note_close(state, OrgCloseSignal(closed_at=T1, cancels=OrgCloseCancels.IMMEDIATELY))
    assert (state.closed_at, state.close_cancels) == (T0, OrgCloseCancels.PERIOD_END)


def test_close_steps() -> None:
    assert lifecycle.close_step(billed(), None) is CloseStep.NONE  # not closed
    now = billed(closed_at=T0, close_cancels=OrgCloseCancels.IMMEDIATELY)
    assert lifecycle.close_step(now, None) is CloseStep.CANCEL_NOW
    at_end = billed(closed_at=T0, close_cancels=OrgCloseCancels.PERIOD_END)
    assert lifecycle.close_step(at_end, None) is CloseStep.CANCEL_AT_PERIOD_END
    assert lifecycle.close_step(at_end, "sub_1") is CloseStep.NONE  # asked already
    ended = billed(closed_at=T0, subscription_status=SubscriptionStatus.CANCELED)
    assert lifecycle.close_step(ended, None) is CloseStep.NONE
    for status in (BillingStatus.PROVISIONING_FAILED, BillingStatus.NOT_BILLED):
        assert lifecycle.close_step(billed(closed_at=T0, status=status), None) is CloseStep.NONE


def test_a_close_finishes_once_nothing_is_owed() -> None:
    assert not lifecycle.close_finished(billed())
    assert not lifecycle.close_finished(billed(closed_at=T0))  # still live
    canceled = billed(closed_at=T0, subscription_status=SubscriptionStatus.CANCELED)
    owed = canceled.model_copy(update={"to_finalize": [BillingPeriod(start=T0, end=T1)]})
    assert lifecycle.close_finished(canceled) and not lifecycle.close_finished(owed)
    never_billed = billed(closed_at=T0, status=BillingStatus.PROVISIONING)
    assert lifecycle.close_finished(never_billed)
    assert lifecycle.closed_status(never_billed) is BillingStatus.CLOSED
    assert lifecycle.closed_status(canceled) is BillingStatus.ACTIVE  # Stripe's, as read


def test_the_customer_is_synced_only_when_it_differs() -> None:
    org = OrgProfile(
        org_id=7,
        org_uid="u",
        name="Acme",
        owner_email="ada@acme.example",
        owner_first_name="Ada",
        owner_last_name="Lovelace",
    )
    name, email = lifecycle.customer_target(org)
    assert (name, email) == ("Ada Lovelace (Acme)", "ada@acme.example")
    state = billed()
    assert lifecycle.customer_sync_needed(state, name, email)  # never checked
    state.customer_sync = CustomerSync(
        customer_id="cus_1", name=name, email=email, synced_at=T0, updated=True
    )
    assert not lifecycle.customer_sync_needed(state, name, email)
    assert lifecycle.customer_sync_needed(state, "Ada King (Acme)", email)
    assert not lifecycle.customer_sync_needed(billed(stripe_customer_id=None), name, email)


def test_a_closed_row_ends_the_run_only_when_nothing_of_it_bills() -> None:
    org = OrgProfile(org_id=7, org_uid="u", name="Acme", owner_email="a@acme.example")
    assert lifecycle.closed_row_status(org) is BillingStatus.CLOSED
    live = org.model_copy(
        update={"stripe_subscription_id": "sub_1", "subscription_status": SubscriptionStatus.ACTIVE}
    )
    assert lifecycle.closed_row_status(live) is None
    ended = live.model_copy(update={"subscription_status": SubscriptionStatus.CANCELED})
    assert lifecycle.closed_row_status(ended) is BillingStatus.CANCELED
