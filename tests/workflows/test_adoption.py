"""Only what is provably an org's is linked to it, whatever Stripe's webhooks name.

The live stack: the emulator delivers its webhooks over HTTP to the API, which
routes them by metadata to the org's workflow; subscriptions and customers
"made in the dashboard" are made through the Stripe API, as the dashboard does.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import delete, select

from billing.constants import org_workflow_id
from billing.db import orgs
from billing.db.event_log import ADOPTION_REFUSED
from billing.db.models import Membership, StripeEventLog
from billing.domain import BillingStatus, OrgBillingState
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from tests.factories.live import LiveStack
from tests.factories.stack import capture_history, create_org, eventually, wait_for_status

pytestmark = pytest.mark.asyncio


async def started(stack: LiveStack, org_id: int, statuses: set[BillingStatus]) -> OrgBillingState:
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    return await wait_for_status(stack.client, org_id, statuses)


def dashboard_subscription(stack: LiveStack, metadata: dict[str, str]) -> Any:
    """A customer and a trialing subscription typed in by hand, naming an org."""
    customer = stack.stripe.v1.customers.create(
        {"email": f"someone-{uuid.uuid4().hex[:6]}@elsewhere.test", "metadata": metadata}
    )
    return stack.stripe.v1.subscriptions.create(
        {
            "customer": customer.id,
            "items": [{"price": stack.settings.stripe_price_id, "quantity": 1}],
            "trial_period_days": 7,
            "metadata": metadata,
        }
    )


async def refused(stack: LiveStack, org_id: int, subscription_id: str) -> OrgBillingState:
    """Wait until the org's workflow has refused (and kept) that subscription."""
    return await eventually(
        lambda: query_state(stack.client, org_id),
        lambda s: any(r.subscription_id == subscription_id for r in s.refused_adoptions),
    )


def event_log(stack: LiveStack, org_id: int, outcome: str) -> list[StripeEventLog]:
    with stack.session_factory() as session:
        return list(
            session.scalars(
                select(StripeEventLog).where(
                    StripeEventLog.org_id == org_id, StripeEventLog.outcome == outcome
                )
            )
        )


def stripe_ids(stack: LiveStack, org_id: int) -> tuple[str | None, str | None]:
    row = stack.org(org_id)
    return row.stripe_customer_id, row.stripe_subscription_id


async def test_a_marketplace_org_never_adopts_a_dashboard_subscription_that_names_it(
    stack: LiveStack,
) -> None:
    org_id = create_org(stack.session_factory, aws_account_id="123456789012")
    await started(stack, org_id, {BillingStatus.NOT_BILLED})

    sub = dashboard_subscription(stack, {"org_id": str(org_id)})
    state = await refused(stack, org_id, sub.id)
    await stack.settled(org_id)

    state = await query_state(stack.client, org_id)
    assert state.status is BillingStatus.NOT_BILLED
    assert (state.stripe_customer_id, state.stripe_subscription_id) == (None, None)
    assert state.last_error is None
    assert stripe_ids(stack, org_id) == (None, None)
    # Each event naming it (created, the trial's paid invoice) is refused and logged.
    refusals = [r for r in state.refused_adoptions if r.subscription_id == sub.id]
    logged = {row.id: row for row in event_log(stack, org_id, ADOPTION_REFUSED)}
    assert refusals
    for refusal in refusals:
        assert refusal.customer_id == sub.customer
        assert "marketplace" in refusal.reason
        row = logged[f"{refusal.event_id}:{ADOPTION_REFUSED}"]
        assert (row.object_id, row.detail) == (sub.id, refusal.reason)
    await capture_history(stack.client, org_workflow_id(org_id), "marketplace_refuses_adoption")


async def test_a_foreign_subscription_naming_a_billed_org_is_recorded_never_applied(
    stack: LiveStack,
) -> None:
    org_id = create_org(stack.session_factory)
    state = await started(stack, org_id, {BillingStatus.TRIALING})
    ours = (state.stripe_customer_id, state.stripe_subscription_id)

    sub = dashboard_subscription(stack, {"org_id": str(org_id)})
    state = await refused(stack, org_id, sub.id)
    await stack.settled(org_id)

    state = await query_state(stack.client, org_id)
    assert (state.stripe_customer_id, state.stripe_subscription_id) == ours
    assert stripe_ids(stack, org_id) == ours
    assert state.status is BillingStatus.TRIALING
    # A stranger's subscription is no error of the org's billing.
    assert state.last_error is None
    logged = {row.object_id: row for row in event_log(stack, org_id, ADOPTION_REFUSED)}
    assert f"belongs to customer {sub.customer}" in (logged[sub.id].detail or "")
    await capture_history(stack.client, org_workflow_id(org_id), "foreign_subscription_refused")


