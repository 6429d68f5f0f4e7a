"""Activities that start other workflows (workflows cannot signal-with-start)."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from billing.domain import OrgBillingTuning
from billing.orchestration import start_org_workflow

# Starts in flight at once: one at a time, a start's round trip (25 ms idle, over
# 100 ms on a busy machine) made the backfill slower than Stripe's budget lets
# orgs through; a few dozen keep the server busy without flooding it.
STARTS_IN_FLIGHT = 16


class OrgStarterActivities:
    def __init__(
        self, client: Client, task_queue: str, tuning: OrgBillingTuning | None = None
    ) -> None:
        self._client = client
        self._task_queue = task_queue
        self._tuning = tuning

    @activity.defn(name="start_org_workflows")
    async def start_org_workflows(self, org_ids: list[int]) -> int:
        """Start each org's workflow unless it runs already; running ones are left alone."""
        slots = asyncio.Semaphore(STARTS_IN_FLIGHT)
        started = 0

        async def start(org_id: int) -> None:
            nonlocal started
            async with slots:
                await start_org_workflow(
                    self._client,
                    self._task_queue,
                    org_id,
                    signal=None,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    tuning=self._tuning,
                )
            started += 1
            activity.heartbeat(started)

        await asyncio.gather(*(start(org_id) for org_id in org_ids))
        return len(org_ids)
