"""`GET /api/orgs/{org_id}/billing`: an org's billing as its members may see it.

Members get a public view: status, the dates that matter to them, and the
usage of the current period so far. The workflow's full state (Stripe ids,
raw Stripe errors, watermarks, event ids) is for operators, who read it with
`billing orgs show` or the workflow's `state` query in the Temporal UI.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api import store
from api.deps import ClaimsDep, OrgIdPath, SessionFactoryDep, TemporalDep, require_member
from api.errors import answer_example, forbidden, responses
from api.temporal import workflow_state
from billing.db import orgs
from billing.db.models import Org
from billing.domain import BillingStatus, OrgBillingState, row_billing_status
from billing.logging import bind_log_context

router = APIRouter(prefix="/api/orgs", tags=["orgs"])



class UsageSoFarPublic(BaseModel):
    """What the org used in its current billing period, from its start until `as_of`."""

    users: int = Field(description="Members of the org now (the users meter is a level)")
    requests: int = Field(description="Requests recorded since the period started")
    as_of: datetime


class OrgBillingPublic(BaseModel):
    """An org's billing for its members: no Stripe ids, raw errors or bookkeeping.

    `source` is `workflow` for live state, `database` when the workflow could
    not answer (not started yet, no worker, Temporal down): then only the
    row's status and subscription end are known.
    """

    org_id: int
    status: BillingStatus
    subscription_end: datetime | None = None
    trial_end: datetime | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    usage: UsageSoFarPublic | None = Field(
        default=None, description="Usage of the current period so far; null when it is not known"
    )
    source: Literal["workflow", "database"]


def _from_row(org: Org) -> OrgBillingPublic:
    return OrgBillingPublic(
        org_id=org.id,
        status=row_billing_status(
            billed_elsewhere=org.billed_elsewhere,
            stripe_subscription_id=org.stripe_subscription_id,
            subscription_status=org.subscription_status,
        ),
        subscription_end=org.subscription_end,
        source="database",
    )


def _usage_so_far(
    session: Session, org_id: int, start: datetime, end: datetime
) -> UsageSoFarPublic:
    now = datetime.now(UTC)
    until = min(now, end)
    return UsageSoFarPublic(
        users=orgs.member_count(session, org_id),
        requests=orgs.request_total(session, org_id, since=start, until=until),
        as_of=until,
    )


async def _from_state(factory: store.SessionFactory, state: OrgBillingState) -> OrgBillingPublic:
    start, end = state.current_period_start, state.current_period_end
    usage = None
    if start is not None and end is not None:
        usage = await store.read(factory, lambda s: _usage_so_far(s, state.org_id, start, end))
    return OrgBillingPublic(
        org_id=state.org_id,
        status=state.status,
        subscription_end=state.subscription_end,
        trial_end=state.trial_end,
        current_period_start=start,
        current_period_end=end,
        usage=usage,
        source="workflow",
    )


@router.get(
    "/{org_id}/billing",
    response_model=OrgBillingPublic,
    responses={
        **responses(401, 403, 404, 500, 503),
        **answer_example(
            200,
            "An org in its first paid month",
            {
                "org_id": 42,
                "status": "active",
                "subscription_end": "2027-03-01T09:15:00Z",
                "trial_end": "2027-01-30T09:15:00Z",
                "current_period_start": "2027-01-30T09:15:00Z",
                "current_period_end": "2027-03-01T09:15:00Z",
                "usage": {"users": 3, "requests": 1250, "as_of": "2027-02-10T12:00:00Z"},
                "source": "workflow",
            },
        ),
    },
    summary="Read an org's billing (public view for its members)",
)
async def read_org_billing(
    org_id: OrgIdPath, claims: ClaimsDep, factory: SessionFactoryDep, link: TemporalDep
) -> OrgBillingPublic:
    """The org's live billing from its workflow, or from its row when the workflow cannot answer."""
    # The token's org is compared first, so a caller learns nothing about other orgs.
    if claims.org_id != org_id:
        raise forbidden("This token is not valid for this organization")
    bind_log_context(org_id=org_id)
    # Membership before existence: a token for an org that does not exist gets
    # the same 403 here as on every other route.
    await require_member(factory, claims)
    org = await store.read(factory, lambda s: orgs.find_org(s, org_id))
    if org is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Organization not found")
    state = await workflow_state(link, org_id)
    if state is None:
        return _from_row(org)
    return await _from_state(factory, state)
