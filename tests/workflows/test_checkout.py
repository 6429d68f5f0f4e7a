"""Checkout end to end: the API makes the session, the emulator's page is paid, Stripe's
`checkout.session.completed` reaches the workflow, which links what the session gave."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.constants import REPORT_USAGE_UPDATE, org_workflow_id
from billing.domain import BillingStatus, UsageReportResult
from billing.orchestration import query_state
from stripe_emulator.server import EmulatorServer
from tests.factories.checkout import CHECKOUT_URL, canceled_org, owner_headers, trialing_org
from tests.factories.live import LiveStack, live_stack
from tests.factories.stack import capture_history, eventually, wait_for_status

pytestmark = pytest.mark.asyncio

VISA = "4242424242424242"


async def checkout(stack: LiveStack, org_id: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        answer = await http.post(CHECKOUT_URL, headers=owner_headers(stack, org_id))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def entitlement(stack: LiveStack, org_id: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        answer = await http.get(
            f"/api/orgs/{org_id}/entitlement", headers=owner_headers(stack, org_id)
        )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def pay(url: str) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, data={"cardNumber": VISA, "billingName": "Ada"})
    assert answer.status_code == 303, answer.text


async def test_canceled_org_pays_through_checkout_and_is_billed_again(stack: LiveStack) -> None:
    state = await canceled_org(stack)
    old = state.stripe_subscription_id
    before = await entitlement(stack, state.org_id)
    assert (before["entitled"], before["reason"]) == (False, "canceled"), before

    session = await checkout(stack, state.org_id)
    assert session["mode"] == "subscription"
    await pay(session["url"])

    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    assert state.stripe_subscription_id and state.stripe_subscription_id != old
    sub = stack.subscription(state.stripe_subscription_id)
    assert sub.status == "active" and sub.customer == state.stripe_customer_id
    assert sub.to_dict()["metadata"]["org_id"] == str(state.org_id)
    row = stack.org(state.org_id)
    assert row.stripe_subscription_id == sub.id and row.subscription_status == "active"
    live = [
        s
        for s in stack.stripe.v1.subscriptions.list({"customer": sub.customer, "status": "all"})
        if s.status not in ("canceled", "incomplete_expired")
    ]
    assert [s.id for s in live] == [sub.id]
    after = await entitlement(stack, state.org_id)
    assert (after["entitled"], after["reason"]) == (True, "active"), after
    # Usage is reported into the new subscription's period.
    handle = stack.client.get_workflow_handle(org_workflow_id(state.org_id))
    report = await handle.execute_update(REPORT_USAGE_UPDATE, result_type=UsageReportResult)
    assert report.skipped_reason is None
    assert [int(p.period_start.timestamp()) for p in report.periods] == [
        sub["items"].data[0].current_period_start
    ]
    await stack.settled(state.org_id)
    await capture_history(stack.client, org_workflow_id(state.org_id), "checkout_resubscribed")


async def test_trialing_org_saves_a_card_that_pays_when_the_trial_ends(stack: LiveStack) -> None:
    state = await trialing_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id

    session = await checkout(stack, state.org_id)
    assert session["mode"] == "setup"
    await pay(session["url"])

    def default_card() -> str | None:
        customer = stack.stripe.v1.customers.retrieve(str(state.stripe_customer_id))
        settings = customer.invoice_settings
        return str(settings.default_payment_method) if settings else None

    async def probe() -> str | None:
        return default_card()

    await eventually(probe, lambda card: bool(card and card != "None"))
    await stack.settled(state.org_id)
    sub = stack.subscription(state.stripe_subscription_id)
    await stack.advance(sub.trial_end + 2 * 3600)
    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    assert state.stripe_subscription_id == sub.id
    await stack.settled(state.org_id)
    await capture_history(stack.client, org_workflow_id(state.org_id), "checkout_card_for_trial")


async def test_a_session_of_another_org_is_refused(stack: LiveStack) -> None:
    """A session paid for the org's customer but made for another org is recorded, not linked."""
    state = await canceled_org(stack)
    other = await trialing_org(stack, name="Other")
    assert state.stripe_customer_id
    session = stack.stripe.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "customer": state.stripe_customer_id,
            "line_items": [{"price": stack.settings.stripe_price_id, "quantity": 1}],
            "metadata": {"org_id": str(state.org_id), "org_uid": "someone-else"},
            "success_url": "https://example.com/ok",
        }
    )
    await pay(str(session.url))

    after = await eventually(
        lambda: query_state(stack.client, state.org_id),
        lambda s: any("checkout session" in r.reason for r in s.refused_adoptions),
    )
    assert any("not provably" in r.reason for r in after.refused_adoptions)
    assert other.org_id != state.org_id


@pytest_asyncio.fixture
async def pausing_stack(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[LiveStack]:
    """The live stack with `STRIPE_TRIAL_END_BEHAVIOR=pause`."""
    async with live_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
        stripe_trial_end_behavior="pause",
    ) as live:
        yield live


async def test_a_trial_paused_without_a_card_resumes_once_one_is_saved(
    pausing_stack: LiveStack,
) -> None:
    stack = pausing_stack
    state = await trialing_org(stack)
    assert state.stripe_subscription_id
    sub = stack.subscription(state.stripe_subscription_id)
    assert sub.trial_settings.end_behavior.missing_payment_method == "pause"
    await stack.advance(sub.trial_end + 2 * 3600)
    await wait_for_status(stack.client, state.org_id, {BillingStatus.PAUSED})

    session = await checkout(stack, state.org_id)
    assert session["mode"] == "setup"
    await pay(session["url"])

    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    assert state.stripe_subscription_id == sub.id
    resumed = stack.subscription(sub.id)
    assert resumed.status == "active"
    assert resumed["items"].data[0].current_period_start == stack.clock_time()
    await stack.settled(state.org_id)
    await capture_history(stack.client, org_workflow_id(state.org_id), "checkout_resumes_paused")
