"""How the API, the CLI and activities hand work to an org's workflow.

Always signal-with-start: an event for an org whose workflow does not exist yet
(or closed) starts it, and the event is the first thing it sees.
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)

from billing.config import Settings
from billing.constants import (
    ORG_BILLING_WORKFLOW,
    RETRY_PROVISIONING_SIGNAL,
    STATE_QUERY,
    STRIPE_EVENT_SIGNAL,
    org_workflow_id,
)
from billing.domain import OrgBillingInput, OrgBillingState, OrgBillingTuning, StripeEventSignal
from billing.search_attributes import ORG_ID_KEY


def tuning_of(settings: Settings) -> OrgBillingTuning:
    """The timings a new org workflow starts with (it carries them across its runs)."""
    return OrgBillingTuning(
        resync_interval_seconds=settings.resync_interval_seconds,
        usage_lead_seconds=settings.usage_report_lead_seconds,
        usage_grace_seconds=settings.usage_report_grace_seconds,
    )


def _start_attributes(org_id: int) -> TypedSearchAttributes:
    return TypedSearchAttributes([SearchAttributePair(ORG_ID_KEY, str(org_id))])


async def signal_stripe_event(
    client: Client,
    task_queue: str,
    org_id: int,
    event: StripeEventSignal,
    *,
    tuning: OrgBillingTuning | None = None,
) -> None:
    """Durably hand one Stripe event to the org's workflow (returns once accepted)."""
    await client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning or OrgBillingTuning()),
        id=org_workflow_id(org_id),
        task_queue=task_queue,
        start_signal=STRIPE_EVENT_SIGNAL,
        start_signal_args=[event],
        search_attributes=_start_attributes(org_id),
    )


async def ensure_org_workflow(
    client: Client, task_queue: str, org_id: int, *, tuning: OrgBillingTuning | None = None
) -> None:
    """Start the org's workflow if it is not running; a running one is left alone.

    The retry signal is harmless to a healthy workflow and wakes one that is
    waiting after a failed provisioning.
    """
    await client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning or OrgBillingTuning()),
        id=org_workflow_id(org_id),
        task_queue=task_queue,
        start_signal=RETRY_PROVISIONING_SIGNAL,
        search_attributes=_start_attributes(org_id),
    )


async def start_org_workflow(
    client: Client, task_queue: str, org_id: int, *, tuning: OrgBillingTuning | None = None
) -> None:
    """Start the org's workflow if none is running; a running one is not touched."""
    await client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning or OrgBillingTuning()),
        id=org_workflow_id(org_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=_start_attributes(org_id),
    )


async def query_state(client: Client, org_id: int) -> OrgBillingState:
    """The live state of the org's workflow (raises `RPCError` if there is none)."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    state: OrgBillingState = await handle.query(STATE_QUERY, result_type=OrgBillingState)
    return state
