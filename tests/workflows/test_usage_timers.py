"""The usage timers of `OrgBilling` on the time-skipping server: a month in seconds.

A unit test of the workflow class alone: its activities are small fakes with the
production names, so only the workflow's own timing decisions are under test
(the real activities are covered against Postgres and the emulator elsewhere).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.models import (
    EnsureSubscriptionInput,
    FetchSubscriptionInput,
    MarkSentInput,
    OwnCustomer,
    PlanUsageInput,
    PublishInput,
    SaveCustomerInput,
    SaveSubscriptionInput,
    UsagePlan,
)
from billing.constants import ORG_BILLING_WORKFLOW, STATE_QUERY, stripe_task_queue
from billing.domain import (
    FieldDifference,
    OrgBillingInput,
    OrgBillingState,
    OrgBillingTuning,
    OrgProfile,
    SubscriptionSnapshot,
    SubscriptionStatus,
)
from workflows import ALL_WORKFLOWS

pytestmark = pytest.mark.asyncio
DAY = timedelta(days=1)


class FakeBilling:
    """Stripe renews the subscription at each period end; reports are recorded."""

    def __init__(self, start: datetime) -> None:
        self.periods = [(start, start + 30 * DAY)]
        self.reports: list[tuple[datetime, datetime]] = []  # (period_start, report_time)

    def snapshot(self) -> SubscriptionSnapshot:
        """Stripe's view at the (skipped) time the activity was scheduled."""
        now = activity.info().scheduled_time
        while self.periods[-1][1] <= now:
            end = self.periods[-1][1]
            self.periods.append((end, end + 31 * DAY))
        start, end = self.periods[-1]
        return SubscriptionSnapshot(
            id="sub_1",
            customer_id="cus_1",
            status=SubscriptionStatus.ACTIVE,
            subscription_end=end,
            trial_end=None,
            current_period_start=start,
            current_period_end=end,
        )

    def activities(self) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
        @activity.defn(name="db_load_org")
        async def load_org(org_id: int) -> OrgProfile:
            return OrgProfile(org_id=org_id, org_uid="u", name="Acme", owner_email="a@x.test")

        @activity.defn(name="db_save_customer")
        async def save_customer(data: SaveCustomerInput) -> None:
            return None

        @activity.defn(name="db_save_subscription")
        async def save_subscription(data: SaveSubscriptionInput) -> list[FieldDifference]:
            return []

        @activity.defn(name="db_plan_usage")
        async def plan_usage(data: PlanUsageInput) -> UsagePlan:
            self.reports.append((data.period_start, data.report_time))
            return UsagePlan(events=[], users=1, requests=0)

        @activity.defn(name="db_mark_usage_sent")
        async def mark_usage_sent(data: MarkSentInput) -> None:
            return None

        @activity.defn(name="db_publish_billing")
        async def publish_billing(data: PublishInput) -> int:
            return len(data.notifications)

        @activity.defn(name="stripe_own_customer")
        async def own_customer(org: OrgProfile) -> OwnCustomer:
            return OwnCustomer(customer_id="cus_1")

        @activity.defn(name="stripe_ensure_subscription")
        async def ensure_subscription(data: EnsureSubscriptionInput) -> SubscriptionSnapshot:
            return self.snapshot()

        @activity.defn(name="stripe_fetch_subscription")
        async def fetch_subscription(data: FetchSubscriptionInput) -> SubscriptionSnapshot:
            return self.snapshot()

        db: list[Callable[..., Any]] = [
            load_org,
            save_customer,
            save_subscription,
            plan_usage,
            mark_usage_sent,
            publish_billing,
        ]
        stripe_side: list[Callable[..., Any]] = [
            own_customer,
            ensure_subscription,
            fetch_subscription,
        ]
        return db, stripe_side


async def test_reports_before_the_end_after_it_and_continues_as_new_per_period(
    temporal_env: WorkflowEnvironment,
) -> None:
    client = temporal_env.client
    queue = f"timers-{uuid.uuid4().hex[:8]}"
    start = (await temporal_env.get_current_time()).astimezone(UTC)
    fake = FakeBilling(start)
    db, stripe_side = fake.activities()
    tuning = OrgBillingTuning(
        usage_lead_seconds=3600, usage_grace_seconds=300, resync_interval_seconds=86400
    )
    async with (
        Worker(client, task_queue=queue, workflows=ALL_WORKFLOWS, activities=db),
        Worker(client, task_queue=stripe_task_queue(queue), activities=stripe_side),
    ):
        handle = await client.start_workflow(
            ORG_BILLING_WORKFLOW,
            OrgBillingInput(org_id=1, tuning=tuning),
            id=f"org-billing-timers-{queue}",
            task_queue=queue,
        )
        first_run = handle.result_run_id
        await temporal_env.sleep(30 * DAY + timedelta(hours=2))
        state = await handle.query(STATE_QUERY, result_type=OrgBillingState)
        description = await handle.describe()

    period_start, period_end = fake.periods[0]
    times = [t for s, t in fake.reports if s == period_start]
    # One report in the hour before the end, one just after it (within the grace).
    assert any(period_end - timedelta(hours=1) <= t < period_end for t in times), times
    assert any(t >= period_end for t in times), times
    assert len(times) == 2
    # The new period was read, and the workflow continued as new into it.
    assert state.current_period_start == fake.periods[1][0]
    assert description.run_id != first_run
