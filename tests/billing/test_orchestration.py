"""The one start function makes exactly the three calls the API, CLI and backfill need."""

from __future__ import annotations

from typing import Any, cast

import pytest
from temporalio.client import Client
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)

from billing.domain import OrgBillingInput, OrgBillingTuning, StripeEventSignal
from billing.orchestration import RETRY_PROVISIONING, StartSignal, start_org_workflow

pytestmark = pytest.mark.asyncio

ORG_ID = 7
QUEUE = "billing"
TUNING = OrgBillingTuning(resync_interval_seconds=60)


class RecordingClient:
    """Stands in for `temporalio.client.Client`: records what would be sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, dict[str, Any]]] = []

    async def start_workflow(self, workflow: str, arg: object, **kwargs: Any) -> None:
        self.calls.append((workflow, arg, kwargs))


def expected(**changes: Any) -> dict[str, Any]:
    """The keyword arguments of a start, with Temporal's defaults where a call sets none."""
    return {
        "id": f"org-billing-{ORG_ID}",
        "task_queue": QUEUE,
        "id_conflict_policy": WorkflowIDConflictPolicy.UNSPECIFIED,
        "start_signal": None,
        "start_signal_args": [],
        "search_attributes": TypedSearchAttributes(
            [SearchAttributePair(SearchAttributeKey.for_keyword("OrgId"), str(ORG_ID))]
        ),
        "static_summary": f"Billing of org {ORG_ID}",
        "static_details": (
            f"The one writer of org {ORG_ID}'s billing. What it is doing, and the fix when it "
            f"is stuck, is in its current details; `billing orgs show {ORG_ID}` prints the "
            "same. Orgs that need a person: `BillingProblem IS NOT NULL`."
        ),
        **changes,
    }


async def _start(**options: Any) -> tuple[str, object, dict[str, Any]]:
    client = RecordingClient()
    await start_org_workflow(cast(Client, client), QUEUE, ORG_ID, **options)
    [call] = client.calls
    return call


async def test_a_stripe_event_is_signalled_with_start() -> None:
    event = StripeEventSignal(event_id="evt_1", type="invoice.paid", created=1, object_id="in_1")
    workflow, arg, kwargs = await _start(signal=StartSignal.stripe_event(event), tuning=TUNING)
    assert workflow == "OrgBilling"
    assert arg == OrgBillingInput(org_id=ORG_ID, tuning=TUNING)
    assert kwargs == expected(start_signal="stripe_event", start_signal_args=[event])


async def test_provisioning_starts_or_retries_a_running_workflow() -> None:
    workflow, arg, kwargs = await _start(signal=RETRY_PROVISIONING)
    assert workflow == "OrgBilling"
    assert arg == OrgBillingInput(org_id=ORG_ID, tuning=OrgBillingTuning())
    assert kwargs == expected(start_signal="retry_provisioning")


async def test_the_backfill_leaves_a_running_workflow_alone() -> None:
    workflow, arg, kwargs = await _start(
        signal=None, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING, tuning=TUNING
    )
    assert workflow == "OrgBilling"
    assert arg == OrgBillingInput(org_id=ORG_ID, tuning=TUNING)
    assert kwargs == expected(id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
