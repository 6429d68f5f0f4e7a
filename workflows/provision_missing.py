"""`ProvisionMissingOrgs`: run by the `billing-backfill` schedule.

Pages through orgs without billing and starts each org's workflow; the org
workflow does the provisioning, so running this twice changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.db_activities import DbActivities
    from activities.models import OrgPage
    from activities.temporal_activities import OrgStarterActivities
    from billing.constants import PROVISION_MISSING_WORKFLOW
    from billing.domain import BackfillInput, BackfillResult

from workflows.calls import RETRY, db_activity


@workflow.defn(name=PROVISION_MISSING_WORKFLOW)
class ProvisionMissingOrgsWorkflow:
    @workflow.run
    async def run(self, input: BackfillInput) -> BackfillResult:
        after_id, started = input.after_id, input.started
        while True:
            org_ids = await db_activity(
                DbActivities.orgs_without_billing,
                OrgPage(after_id=after_id, limit=input.page_size),
            )
            if not org_ids:
                return BackfillResult(started=started)
            started += await workflow.execute_activity_method(
                OrgStarterActivities.start_org_workflows,
                org_ids,
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RETRY,
            )
            after_id = org_ids[-1]
            if workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(
                    BackfillInput(after_id=after_id, page_size=input.page_size, started=started)
                )
