"""Errors time cannot fix are no reason to lose usage or drop an event.

A rotated or restricted key (Stripe's 401/403) or a meter that is not
configured makes Stripe refuse every try; the workflow keeps retrying on a short
backoff with the problem in its state and in the `BillingProblem` search
attribute, so once a person fixes it the period's usage still makes its invoice.
An event whose processing failed is kept unseen and retried the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import ClassVar

import pytest
import stripe
from temporalio import activity
from temporalio.api.enums.v1 import EventType

from activities.db_activities import DbActivities
from activities.errors import stripe_errors_classified
from activities.models import FetchSubscriptionInput, MeterEventToSend, PlanUsageInput
from activities.stripe_activities import StripeActivities
from billing.config import Settings
from billing.constants import org_workflow_id
from billing.domain import (
    BillingProblem,
    BillingStatus,
    OrgBillingState,
    OrgBillingTuning,
    SubscriptionSnapshot,
)
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from billing.problems import problem_help
from billing.search_attributes import BILLING_PROBLEM_KEY
from billing.stripe_gateway import MeterOutcome, StripeGateway, make_stripe_client
from tests.factories.live import LiveStack
from tests.factories.stack import (
    capture_history,
    counted,
    create_org,
    current_details,
    eventually,
    wait_for_status,
)
from tests.workflows.test_usage import (
    REQUESTS,
    USERS,
    at,
    invoice_quantities,
    ledger,
    meter_total,
    period_of,
    record,
)

pytestmark = pytest.mark.asyncio

# Short backoffs, so retries happen within the test.
TUNING = OrgBillingTuning(
    usage_retry_initial_seconds=1,
    usage_retry_max_seconds=2,
    event_retry_initial_seconds=1,
    event_retry_max_seconds=2,
)


def revoked_key() -> stripe.StripeError:
    return stripe.AuthenticationError("Invalid API Key provided: rk_live_****abcd", http_status=401)


def restricted_key() -> stripe.StripeError:
    return stripe.PermissionError(
        "The provided key does not have the required permissions for this endpoint.",
        http_status=403,
    )


def missing_meter() -> stripe.StripeError:
    return stripe.InvalidRequestError(  # type: ignore[no-untyped-call]
        "No active meter found for event_name 'additional_requests'.",
        param="event_name",
        code="resource_missing",
        http_status=400,
    )


class Misconfigured(StripeActivities):
    """Stripe refuses what `failing` names until a person fixes it (the test clears it)."""

    failing: ClassVar[dict[str, stripe.StripeError | None]] = {}

    @activity.defn(name="stripe_send_meter_event")
    @stripe_errors_classified
    async def send_meter_event(self, event: MeterEventToSend) -> MeterOutcome:
        if error := self.failing.get("send"):
            raise error
        return await super().send_meter_event(event)

    @activity.defn(name="stripe_fetch_subscription")
    @stripe_errors_classified
    async def fetch_subscription(self, data: FetchSubscriptionInput) -> SubscriptionSnapshot | None:
        if error := self.failing.get("fetch"):
            raise error
        return await super().fetch_subscription(data)


def misconfigured(settings: Settings) -> StripeActivities:
    Misconfigured.failing.clear()
    client = make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base)
    return Misconfigured(StripeGateway(client, settings), settings)


async def active_org(stack: LiveStack) -> OrgBillingState:
    """An org past its trial, its workflow started with short retry backoffs."""
    org_id = create_org(stack.session_factory)
    await start_org_workflow(
        stack.client,
        stack.settings.temporal_task_queue,
        org_id,
        signal=RETRY_PROVISIONING,
        tuning=TUNING,
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id and state.trial_end
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    await stack.advance(int(state.trial_end.timestamp()) + 2 * 3600)
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    await stack.settled(org_id)
    # The trial's final report is made: what the test breaks next is the new period's.
    return await eventually(
        lambda: query_state(stack.client, org_id),
        lambda s: bool(s.usage) and not s.to_finalize and s.usage[-1].last_reported_at is not None,
    )


async def shown_problem(stack: LiveStack, org_id: int) -> str | None:
    description = await stack.client.get_workflow_handle(org_workflow_id(org_id)).describe()
    return description.typed_search_attributes.get(BILLING_PROBLEM_KEY)


async def listed(stack: LiveStack, query: str) -> set[str]:
    """Workflow ids a visibility query finds (how operators find orgs with a problem)."""
    return {wf.id async for wf in stack.client.list_workflows(query)}


@pytest.mark.stripe_activities.with_args(misconfigured)
@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (revoked_key, BillingProblem.STRIPE_AUTH),
        (restricted_key, BillingProblem.STRIPE_AUTH),
        (missing_meter, BillingProblem.USAGE_REPORT_FAILING),
    ],
    ids=["401", "403", "config"],
)
async def test_a_refused_final_report_keeps_retrying_and_makes_the_invoice_once_fixed(
    stack: LiveStack, error: Callable[[], stripe.StripeError], problem: BillingProblem
) -> None:
    state = await active_org(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    start, end = period_of(stack, sub_id)
    record(stack, org_id, 9, start + 86400)
    Misconfigured.failing["send"] = error()

    await stack.advance(end + 300)  # the period ends; its final report is refused

    refused = await eventually(
        lambda: query_state(stack.client, org_id), lambda s: s.usage_problem == problem
    )
    assert refused.last_error and refused.last_error.startswith("usage report:")
    assert refused.to_finalize and refused.to_finalize[0].start == datetime.fromtimestamp(
        start, UTC
    )
    await eventually(lambda: shown_problem(stack, org_id), lambda shown: shown == problem.value)
    details = await current_details(stack.client, org_id)
    assert f"**{problem.value}** — fix: {problem_help(problem).fix_for(org_id)}" in details
    assert "last error: usage report:" in details
    await eventually(
        lambda: listed(stack, f"BillingProblem = '{problem.value}'"),
        lambda ids: org_workflow_id(org_id) in ids,
    )
    # Retried again and again meanwhile, never paused for an hour.
    await eventually(
        lambda: query_state(stack.client, org_id), lambda s: s.usage_failures >= 3, timeout=20
    )

    Misconfigured.failing.clear()  # a person rotates the key in the settings / adds the meter

    async def rows() -> list[tuple[str, int, str]]:
        return [(r.dimension, r.value, r.status) for r in ledger(stack, org_id, start)]

    await eventually(rows, lambda rs: rs == [(REQUESTS, 9, "sent"), (USERS, 1, "sent")])
    healed = await eventually(
        lambda: query_state(stack.client, org_id),
        lambda s: s.usage_problem is None and s.problem is None,
    )
    assert healed.last_error is None and healed.usage_failures == 0
    await eventually(lambda: shown_problem(stack, org_id), lambda shown: shown is None)
    assert "problem" not in await current_details(stack.client, org_id)
    await eventually(
        lambda: listed(stack, "BillingProblem IS NOT NULL"),
        lambda ids: org_workflow_id(org_id) not in ids,
    )
    # The invoice finalizes an hour after the period's end, with the usage on it.
    await stack.advance(end + 2 * 3600)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 9}
    if error is revoked_key:
        await capture_history(
            stack.client,
            org_workflow_id(org_id),
            "usage_refused_then_fixed",
            pick=counted(EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED),
        )


async def test_a_report_left_pending_behind_stripes_clock_is_sent_once_the_clock_is_read(
    stack: LiveStack,
) -> None:
    """A report planned early in a period lost its send with the worker; by the time it
    is sent, Stripe's clock is 35 days past its timestamp but not past the period.

    Stripe refuses the old timestamp: the workflow re-reads Stripe's clock and sends
    the same rows again, moved into the window, so the period is billed, not stuck.
    """
    state = await active_org(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    customer_id = state.stripe_customer_id
    assert sub_id and customer_id
    start, end = period_of(stack, sub_id)
    record(stack, org_id, 7, start + 600)
    await stack.worker.stop()
    planned = DbActivities(stack.session_factory, stack.settings).plan_usage(
        PlanUsageInput(
            org_id=org_id,
            customer_id=customer_id,
            period_start=at(start),
            period_end=at(end),
            report_time=at(start + 3600),
        )
    )
    assert {e.timestamp for e in planned.events} == {at(start + 3600)}
    await stack.advance(end + 3600)
    await stack.advance(end + 10 * 86400)
    await stack.worker.start()

    async def rows() -> list[tuple[str, int, str]]:
        return [(r.dimension, r.value, r.status) for r in ledger(stack, org_id, start)]

    await eventually(rows, lambda rs: rs == [(REQUESTS, 7, "sent"), (USERS, 1, "sent")])
    assert [r.identifier for r in ledger(stack, org_id, start)] == sorted(
        e.identifier for e in planned.events
    )
    assert meter_total(stack, customer_id, REQUESTS, start, end) == 7
    healed = await eventually(
        lambda: query_state(stack.client, org_id),
        lambda s: not s.to_finalize and s.usage_problem is None,
    )
    assert healed.last_error is None
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "usage_refused_stripe_clock",
        pick=counted(EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED),
    )


@pytest.mark.stripe_activities.with_args(misconfigured)
async def test_an_event_that_failed_is_kept_visible_and_applied_once_stripe_answers(
    stack: LiveStack,
) -> None:
    state = await active_org(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    Misconfigured.failing["fetch"] = restricted_key()
    cancel_at = stack.clock_time() + 10 * 86400

    stack.stripe.v1.subscriptions.update(sub_id, {"cancel_at": cancel_at})

    failed = await eventually(
        lambda: query_state(stack.client, org_id), lambda s: bool(s.failed_events)
    )
    [kept] = failed.failed_events
    assert kept.key == sub_id and "403" in kept.error
    assert kept.event.event_id not in failed.seen_event_ids
    assert failed.problem is BillingProblem.EVENT_FAILED
    await eventually(lambda: shown_problem(stack, org_id), lambda shown: shown == "event_failed")
    await eventually(
        lambda: listed(stack, "BillingProblem = 'event_failed'"),
        lambda ids: org_workflow_id(org_id) in ids,
    )
    assert "**event_failed** — fix: " in await current_details(stack.client, org_id)
    assert stack.org(org_id).subscription_end != datetime.fromtimestamp(cancel_at, UTC)

    Misconfigured.failing.clear()

    applied = await eventually(
        lambda: query_state(stack.client, org_id),
        lambda s: not s.failed_events and kept.event.event_id in s.seen_event_ids,
    )
    assert applied.last_error is None and applied.problem is None
    assert stack.org(org_id).subscription_end == datetime.fromtimestamp(cancel_at, UTC)
    await eventually(lambda: shown_problem(stack, org_id), lambda shown: shown is None)
    assert "problem" not in await current_details(stack.client, org_id)
    await eventually(
        lambda: listed(stack, "BillingProblem IS NOT NULL"),
        lambda ids: org_workflow_id(org_id) not in ids,
    )
    await capture_history(stack.client, org_workflow_id(org_id), "event_failed_then_applied")
