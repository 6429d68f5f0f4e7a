"""Stripe's own webhooks, delivered by the emulator over HTTP to the API, keep the
org row equal to Stripe's subscription, whatever the order or repetition."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe
from temporalio.api.enums.v1 import EventType

from billing.constants import (
    ORG_BILLING_WORKFLOW,
    RECONCILE_UPDATE,
    org_workflow_id,
)
from billing.domain import (
    BillingStatus,
    OrgBillingInput,
    OrgBillingState,
    OrgBillingTuning,
    ReconcileResult,
)
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from billing.stripe_gateway import subscription_end_of
from tests.factories.live import LiveStack
from tests.factories.stack import capture_history, create_org, eventually, wait_for_status
from tests.factories.stripe_events import sign_stripe_payload

pytestmark = pytest.mark.asyncio


async def provisioned_org(stack: LiveStack, **kwargs: Any) -> OrgBillingState:
    org_id = create_org(stack.session_factory, **kwargs)
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    return await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})


async def row_matches_stripe(stack: LiveStack, org_id: int, status: str) -> None:
    """Wait until the org row equals Stripe's subscription: status and end date."""

    async def probe() -> tuple[Any, Any]:
        row = stack.org(org_id)
        assert row.stripe_subscription_id
        return row, stack.subscription(row.stripe_subscription_id)

    def same(pair: tuple[Any, Any]) -> bool:
        row, sub = pair
        return bool(
            sub.status == status
            and row.subscription_status == sub.status
            and row.subscription_end == subscription_end_of(sub.to_dict())
        )

    await eventually(probe, same, timeout=30)


async def test_trial_ends_and_a_working_card_makes_the_org_active(stack: LiveStack) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    sub = stack.subscription(state.stripe_subscription_id)

    await stack.advance(sub.trial_end + 2 * 3600)

    await row_matches_stripe(stack, state.org_id, "active")
    sub = stack.subscription(state.stripe_subscription_id)
    row = stack.org(state.org_id)
    assert row.subscription_end == datetime.fromtimestamp(
        sub["items"].data[0].current_period_end, UTC
    )
    await stack.settled(state.org_id)
    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    assert state.trial_will_end_noted_for is not None  # 3 days before the trial end
    await capture_history(stack.client, org_workflow_id(state.org_id), "trial_to_active")


async def test_a_failing_card_makes_the_org_past_due(stack: LiveStack) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id
    stack.attach_card(state.stripe_customer_id, "pm_card_chargeCustomerFail")
    sub = stack.subscription(state.stripe_subscription_id)

    await stack.advance(sub.trial_end + 2 * 3600)

    await row_matches_stripe(stack, state.org_id, "past_due")
    description = await stack.client.get_workflow_handle(org_workflow_id(state.org_id)).describe()
    from billing.search_attributes import BILLING_STATUS_KEY

    await eventually(
        lambda: stack.client.get_workflow_handle(org_workflow_id(state.org_id)).describe(),
        lambda d: d.typed_search_attributes.get(BILLING_STATUS_KEY) == "past_due",
    )
    assert description is not None


async def test_cancel_at_period_end_ends_the_subscription_on_that_date(stack: LiveStack) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    sub = stack.subscription(state.stripe_subscription_id)
    await stack.advance(sub.trial_end + 2 * 3600)
    await row_matches_stripe(stack, state.org_id, "active")

    sub = stack.stripe.v1.subscriptions.update(sub.id, {"cancel_at_period_end": True})
    period_end = sub["items"].data[0].current_period_end
    await row_matches_stripe(stack, state.org_id, "active")
    assert stack.org(state.org_id).subscription_end == datetime.fromtimestamp(period_end, UTC)

    await stack.advance(period_end + 60)
    await row_matches_stripe(stack, state.org_id, "canceled")
    assert stack.org(state.org_id).subscription_end == datetime.fromtimestamp(period_end, UTC)
    await wait_for_status(stack.client, state.org_id, {BillingStatus.CANCELED})