async def test_an_org_without_a_customer_is_never_handed_one_by_a_webhook(
    stack: LiveStack,
) -> None:
    """Provisioning failed before the customer existed: an event must not fill the gap."""
    org_id = create_org(stack.session_factory)
    with stack.session_factory.begin() as session:
        session.execute(delete(Membership).where(Membership.org_id == org_id))
    state = await started(stack, org_id, {BillingStatus.PROVISIONING_FAILED})
    assert state.last_error is not None and "no owner" in state.last_error

    sub = dashboard_subscription(stack, {"org_id": str(org_id)})
    state = await refused(stack, org_id, sub.id)
    await stack.settled(org_id)

    state = await query_state(stack.client, org_id)
    assert state.status is BillingStatus.PROVISIONING_FAILED
    assert (state.stripe_customer_id, state.stripe_subscription_id) == (None, None)
    assert stripe_ids(stack, org_id) == (None, None)
    refusals = [r for r in state.refused_adoptions if r.subscription_id == sub.id]
    assert refusals and all("no customer yet" in r.reason for r in refusals)
    assert sub.id in {row.object_id for row in event_log(stack, org_id, ADOPTION_REFUSED)}


async def test_a_new_org_never_adopts_another_environments_customer_with_its_org_id(
    stack: LiveStack,
) -> None:
    """Staging shares the Stripe account and has its own org with the same id."""
    org_id = create_org(stack.session_factory)
    staging = {"org_id": str(org_id), "org_uid": str(uuid.uuid4()), "source": "staging"}
    theirs = dashboard_subscription(stack, staging)
    # Staging's events reach this environment's endpoint too; they are not routed.
    unroutable = await eventually(
        lambda: _unroutable(stack),
        lambda rows: any("another environment" in (r.detail or "") for r in rows),
    )
    assert all(r.org_id is None for r in unroutable)

    state = await started(stack, org_id, {BillingStatus.TRIALING})
    await stack.settled(org_id)

    assert state.stripe_customer_id != theirs.customer
    assert state.stripe_subscription_id != theirs.id
    customer = stack.stripe.v1.customers.retrieve(state.stripe_customer_id or "").to_dict()
    assert customer["metadata"]["org_uid"] == stack.org(org_id).uid
    assert customer["metadata"]["source"] == stack.settings.billing_source
    assert stripe_ids(stack, org_id) == (state.stripe_customer_id, state.stripe_subscription_id)
    # Staging's customer keeps its one subscription, untouched.
    subs = stack.stripe.v1.subscriptions.list({"customer": theirs.customer, "status": "all"})
    assert [s.id for s in subs.data] == [theirs.id]
    assert stack.subscription(theirs.id).status == "trialing"


async def _unroutable(stack: LiveStack) -> list[StripeEventLog]:
    with stack.session_factory() as session:
        return list(
            session.scalars(select(StripeEventLog).where(StripeEventLog.outcome == "unroutable"))
        )


async def test_a_restored_row_naming_another_environments_customer_is_refused(
    stack: LiveStack,
) -> None:
    """A database restored from staging: the row names staging's customer; never billed."""
    org_id = create_org(stack.session_factory)
    staging = stack.stripe.v1.customers.create(
        {
            "email": "ops@staging.test",
            "metadata": {"org_id": str(org_id), "org_uid": str(uuid.uuid4()), "source": "staging"},
        }
    )
    with stack.session_factory.begin() as session:
        orgs.save_customer(session, org_id, staging.id)

    state = await started(stack, org_id, {BillingStatus.PROVISIONING_FAILED})

    assert state.last_error is not None and "not provably" in state.last_error
    assert state.stripe_customer_id is None
    [refusal] = state.refused_adoptions
    assert refusal.customer_id == staging.id and refusal.event_id is None
    [row] = event_log(stack, org_id, ADOPTION_REFUSED)
    assert (row.id, row.type, row.object_id) == (
        f"org-{org_id}:{staging.id}:{ADOPTION_REFUSED}",
        "provisioning",
        staging.id,
    )
    subs = stack.stripe.v1.subscriptions.list({"customer": staging.id, "status": "all"})
    assert subs.data == []
    assert stripe_ids(stack, org_id) == (staging.id, None)
