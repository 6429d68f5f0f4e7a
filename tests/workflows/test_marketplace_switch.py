"""An org that moves to a cloud marketplace is never billed in two places.

Its Stripe subscription ends at the end of the period it is in, which gets its
final usage report; moved back before that end, Stripe billing goes on.
"""

from __future__ import annotations

import pytest

from billing.constants import RECONCILE_UPDATE, org_workflow_id
from billing.db import orgs
from billing.db.models import UsageLedger
from billing.domain import BillingStatus, ReconcileResult
from billing.orchestration import RETRY_PROVISIONING, start_org_workflow
from tests.factories.live import LiveStack
from tests.factories.stack import capture_history, eventually, scheduled, wait_for_status
from tests.workflows.test_usage import (
    REQUESTS,
    USERS,
    active,
    at,
    invoice_quantities,
    ledger,
    meter_total,
    period_of,
    record,
)

pytestmark = pytest.mark.asyncio
DAY = 86400


def set_marketplace(stack: LiveStack, org_id: int, aws_account_id: str | None) -> None:
    with stack.session_factory.begin() as session:
        orgs.get_org(session, org_id).aws_account_id = aws_account_id


async def reconcile(stack: LiveStack, org_id: int) -> ReconcileResult:
    """What an operator (or the daily re-sync) does: re-read the org's billing now."""
    handle = stack.client.get_workflow_handle(org_workflow_id(org_id))
    result: ReconcileResult = await handle.execute_update(
        RECONCILE_UPDATE, result_type=ReconcileResult
    )
    return result


async def test_an_org_moved_to_aws_leaves_stripe_at_period_end_with_its_final_usage(
    stack: LiveStack,
) -> None:
    state = await active(stack)
    org_id, sub_id, customer = state.org_id, state.stripe_subscription_id, state.stripe_customer_id
    assert sub_id and customer
    start, end = period_of(stack, sub_id)
    record(stack, org_id, 6, start + DAY)
    set_marketplace(stack, org_id, "123456789012")

    result = await reconcile(stack, org_id)

    sub = stack.subscription(sub_id)
    assert sub.cancel_at_period_end and sub.cancel_at == end
    assert result.status == BillingStatus.ACTIVE  # billed by Stripe until the period's end
    assert stack.org(org_id).subscription_end == at(end)
    record(stack, org_id, 2, end - 600)  # used until the very end: billed too

    await stack.advance(end + 300)

    await wait_for_status(stack.client, org_id, {BillingStatus.CANCELED})

    async def rows() -> list[UsageLedger]:
        return ledger(stack, org_id, start)

    sent = await eventually(
        rows,
        lambda rs: (
            sum(r.value for r in rs if r.dimension == REQUESTS) == 8
            and {r.dimension for r in rs} == {REQUESTS, USERS}
            and all(r.status == "sent" for r in rs)
        ),
    )
    assert all(r.event_timestamp < at(end) for r in sent)
    assert meter_total(stack, customer, REQUESTS, start, end) == 8
    # Stripe bills nothing after the switch: no renewal, no other subscription.
    assert stack.subscription(sub_id).status == "canceled"
    subs = stack.stripe.v1.subscriptions.list({"customer": customer, "status": "all"}).data
    assert [s.id for s in subs] == [sub_id]
    await stack.advance(end + 40 * DAY)
    assert invoice_quantities(stack, sub_id, end) == {}
    again = await reconcile(stack, org_id)
    assert again.differences == [] and again.status == BillingStatus.CANCELED
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "marketplace_switch",
        pick=scheduled("stripe_cancel_at_period_end"),
    )


async def test_moved_back_before_the_period_end_stripe_billing_goes_on(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    _, end = period_of(stack, sub_id)
    set_marketplace(stack, org_id, "123456789012")
    await reconcile(stack, org_id)
    assert stack.subscription(sub_id).cancel_at == end

    set_marketplace(stack, org_id, None)
    await reconcile(stack, org_id)

    sub = stack.subscription(sub_id)
    assert not sub.cancel_at_period_end and sub.cancel_at is None
    await stack.advance(end + 300)
    next_start, _ = period_of(stack, sub_id)
    assert next_start == end and stack.subscription(sub_id).status == "active"
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})


async def test_a_cancel_the_customer_asked_for_is_not_taken_back(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    stack.stripe.v1.subscriptions.update(sub_id, {"cancel_at_period_end": True})
    await stack.settled(org_id)

    await reconcile(stack, org_id)

    assert stack.subscription(sub_id).cancel_at_period_end


async def test_a_fresh_run_of_an_org_moved_to_aws_still_ends_its_live_subscription(
    stack: LiveStack,
) -> None:
    """Moved while no run watched (an operator reset it): the fresh run follows the
    live subscription to its period end instead of calling the org `not_billed`."""
    state = await active(stack)
    org_id, sub_id, customer = state.org_id, state.stripe_subscription_id, state.stripe_customer_id
    assert sub_id and customer
    start, end = period_of(stack, sub_id)
    record(stack, org_id, 5, start + DAY)
    await stack.settled(org_id)
    await stack.client.get_workflow_handle(org_workflow_id(org_id)).terminate("reset")
    set_marketplace(stack, org_id, "123456789012")

    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )

    async def cancel_at() -> int | None:
        when: int | None = stack.subscription(sub_id).cancel_at
        return when

    async def reported() -> float:
        return meter_total(stack, customer, REQUESTS, start, end)

    await eventually(cancel_at, lambda when: when == end)
    fresh = await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    assert fresh.stripe_subscription_id == sub_id
    await stack.advance(end + 300)
    await wait_for_status(stack.client, org_id, {BillingStatus.CANCELED})
    await eventually(reported, lambda n: n == 5)
    subs = stack.stripe.v1.subscriptions.list({"customer": customer, "status": "all"}).data
    assert [s.id for s in subs] == [sub_id]
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "marketplace_fresh_run",
        pick=scheduled("stripe_cancel_at_period_end"),
    )