async def test_pause_collection_is_not_paused_but_a_paused_trial_is_and_resumes(
    stack: LiveStack,
) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_subscription_id and state.stripe_customer_id
    sub_id = state.stripe_subscription_id

    stack.stripe.v1.subscriptions.update(sub_id, {"pause_collection": {"behavior": "void"}})
    await eventually(lambda: query_state(stack.client, state.org_id), lambda s: s.pause_collection)
    assert stack.org(state.org_id).subscription_status == "trialing"

    stack.stripe.v1.subscriptions.update(
        sub_id,
        {
            "pause_collection": "",
            "trial_settings": {"end_behavior": {"missing_payment_method": "pause"}},
        },
    )
    await stack.advance(stack.subscription(sub_id).trial_end + 60)
    await row_matches_stripe(stack, state.org_id, "paused")

    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    stack.stripe.v1.subscriptions.resume(sub_id)
    await row_matches_stripe(stack, state.org_id, "active")


async def _histories(stack: LiveStack, org_id: int) -> list[Any]:
    """Every run of the org's workflow (continue-as-new makes several)."""
    runs = [
        wf.run_id
        async for wf in stack.client.list_workflows(f"WorkflowId = '{org_workflow_id(org_id)}'")
    ]
    return [
        await stack.client.get_workflow_handle(org_workflow_id(org_id), run_id=run).fetch_history()
        for run in runs
    ]


async def _fetches(stack: LiveStack, org_id: int) -> int:
    """How many times the workflow re-read a subscription from Stripe, over all runs."""
    return sum(
        1
        for history in await _histories(stack, org_id)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name
        == "stripe_fetch_subscription"
    )


async def _post(stack: LiveStack, event: dict[str, Any]) -> httpx.Response:
    # The SDK turns decimal strings into Decimal; Stripe's JSON has them as strings.
    body = json.dumps(event, default=str).encode()
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        return await http.post(
            "/api/webhooks/stripe",
            content=body,
            headers={
                "Stripe-Signature": sign_stripe_payload(body, stack.settings.stripe_webhook_secret),
                "Content-Type": "application/json",
            },
        )


async def test_shuffled_repeated_and_late_events_converge_and_apply_once(
    stack: LiveStack,
) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    sub = stack.subscription(state.stripe_subscription_id)
    await stack.advance(sub.trial_end + 2 * 3600)
    stack.stripe.v1.subscriptions.update(sub.id, {"cancel_at_period_end": True})
    await stack.settled(state.org_id)
    await row_matches_stripe(stack, state.org_id, "active")

    events = [
        e.to_dict()
        for e in stack.stripe.v1.events.list({"limit": 100}).auto_paging_iter()
        if e.type.startswith(("customer.subscription.", "invoice.payment_"))
    ]
    assert len(events) >= 4
    before = await _fetches(stack, state.org_id)

    # Every event again, twice, in a random order: all were applied once already.
    replayed = events * 2
    random.Random(7).shuffle(replayed)
    for event in replayed:
        assert (await _post(stack, event)).status_code == 200

    await eventually(
        lambda: query_state(stack.client, state.org_id),
        lambda s: all(e["id"] in s.seen_event_ids for e in events),
    )
    assert await _fetches(stack, state.org_id) == before
    await row_matches_stripe(stack, state.org_id, "active")
    assert stack.org(state.org_id).subscription_end == subscription_end_of(
        stack.subscription(sub.id).to_dict()
    )

    # A late, never-seen event older than what was applied changes nothing.
    late = dict(
        events[-1], id=f"evt_late_{uuid.uuid4().hex[:8]}", created=events[-1]["created"] - 600
    )
    assert (await _post(stack, late)).status_code == 200
    await eventually(
        lambda: query_state(stack.client, state.org_id), lambda s: late["id"] in s.seen_event_ids
    )
    assert await _fetches(stack, state.org_id) == before


