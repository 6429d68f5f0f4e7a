"""How the API, the CLI and activities hand work to an org's workflow.

There is one way in, `start_org_workflow`, and its options say what happens to
a workflow that is already running: it receives the start signal (signal-with-
start: an event for an org whose workflow does not exist yet, or closed, starts
it, and the event is the first thing it sees), or, without a signal, the
conflict policy decides (leave it alone, or refuse to start). Webhooks use
`deliver_to_org_workflow`: the same outcome, with a plain signal first.
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.service import RPCError, RPCStatusCode

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
        past_due_grace_days=settings.past_due_grace_days,
    )


def _start_attributes(org_id: int) -> TypedSearchAttributes:
    return TypedSearchAttributes([SearchAttributePair(ORG_ID_KEY, str(org_id))])


STATIC_DETAILS = (
    "The one writer of org {org_id}'s billing. What it is doing, and the fix when it "
    "is stuck, is in its current details; `billing orgs show {org_id}` prints the "
    "same. Orgs that need a person: `BillingProblem IS NOT NULL`."
)


@dataclass(frozen=True)
class StartSignal:
    """A signal sent with the start: a running workflow receives it, a new one sees it first."""

    name: str
    args: tuple[object, ...] = ()

    @classmethod
    def stripe_event(cls, event: StripeEventSignal) -> StartSignal:
        """Hand one Stripe event to the org's workflow."""
        return cls(STRIPE_EVENT_SIGNAL, (event,))


# Harmless to a healthy workflow; wakes one that waits after a failed provisioning.
RETRY_PROVISIONING = StartSignal(RETRY_PROVISIONING_SIGNAL)


async def start_org_workflow(
    client: Client,
    task_queue: str,
    org_id: int,
    *,
    signal: StartSignal | None,
    id_conflict_policy: WorkflowIDConflictPolicy = WorkflowIDConflictPolicy.UNSPECIFIED,
    tuning: OrgBillingTuning | None = None,
) -> None:
    """Start the org's workflow unless it runs; returns once Temporal accepted the request.

    With a `signal`, a running workflow receives it (signal-with-start). Without
    one, `id_conflict_policy` decides: `USE_EXISTING` leaves a running workflow
    alone, `UNSPECIFIED` (Temporal's default) refuses to start a second one.
    `tuning` only reaches a workflow this call starts.
    """
    await client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=tuning or OrgBillingTuning()),
        id=org_workflow_id(org_id),
        task_queue=task_queue,
        id_conflict_policy=id_conflict_policy,
        start_signal=signal.name if signal else None,
        start_signal_args=list(signal.args) if signal else [],
        search_attributes=_start_attributes(org_id),
        # Shown by the Temporal UI on the first run (a continue-as-new does not
        # carry it); what the org is doing is in the workflow's current details.
        static_summary=f"Billing of org {org_id}",
        static_details=STATIC_DETAILS.format(org_id=org_id),
    )


async def deliver_to_org_workflow(
    client: Client,
    task_queue: str,
    org_id: int,
    signal: StartSignal,
    *,
    tuning: OrgBillingTuning | None = None,
) -> None:
    """Signal the org's running workflow; when none runs, start it with the signal.

    The same outcome as `start_org_workflow` with a signal, for less: most
    deliveries are for a running workflow, and a plain signal carries no start
    request (input, search attributes, summary) for the client to build and the
    server to weigh. A closed or never started one answers NOT_FOUND, and is
    started with the signal, which a workflow started meanwhile receives too.
    """
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    try:
        await handle.signal(signal.name, args=list(signal.args))
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        await start_org_workflow(client, task_queue, org_id, signal=signal, tuning=tuning)


async def start_provisioning(client: Client, settings: Settings, org_id: int) -> None:
    """Start (or wake) the org's workflow so it provisions now, with this environment's timings.

    What the CLI, `billing dev` and the backfill do for an org without billing:
    a running workflow waiting after a failed provisioning retries at once.
    """
    await start_org_workflow(
        client,
        settings.temporal_task_queue,
        org_id,
        signal=RETRY_PROVISIONING,
        tuning=tuning_of(settings),
    )


async def query_state(client: Client, org_id: int) -> OrgBillingState:
    """The live state of the org's workflow (raises `RPCError` if there is none)."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    state: OrgBillingState = await handle.query(STATE_QUERY, result_type=OrgBillingState)
    return state
