"""Activities that start other workflows (workflows cannot signal-with-start)."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from billing.domain import OrgBillingTuning
from billing.orchestration import start_org_workflow


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
        for index, org_id in enumerate(org_ids):
            await start_org_workflow(
                self._client,
                self._task_queue,
                org_id,
                signal=None,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                tuning=self._tuning,
            )
            activity.heartbeat(index)
        return len(org_ids)