async def test_a_subscription_made_in_the_dashboard_is_linked_to_its_org(
    stack: LiveStack,
) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_customer_id and state.stripe_subscription_id
    stack.stripe.v1.subscriptions.cancel(state.stripe_subscription_id)
    await row_matches_stripe(stack, state.org_id, "canceled")

    # No org metadata: routed by the customer id the org row holds.
    new = stack.stripe.v1.subscriptions.create(
        {
            "customer": state.stripe_customer_id,
            "items": [{"price": stack.settings.stripe_price_id, "quantity": 1}],
            "trial_period_days": 7,
        }
    )
    await eventually(
        lambda: query_state(stack.client, state.org_id),
        lambda s: s.stripe_subscription_id == new.id,
    )
    await row_matches_stripe(stack, state.org_id, "trialing")


async def test_a_lost_webhook_is_healed_by_the_periodic_resync_and_reconcile(
    stack: LiveStack,
) -> None:
    org_id = create_org(stack.session_factory)
    tuning = OrgBillingTuning(resync_interval_seconds=3)
    await stack.client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning),
        id=org_workflow_id(org_id),
        task_queue=stack.settings.temporal_task_queue,
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_subscription_id
    await stack.settled(org_id)

    # Stripe changes while no webhook can reach us.
    for endpoint in stack.stripe.v1.webhook_endpoints.list().data:
        stack.stripe.v1.webhook_endpoints.delete(endpoint.id)
    cancel_at = stack.clock_time() + 10 * 86400  # before the trial end, so the end moves
    sub = stack.stripe.v1.subscriptions.update(
        state.stripe_subscription_id, {"cancel_at": cancel_at}
    )
    assert sub.cancel_at == cancel_at
    assert stack.org(org_id).subscription_end != datetime.fromtimestamp(cancel_at, UTC)
    await eventually(
        lambda: _row_end(stack, org_id),
        lambda end: end == datetime.fromtimestamp(cancel_at, UTC),
        timeout=20,
    )


async def test_reconcile_applies_what_stripe_changed_and_says_what_differed(
    stack: LiveStack,
) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_subscription_id and state.trial_end
    await stack.settled(state.org_id)
    handle = stack.client.get_workflow_handle(org_workflow_id(state.org_id))
    # Asleep: no event's re-read of Stripe is still under way to see the change first.
    await eventually(lambda: handle.fetch_history(), lambda h: _asleep(h.events))
    for endpoint in stack.stripe.v1.webhook_endpoints.list().data:
        stack.stripe.v1.webhook_endpoints.delete(endpoint.id)
    wanted = stack.clock_time() + 10 * 86400  # before the trial end, so the end moves
    stack.stripe.v1.subscriptions.update(state.stripe_subscription_id, {"cancel_at": wanted})

    result = await handle.execute_update(RECONCILE_UPDATE, result_type=ReconcileResult)

    cancel_at = datetime.fromtimestamp(wanted, UTC)
    assert [(d.field, d.after) for d in result.differences] == [
        ("subscription_end", cancel_at.isoformat())
    ]
    assert stack.org(state.org_id).subscription_end == cancel_at
    again = await handle.execute_update(RECONCILE_UPDATE, result_type=ReconcileResult)
    assert again.differences == []


def _asleep(events: Any) -> bool:
    """The run's last command is its wake timer, and nothing happened after it."""
    return bool(events) and events[-1].event_type == EventType.EVENT_TYPE_TIMER_STARTED


async def _row_end(stack: LiveStack, org_id: int) -> datetime | None:
    return stack.org(org_id).subscription_end


