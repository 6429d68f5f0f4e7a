"""What the console's changes do to Stripe, through the org's workflow.

Closing an org ends its subscription (`ORG_CLOSE_CANCELS`) after the usage it
owes is reported, and the workflow finishes; a renamed org or a new owner
reaches the Stripe customer; marketplace ids set or removed through the API stop
or start Stripe billing at once (no waiting for the daily re-sync).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from billing.constants import org_workflow_id
from billing.domain import BillingStatus, OrgBillingState
from billing.orchestration import query_state
from stripe_emulator.server import EmulatorServer
from tests.factories.service_api import ServiceStack, new_org_id, org_body, service_stack
from tests.factories.stack import capture_history, eventually, scheduled, wait_for_status
from tests.workflows.test_usage import REQUESTS, USERS, at, ledger, meter_total, period_of

pytestmark = pytest.mark.asyncio


async def _svc(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    cancels: str,
) -> AsyncIterator[ServiceStack]:
    async with service_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
        org_close_cancels=cancels,
    ) as live:
        yield live


@pytest_asyncio.fixture
async def svc(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[ServiceStack]:
    args = (temporal_dev_env, emulator, stripe_client, session_factory, database_url)
    async for live in _svc(*args, task_queue, catalog, "immediately"):
        yield live


@pytest_asyncio.fixture
async def svc_period_end(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[ServiceStack]:
    args = (temporal_dev_env, emulator, stripe_client, session_factory, database_url)
    async for live in _svc(*args, task_queue, catalog, "period_end"):
        yield live


async def active_org(svc: ServiceStack, **body: str | None) -> OrgBillingState:
    """An org created through the API, past its trial, with a working card."""
    stack = svc.stack
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body(**body))).status_code == 201  # type: ignore[arg-type]
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id and state.trial_end
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    await stack.settled(org_id)
    await stack.advance(int(state.trial_end.timestamp()) + 2 * 3600)
    state = await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    await stack.settled(org_id)
    return state


async def finished(svc: ServiceStack, org_id: int) -> None:
    handle = svc.stack.client.get_workflow_handle(org_workflow_id(org_id))

    async def status() -> WorkflowExecutionStatus | None:
        return (await handle.describe()).status

    await eventually(status, lambda s: s == WorkflowExecutionStatus.COMPLETED, timeout=60)


async def post_usage(svc: ServiceStack, org_id: int, item_id: str, count: int, at: int) -> str:
    answer = await svc.http.post(
        f"/api/orgs/{org_id}/usage",
        json={
            "items": [
                {"id": item_id, "count": count, "at": datetime.fromtimestamp(at, UTC).isoformat()}
            ]
        },
    )
    assert answer.status_code == 200, answer.text
    outcome: str = answer.json()["items"][0]["outcome"]
    return outcome


# Close ----------------------------------------------------------------------------------


async def test_closing_bills_the_period_so_far_then_cancels_and_finishes(
    svc: ServiceStack,
) -> None:
    stack = svc.stack
    state = await active_org(svc)
    org_id, sub_id, customer = state.org_id, state.stripe_subscription_id, state.stripe_customer_id
    assert sub_id and customer
    start, end = period_of(stack, sub_id)
    now = stack.clock_time()
    assert await post_usage(svc, org_id, "r-1", 9, now - 60) == "recorded"

    closed = await svc.http.delete(f"/api/orgs/{org_id}")
    assert closed.status_code == 202 and closed.json()["cancels"] == "immediately"

    await finished(svc, org_id)
    # Stripe's events about the cancel come after the end: each is seen, none reopens.
    await stack.settled(org_id)
    await finished(svc, org_id)
    sub = stack.subscription(sub_id)
    assert sub.status == "canceled"
    assert all(r.event_timestamp < at(int(sub.ended_at)) for r in ledger(stack, org_id, start))
    rows = ledger(stack, org_id, start)
    assert sum(r.value for r in rows if r.dimension == REQUESTS) == 9
    assert {r.dimension for r in rows} == {REQUESTS, USERS}
    assert all(r.status == "sent" for r in rows)
    assert meter_total(stack, customer, REQUESTS, start, end) == 9
    final = await query_state(stack.client, org_id)
    assert final.status == BillingStatus.CANCELED and final.closed_at is not None
    row = stack.org(org_id)
    assert row.closed_at is not None and row.subscription_status == "canceled"
    # A second DELETE changes nothing; usage is refused.
    again = await svc.http.delete(f"/api/orgs/{org_id}")
    assert again.status_code == 202 and again.json()["closed_at"] == closed.json()["closed_at"]
    assert await post_usage(svc, org_id, "r-2", 1, now) == "rejected"
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "org_close_immediately",
        pick=scheduled("stripe_cancel_subscription"),
    )


async def test_closing_at_period_end_reports_the_whole_period_then_finishes(
    svc_period_end: ServiceStack,
) -> None:
    svc = svc_period_end
    stack = svc.stack
    state = await active_org(svc)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    start, end = period_of(stack, sub_id)
    assert await post_usage(svc, org_id, "r-1", 4, start + 3600) == "recorded"

    assert (await svc.http.delete(f"/api/orgs/{org_id}")).status_code == 202

    async def sub_end() -> object:
        return stack.subscription(sub_id).cancel_at

    await eventually(sub_end, lambda cancel_at: cancel_at == end)
    assert stack.subscription(sub_id).status == "active"  # billed until the period's end

    await stack.advance(end + 300)
    await finished(svc, org_id)
    assert stack.subscription(sub_id).status == "canceled"
    rows = ledger(stack, org_id, start)
    assert sum(r.value for r in rows if r.dimension == REQUESTS) == 4
    assert all(r.status == "sent" for r in rows)


# Customer sync --------------------------------------------------------------------------


async def test_a_rename_and_a_new_owner_reach_the_stripe_customer(svc: ServiceStack) -> None:
    stack = svc.stack
    org_id = new_org_id()
    body = org_body(name="Acme", email="ada@acme.example")
    assert (await svc.put_org(org_id, body)).status_code == 201
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    customer_id = state.stripe_customer_id
    assert customer_id
    assert stack.stripe.v1.customers.retrieve(customer_id).name == "Ada Lovelace (Acme)"

    renamed = body | {"name": "Acme Labs", "owner": body["owner"] | {"last_name": "King"}}
    assert (await svc.put_org(org_id, renamed)).status_code == 200

    async def customer() -> tuple[str | None, str | None]:
        c = stack.stripe.v1.customers.retrieve(customer_id)
        return c.name, c.email

    await eventually(customer, lambda c: c == ("Ada King (Acme Labs)", "ada@acme.example"))
    synced = await query_state(stack.client, org_id)
    assert synced.customer_sync is not None and synced.customer_sync.updated
    assert synced.customer_sync.name == "Ada King (Acme Labs)"

    grace = {"email": "grace@acme.example", "first_name": "Grace", "last_name": "Hopper"}
    owner = await svc.http.put(
        f"/api/orgs/{org_id}/members/u-grace", json=grace | {"role": "owner"}
    )
    assert owner.status_code == 201
    await eventually(customer, lambda c: c == ("Grace Hopper (Acme Labs)", "grace@acme.example"))
    # A repeated PUT sends nothing to Stripe: the workflow is not even signalled.
    before = await query_state(stack.client, org_id)
    assert (await svc.put_org(org_id, renamed | {"owner": grace})).status_code == 200
    after = await query_state(stack.client, org_id)
    assert after.customer_sync == before.customer_sync
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "org_customer_sync",
        pick=scheduled("stripe_sync_customer"),
    )


# Marketplace ids through the API --------------------------------------------------------


async def test_a_marketplace_id_put_ends_stripe_billing_at_period_end_and_back(
    svc: ServiceStack,
) -> None:
    stack = svc.stack
    body = org_body()
    state = await active_org(svc, uid=body["uid"], email=body["owner"]["email"])
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    _, end = period_of(stack, sub_id)

    moved = await svc.put_org(org_id, body | {"aws_account_id": "123456789012"})
    assert moved.status_code == 200 and moved.json()["billing_status"] == "not_billed"

    async def cancel_at() -> object:
        return stack.subscription(sub_id).cancel_at

    await eventually(cancel_at, lambda value: value == end)

    back = await svc.put_org(org_id, body)
    assert back.status_code == 200
    await eventually(cancel_at, lambda value: value is None)
    assert stack.subscription(sub_id).status == "active"


async def test_an_org_leaving_the_marketplace_is_billed_through_stripe(svc: ServiceStack) -> None:
    stack = svc.stack
    org_id = new_org_id()
    body = org_body(aws_account_id="123456789012")
    assert (await svc.put_org(org_id, body)).status_code == 201
    await wait_for_status(stack.client, org_id, {BillingStatus.NOT_BILLED})

    assert (await svc.put_org(org_id, body | {"aws_account_id": None})).status_code == 200

    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_subscription_id
    assert stack.subscription(state.stripe_subscription_id).status == "trialing"


async def test_an_owner_renamed_in_one_org_is_renamed_in_every_org_they_own(
    svc: ServiceStack,
) -> None:
    stack = svc.stack
    first, second = new_org_id(), new_org_id()
    email = "ada@labs.example"
    for org_id, name in ((first, "Labs"), (second, "Works")):
        assert (await svc.put_org(org_id, org_body(name=name, email=email))).status_code == 201
    customers = []
    for org_id in (first, second):
        state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
        assert state.stripe_customer_id
        customers.append(state.stripe_customer_id)

    renamed = {"email": email, "first_name": "Ada", "last_name": "Byron", "role": "owner"}
    answer = await svc.http.put(f"/api/orgs/{first}/members/u-ada", json=renamed)
    assert answer.status_code == 200

    async def names() -> list[str | None]:
        return [stack.stripe.v1.customers.retrieve(c).name for c in customers]

    await eventually(names, lambda n: n == ["Ada Byron (Labs)", "Ada Byron (Works)"])
