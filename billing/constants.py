"""Names shared by the worker, the API, the CLI and the workflows.

Temporal names are public contracts (docs/contracts.md): they live here once and are
imported everywhere else, so they cannot drift between files.
"""

from __future__ import annotations

ORG_BILLING_WORKFLOW = "OrgBilling"
PROVISION_MISSING_WORKFLOW = "ProvisionMissingOrgs"
STRIPE_EVENT_SIGNAL = "stripe_event"
STATE_QUERY = "state"
RETRY_PROVISIONING_SIGNAL = "retry_provisioning"
RESYNC_SIGNAL = "resync"
# The service API's: the org (name, owner, marketplace ids) changed; the org was closed.
ORG_CHANGED_SIGNAL = "org_changed"
CLOSE_ORG_SIGNAL = "close_org"
REPORT_USAGE_UPDATE = "report_usage"
RECONCILE_UPDATE = "reconcile"
BACKFILL_SCHEDULE_ID = "billing-backfill"
BACKFILL_WORKFLOW_ID = "billing-backfill-run"


# Stripe-calling activities run on their own queue so the worker can rate-limit them.
STRIPE_TASK_QUEUE_SUFFIX = "-stripe"


def org_workflow_id(org_id: int) -> str:
    """The one workflow that owns an org's billing state."""
    return f"org-billing-{org_id}"


def stripe_task_queue(task_queue: str) -> str:
    return f"{task_queue}{STRIPE_TASK_QUEUE_SUFFIX}"


HANDLED_EVENT_TYPES = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "checkout.session.completed",
    }
)
