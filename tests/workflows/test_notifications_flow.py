"""Entitlement and notifications on the live stack: the org's workflow writes the outbox,
the worker's delivery loop sends it to a receiver that verifies every delivery.

Real Temporal, Postgres and the Stripe emulator (webhooks over HTTP to the API).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.auth import TokenRules, mint_token
from billing.constants import org_workflow_id
from billing.db.models import Membership, Notification, NotificationStatus
from billing.domain import BillingStatus
from billing.orchestration import (
    RETRY_PROVISIONING,
    query_state,
    start_org_workflow,
    tuning_of,
)
from stripe_emulator.server import EmulatorServer
from tests.factories.checkout import CHECKOUT_URL, canceled_org, owner_headers
from tests.factories.live import LiveStack, live_stack
from tests.factories.receiver import Receiver
from tests.factories.stack import (
    capture_history,
    create_org,
    eventually,
    scheduled,
    wait_for_status,
)
from tests.factories.stripe_events import sign_stripe_payload

SERVICE_KEY = "svc-test-key-0123456789abcdef0123456789"


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()  # started by the test: the console begins down
    yield r
    r.stop()


@pytest_asyncio.fixture
async def grace_days() -> int:
    return 7


@pytest_asyncio.fixture
async def notify_stack(
    grace_days: int,
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    receiver: Receiver,
) -> AsyncIterator[LiveStack]:
    async with live_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
        billing_notify_url=receiver.url,
        billing_notify_secret=receiver.secret,
        billing_notify_retry_initial_seconds=0.2,
        billing_notify_retry_max_seconds=0.5,
        billing_notify_poll_seconds=0.1,
        billing_service_api_keys=f"other-key-{'0' * 32}, {SERVICE_KEY}",
        past_due_grace_days=grace_days,
    ) as live:
        yield live


def outbox(stack: LiveStack, org_id: int) -> list[Notification]:
    with stack.session_factory() as session:
        return list(
            session.scalars(
                select(Notification)
                .where(Notification.org_id == org_id)
                .order_by(Notification.position)
            )
        )


def owner_of(stack: LiveStack, org_id: int) -> int:
    with stack.session_factory() as session:
        user_id = session.scalar(select(Membership.user_id).where(Membership.org_id == org_id))
        assert user_id is not None
        return user_id


async def entitlement(stack: LiveStack, org_id: int, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        return await http.get(
            f"/api/orgs/{org_id}/entitlement", headers={"Authorization": f"Bearer {token}"}
        )


async def post_event(stack: LiveStack, event: dict[str, Any]) -> None:
    body = json.dumps(event, default=str).encode()
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        response = await http.post(
            "/api/webhooks/stripe",
            content=body,
            headers={
                "Stripe-Signature": sign_stripe_payload(body, stack.settings.stripe_webhook_secret),
                "Content-Type": "application/json",
            },
        )
    assert response.status_code == 200


async def test_notifications_arrive_signed_once_and_in_order_and_entitlement_follows(
    notify_stack: LiveStack, receiver: Receiver
) -> None:
    stack = notify_stack
    org_id = create_org(stack.session_factory)
    await start_org_workflow(
        stack.client,
        stack.settings.temporal_task_queue,
        org_id,
        signal=RETRY_PROVISIONING,
        tuning=tuning_of(stack.settings),
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id and state.stripe_subscription_id

    # The console is down: the first notification is tried again and again; billing goes on.
    await eventually(
        lambda: asyncio.to_thread(outbox, stack, org_id),
        lambda rows: bool(rows) and rows[0].attempts >= 2,
    )
    row = stack.org(org_id)
    assert row.entitled and row.access_until is None

    stack.attach_card(state.stripe_customer_id, "pm_card_chargeCustomerFail")
    sub = stack.subscription(state.stripe_subscription_id)
    await stack.advance(sub.trial_end + 2 * 3600)
    await stack.settled(org_id)
    state = await wait_for_status(stack.client, org_id, {BillingStatus.PAST_DUE})

    # Stripe redelivers the trial notice (the same event), twice.
    trial_notice = next(
        e.to_dict()
        for e in stack.stripe.v1.events.list({"limit": 100}).auto_paging_iter()
        if e.type == "customer.subscription.trial_will_end"
        and e.data.object.id == state.stripe_subscription_id
    )
    await post_event(stack, trial_notice)
    await post_event(stack, trial_notice)
    # And a second notice for the same trial end under a new event id: the event-id
    # dedupe lets it through, the once-per-trial-end key keeps it to one notification.
    again = {**trial_notice, "id": f"{trial_notice['id']}_again"}
    await post_event(stack, again)
    await stack.settled(org_id)
    assert again["id"] in (await query_state(stack.client, org_id)).seen_event_ids

    receiver.start()
    final = await eventually(
        lambda: asyncio.to_thread(outbox, stack, org_id),
        lambda rows: (
            all(r.status is NotificationStatus.DELIVERED for r in rows)
            and any(r.type == "org.billing.payment_failed" for r in rows)
        ),
        timeout=60,
    )
    assert receiver.unverified == []
    accepted = [d for d in receiver.accepted() if d.body["org_id"] == org_id]
    # Every notification arrived, under the id it was written with, in the order written.
    first_arrivals: list[str] = []
    for d in accepted:
        if d.id not in first_arrivals:
            first_arrivals.append(d.id)
    assert first_arrivals == [r.id for r in final]
    # None with two ids: each change went out under one id.
    bodies = [json.dumps({**d.body, "created": None}, sort_keys=True) for d in accepted]
    assert len(set(bodies)) == len(first_arrivals)

    types = [d.body["type"] for d in accepted if d.id in first_arrivals]
    assert types.count("org.billing.trial_will_end") == 1
    assert [r.type for r in final].count("org.billing.trial_will_end") == 1
    assert "org.billing.payment_failed" in types
    statuses = [
        d.body["data"]["status"] for d in accepted if d.body["type"].endswith("status_changed")
    ]
    assert statuses[0] == "trialing" and statuses[-1] == "past_due"
    assert "org.billing.entitlement_changed" not in types  # past due: still in the grace
    # The past-due notice (Stripe may deliver the invoice's failure before or after the
    # subscription's update, so the payment notice can be the last to arrive).
    last = [d.body["data"] for d in accepted if d.body["type"].endswith("status_changed")][-1]
    assert last["status"] == "past_due"
    assert last["entitled"] is True and last["grace_until"] is not None

    # The same answer from the API (member token or service key) and on the row.
    token = mint_token(TokenRules.of(stack.settings), owner_of(stack, org_id), org_id, None)
    for credential in (token, SERVICE_KEY):
        response = await entitlement(stack, org_id, credential)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {
            "entitled",
            "reason",
            "status",
            "access_until",
            "trial_end",
            "grace_until",
        }
        assert answer["entitled"] is True
        assert (answer["status"], answer["reason"]) == ("past_due", "past_due_grace")
        assert answer["grace_until"] == last["grace_until"]
    row = stack.org(org_id)
    assert row.entitled and row.access_until is not None
    assert row.access_until.isoformat().startswith(last["grace_until"][:19])

    other = create_org(stack.session_factory)
    wrong = mint_token(TokenRules.of(stack.settings), owner_of(stack, other), other, None)
    assert (await entitlement(stack, org_id, wrong)).status_code == 403
    assert (await entitlement(stack, org_id, "not-a-key")).status_code == 401

    state = await query_state(stack.client, org_id)
    assert state.pending_notifications == []
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "notifications_past_due",
        pick=scheduled("db_publish_billing"),
    )


async def provisioned(stack: LiveStack) -> tuple[int, str, str]:
    org_id = create_org(stack.session_factory)
    await start_org_workflow(
        stack.client,
        stack.settings.temporal_task_queue,
        org_id,
        signal=RETRY_PROVISIONING,
        tuning=tuning_of(stack.settings),
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id and state.stripe_subscription_id
    return org_id, state.stripe_customer_id, state.stripe_subscription_id


@pytest.mark.parametrize("grace_days", [0])
async def test_no_grace_locks_a_past_due_org_until_it_pays(
    notify_stack: LiveStack, receiver: Receiver
) -> None:
    stack = notify_stack
    # The console refuses the trial notice (a 4xx): recorded failed at once, never retried.
    receiver.answer = lambda body: 410 if body["type"] == "org.billing.trial_will_end" else 200
    receiver.start()
    org_id, customer_id, subscription_id = await provisioned(stack)
    stack.attach_card(customer_id, "pm_card_chargeCustomerFail")
    await stack.advance(stack.subscription(subscription_id).trial_end + 2 * 3600)
    await stack.settled(org_id)
    await wait_for_status(stack.client, org_id, {BillingStatus.PAST_DUE})

    def delivered_types() -> list[str]:
        return [d.body["type"] for d in receiver.accepted() if d.body["org_id"] == org_id]

    async def arrived(kind: str, count: int = 1) -> None:
        await eventually(
            lambda: asyncio.to_thread(delivered_types), lambda ts: ts.count(kind) >= count
        )

    await arrived("org.billing.entitlement_changed")
    locked = [d for d in receiver.accepted() if d.body["type"].endswith("entitlement_changed")]
    assert locked[-1].body["data"]["entitled"] is False
    assert locked[-1].body["data"]["previous_entitled"] is True
    assert locked[-1].body["data"]["reason"] == "past_due_grace_over"
    assert not stack.org(org_id).entitled
    response = await entitlement(stack, org_id, SERVICE_KEY)
    assert (response.json()["entitled"], response.json()["reason"]) == (
        False,
        "past_due_grace_over",
    )

    # The customer pays with a working card: paid, active, entitled again.
    stack.attach_card(customer_id, "pm_card_visa")
    invoice = stack.subscription(subscription_id).latest_invoice
    await asyncio.to_thread(stack.stripe.v1.invoices.pay, str(invoice))
    await stack.settled(org_id)
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    await arrived("org.billing.payment_succeeded", 2)
    await arrived("org.billing.entitlement_changed", 2)
    # The trial's first ($0) invoice counted as paid too; the one paid now comes after the failure.
    types = delivered_types()
    last_paid = len(types) - 1 - types[::-1].index("org.billing.payment_succeeded")
    assert types.index("org.billing.payment_failed") < last_paid
    assert stack.org(org_id).entitled and stack.org(org_id).access_until is None
    final = await eventually(
        lambda: asyncio.to_thread(outbox, stack, org_id),
        lambda rows: all(r.status is not NotificationStatus.PENDING for r in rows),
    )
    refused = [r for r in final if r.status is NotificationStatus.FAILED]
    assert [(r.type, r.attempts, r.last_status_code) for r in refused] == [
        ("org.billing.trial_will_end", 1, 410)
    ]
    # The others delivered once each, in the order written, the refused one not holding them.
    ids = [d.id for d in receiver.accepted() if d.body["org_id"] == org_id]
    assert ids == [r.id for r in final if r.status is NotificationStatus.DELIVERED]
    tried = [d.id for d in receiver.deliveries if d.body["org_id"] == org_id]
    assert tried.count(refused[0].id) == 1


async def test_a_canceled_org_paying_at_checkout_is_notified_active_and_entitled(
    notify_stack: LiveStack, receiver: Receiver
) -> None:
    stack = notify_stack
    receiver.start()
    state = await canceled_org(stack)
    org_id = state.org_id

    def delivered() -> list[dict[str, Any]]:
        return [d.body for d in receiver.accepted() if d.body["org_id"] == org_id]

    def is_lockout(body: dict[str, Any]) -> bool:
        return body["type"] == "org.billing.entitlement_changed" and (
            body["data"]["entitled"] is False
        )

    # Its access over, the console was told before the owner pays.
    await eventually(lambda: asyncio.to_thread(delivered), lambda bs: any(map(is_lockout, bs)))
    before = await entitlement(stack, org_id, SERVICE_KEY)
    assert (before.json()["entitled"], before.json()["status"]) == (False, "canceled")
    seen = len(delivered())

    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        session = await http.post(CHECKOUT_URL, headers=owner_headers(stack, org_id))
        assert session.status_code == 200, session.text
        paid = await http.post(
            session.json()["url"], data={"cardNumber": "4242424242424242", "billingName": "Ada"}
        )
    assert paid.status_code == 303, paid.text
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    await stack.settled(org_id)

    def changes() -> list[dict[str, Any]]:
        return [b for b in delivered()[seen:] if b["type"].endswith("_changed")]

    after = await eventually(
        lambda: asyncio.to_thread(changes),
        lambda bs: {b["type"] for b in bs}
        >= {"org.billing.status_changed", "org.billing.entitlement_changed"},
    )
    assert receiver.unverified == []
    statuses = [
        (b["data"]["previous_status"], b["data"]["status"], b["data"]["entitled"])
        for b in after
        if b["type"] == "org.billing.status_changed"
    ]
    assert statuses == [("canceled", "active", True)]
    entitlements = [
        (b["data"]["previous_entitled"], b["data"]["entitled"], b["data"]["reason"])
        for b in after
        if b["type"] == "org.billing.entitlement_changed"
    ]
    assert entitlements == [(False, True, "active")]
    await eventually(
        lambda: asyncio.to_thread(outbox, stack, org_id),
        lambda rows: all(r.status is NotificationStatus.DELIVERED for r in rows),
    )
