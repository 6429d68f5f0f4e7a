"""`GET /api/orgs/{org_id}/entitlement`: whether the org may use the product, and why.

One rule decides (billing/entitlement.py; the table in docs/entitlement.md),
applied to the org workflow's live state, or to the org row (`entitled`,
`access_until`, written by the workflow) when the workflow cannot answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status

from api import store
from api.deps import OrgIdPath, SessionFactoryDep, SettingsDep, TemporalDep, get_org_reader
from api.errors import responses
from api.temporal import workflow_state
from billing import entitlement
from billing.db import orgs
from billing.domain import row_billing_status
from billing.entitlement import Entitlement
from billing.logging import bind_log_context

router = APIRouter(prefix="/api/orgs", tags=["orgs"])



def _json_examples(**named: tuple[str, Any]) -> dict[str, Any]:
    examples = {
        name: {"summary": summary, "value": value} for name, (summary, value) in named.items()
    }
    return {"content": {"application/json": {"examples": examples}}}


# Copies of the shared entries, so the examples stay on this route.
ANSWERS: dict[int | str, dict[str, Any]] = {
    code: dict(entry) for code, entry in responses(401, 403, 404, 500, 503).items()
}
ANSWERS[200] = _json_examples(
    trialing=(
        "In its trial",
        {
            "entitled": True,
            "reason": "trialing",
            "status": "trialing",
            "access_until": None,
            "trial_end": "2026-12-14T12:00:00Z",
            "grace_until": None,
        },
    ),
    grace=(
        "Past due, within the grace",
        {
            "entitled": True,
            "reason": "past_due_grace",
            "status": "past_due",
            "access_until": "2026-12-08T12:00:00Z",
            "trial_end": None,
            "grace_until": "2026-12-08T12:00:00Z",
        },
    ),
)
ANSWERS[401] |= _json_examples(
    missing=("No token and no service key", {"detail": "Missing bearer token"}),
)
ANSWERS[404] |= _json_examples(org=("No such org", {"detail": "Organization not found"}))


@router.get(
    "/{org_id}/entitlement",
    response_model=Entitlement,
    responses=ANSWERS,
    summary="Whether an org is entitled to the product (member token or service key)",
    dependencies=[Depends(get_org_reader)],
)
async def read_entitlement(
    org_id: OrgIdPath, settings: SettingsDep, factory: SessionFactoryDep, link: TemporalDep
) -> Entitlement:
    """`entitled` and its `reason`, the billing `status`, and the dates that bound access."""
    bind_log_context(org_id=org_id)
    org = await store.read(factory, lambda s: orgs.find_org(s, org_id))
    if org is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Organization not found")
    now = datetime.now(UTC)
    grace_days = settings.past_due_grace_days
    state = await workflow_state(link, org_id)
    if state is not None:
        return entitlement.of_state(state, now, grace_days)
    return entitlement.of_row(
        row_billing_status(
            billed_elsewhere=org.billed_elsewhere,
            stripe_subscription_id=org.stripe_subscription_id,
            subscription_status=org.subscription_status,
        ),
        access_until=org.access_until,
        subscription_end=org.subscription_end,
        now=now,
        grace_days=grace_days,
    )