async def test_history_stays_bounded_and_dedupe_survives_continue_as_new(
    stack: LiveStack,
) -> None:
    org_id = create_org(stack.session_factory)
    tuning = OrgBillingTuning(max_history_events=60, seen_events_limit=50)
    handle = await stack.client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning),
        id=org_workflow_id(org_id),
        task_queue=stack.settings.temporal_task_queue,
    )
    first_run = handle.result_run_id
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    sub = stack.subscription(state.stripe_subscription_id or "")
    event = {
        "id": "evt_repeat_me",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": int(datetime.now(UTC).timestamp()) + 10_000,
        "data": {"object": sub.to_dict()},
        "api_version": stripe.api_version,
        "livemode": False,
    }
    for i in range(30):
        fresh = dict(event, id=f"evt_flood_{i}")
        assert (await _post(stack, fresh)).status_code == 200
    assert (await _post(stack, event)).status_code == 200

    async def latest_run() -> str | None:
        return (await stack.client.get_workflow_handle(org_workflow_id(org_id)).describe()).run_id

    await eventually(latest_run, lambda run: run != first_run, timeout=30)
    state = await eventually(
        lambda: query_state(stack.client, org_id), lambda s: "evt_repeat_me" in s.seen_event_ids
    )
    assert len(state.seen_event_ids) <= 50
    # The same event after continue-as-new is still recognised and not applied again.
    await stack.settled(org_id)
    before = await _fetches(stack, org_id)
    assert (await _post(stack, event)).status_code == 200
    await stack.settled(org_id)
    assert await _fetches(stack, org_id) == before
    histories = await _histories(stack, org_id)
    assert len(histories) >= 2
    assert max(len(h.events) for h in histories) < 200


async def test_a_fresh_run_for_a_canceled_org_does_not_subscribe_it_again(
    stack: LiveStack,
) -> None:
    state = await provisioned_org(stack)
    assert state.stripe_subscription_id and state.stripe_customer_id
    stack.stripe.v1.subscriptions.cancel(state.stripe_subscription_id)
    await row_matches_stripe(stack, state.org_id, "canceled")
    await stack.settled(state.org_id)
    # An operator terminates the workflow; the next nudge starts a fresh run.
    await stack.client.get_workflow_handle(org_workflow_id(state.org_id)).terminate("test")

    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, state.org_id, signal=RETRY_PROVISIONING
    )

    fresh = await wait_for_status(stack.client, state.org_id, {BillingStatus.CANCELED})
    assert fresh.stripe_subscription_id == state.stripe_subscription_id
    subs = stack.stripe.v1.subscriptions.list(
        {"customer": state.stripe_customer_id, "status": "all"}
    ).data
    assert [s.id for s in subs] == [state.stripe_subscription_id]


async def test_an_event_dated_far_ahead_cannot_make_later_events_look_stale(
    stack: LiveStack,
) -> None:
    """Test mode accepts events dated in a test clock's future; the workflow caps what
    an event's `created` can do to its watermark at Stripe's own clock."""
    state = await provisioned_org(stack)
    assert state.stripe_subscription_id
    await stack.settled(state.org_id)
    sub = stack.subscription(state.stripe_subscription_id)
    forged = {
        "id": f"evt_far_ahead_{uuid.uuid4().hex[:8]}",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": 2**53,
        "data": {"object": sub.to_dict()},
        "api_version": stripe.api_version,
        "livemode": False,
    }
    assert (await _post(stack, forged)).status_code == 200
    applied = await eventually(
        lambda: query_state(stack.client, state.org_id), lambda s: forged["id"] in s.seen_event_ids
    )
    assert applied.watermarks[sub.id] <= stack.clock_time() + 300

    cancel_at = stack.clock_time() + 10 * 86400
    stack.stripe.v1.subscriptions.update(sub.id, {"cancel_at": cancel_at})

    await eventually(
        lambda: _row_end(stack, state.org_id),
        lambda end: end == datetime.fromtimestamp(cancel_at, UTC),
        timeout=20,
    )
    await stack.settled(state.org_id)
