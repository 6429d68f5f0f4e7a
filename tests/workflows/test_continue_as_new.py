"""A signal to a run whose history is too long leads to continue-as-new at once.

The event is applied first thing in the next run, not after the run's next
timer (up to a day away, or an hour in the provisioning-failed wait).

The workflow runs on the dev server with small fake activities (production
names), so each run's history is the same from one start to the next: a first
workflow measures the history of an idle run, and a second one gets that as its
`max_history_events`, so the signal is what pushes its history over the bound.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import (
    FetchSubscriptionInput,
    MarkSentInput,
    PlanUsageInput,
    PublishInput,
    SaveSubscriptionInput,
    UsagePlan,
)
from billing.constants import (
    ORG_BILLING_WORKFLOW,
    STATE_QUERY,
    STRIPE_EVENT_SIGNAL,
    stripe_task_queue,
)
from billing.domain import (
    BillingStatus,
    FieldDifference,
    OrgBillingInput,
    OrgBillingState,
    OrgBillingTuning,
    OrgProfile,
    StripeEventSignal,
    SubscriptionSnapshot,
    SubscriptionStatus,
)
from tests.factories.stack import capture_history, eventually, scheduled
from workflows import ALL_WORKFLOWS

pytestmark = pytest.mark.asyncio


def fake_activities(
    *, provisioning_fails: bool
) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    @activity.defn(name="db_load_org")
    async def load_org(org_id: int) -> OrgProfile:
        if provisioning_fails:
            raise ApplicationError("Org has no owner", type="OrgWithoutOwner", non_retryable=True)
        return OrgProfile(org_id=org_id, org_uid="u", name="Acme", owner_email="a@x.test")

    @activity.defn(name="db_save_subscription")
    async def save_subscription(data: SaveSubscriptionInput) -> list[FieldDifference]:
        return []

    @activity.defn(name="db_plan_usage")
    async def plan_usage(data: PlanUsageInput) -> UsagePlan:
        return UsagePlan(events=[], users=1, requests=0)

    @activity.defn(name="db_mark_usage_sent")
    async def mark_usage_sent(data: MarkSentInput) -> None:
        return None

    @activity.defn(name="db_publish_billing")
    async def publish_billing(data: PublishInput) -> int:
        return len(data.notifications)

    @activity.defn(name="stripe_fetch_subscription")
    async def fetch_subscription(data: FetchSubscriptionInput) -> SubscriptionSnapshot | None:
        return None  # nothing to apply: the event is only seen

    return [load_org, save_subscription, plan_usage, mark_usage_sent, publish_billing], [
        fetch_subscription
    ]


def billed_state(org_id: int, now: datetime) -> OrgBillingState:
    """An active org that re-synced just now: its run sleeps for a day."""
    return OrgBillingState(
        org_id=org_id,
        status=BillingStatus.ACTIVE,
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        subscription_status=SubscriptionStatus.ACTIVE,
        current_period_start=now - timedelta(days=1),
        current_period_end=now + timedelta(days=20),
        last_synced_at=now,
    )


async def idle_history_length(client: Client, workflow_id: str) -> int:
    """The length of the run's history once it sleeps (nothing left to do)."""

    async def length() -> int:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        return len(history.events)

    # Settled: the same length twice in a row, a second apart.
    seen: list[int] = []

    async def steady() -> list[int]:
        seen.append(await length())
        return seen[-2:]

    last = await eventually(
        steady, lambda pair: len(pair) == 2 and pair[0] == pair[1] > 3, interval=1.0
    )
    return last[-1]


async def latest_state(client: Client, workflow_id: str) -> OrgBillingState:
    state: OrgBillingState = await client.get_workflow_handle(workflow_id).query(
        STATE_QUERY, result_type=OrgBillingState
    )
    return state


@pytest.mark.parametrize("provisioning_fails", [False, True], ids=["billed", "provisioning_failed"])
async def test_a_signal_past_the_history_bound_continues_as_new_and_is_applied(
    temporal_dev_env: WorkflowEnvironment, provisioning_fails: bool
) -> None:
    client = temporal_dev_env.client
    queue = f"can-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)

    def start_input(org_id: int, max_history_events: int) -> OrgBillingInput:
        tuning = OrgBillingTuning(max_history_events=max_history_events)
        if provisioning_fails:
            state = OrgBillingState(org_id=org_id, status=BillingStatus.PROVISIONING_FAILED)
        else:
            state = billed_state(org_id, now)
        return OrgBillingInput(org_id=org_id, state=state, tuning=tuning)

    db, stripe_side = fake_activities(provisioning_fails=provisioning_fails)
    async with (
        Worker(client, task_queue=queue, workflows=ALL_WORKFLOWS, activities=db),
        Worker(client, task_queue=stripe_task_queue(queue), activities=stripe_side),
    ):
        measured = f"{queue}-measure"
        await client.start_workflow(
            ORG_BILLING_WORKFLOW, start_input(1, 10_000), id=measured, task_queue=queue
        )
        idle = await idle_history_length(client, measured)
        await client.get_workflow_handle(measured).terminate("measured")

        workflow_id = f"{queue}-org"
        handle = await client.start_workflow(
            ORG_BILLING_WORKFLOW, start_input(2, idle + 1), id=workflow_id, task_queue=queue
        )
        first_run = handle.result_run_id
        assert await idle_history_length(client, workflow_id) == idle
        event = StripeEventSignal(
            event_id="evt_after_the_bound",
            type="customer.subscription.updated",
            created=int(now.timestamp()),
            object_id="sub_1",
        )

        await handle.signal(STRIPE_EVENT_SIGNAL, event)

        settled = BillingStatus.PROVISIONING_FAILED if provisioning_fails else BillingStatus.ACTIVE
        await eventually(
            lambda: latest_state(client, workflow_id),
            lambda s: "evt_after_the_bound" in s.seen_event_ids and s.status == settled,
            timeout=15,
        )
        description = await client.get_workflow_handle(workflow_id).describe()
        assert description.run_id != first_run
        name = "signal_past_bound_" + ("provisioning_failed" if provisioning_fails else "billed")
        await capture_history(client, workflow_id, f"{name}_woken", run_id=first_run)
        await capture_history(
            client, workflow_id, f"{name}_applied", pick=scheduled("stripe_fetch_subscription")
        )
        await client.get_workflow_handle(workflow_id).terminate("done")
