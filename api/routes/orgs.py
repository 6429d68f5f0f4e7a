"""`GET /api/orgs/{org_id}/billing`: an org's billing state, for its members."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, status

from api import store
from api.deps import ClaimsDep, SessionFactoryDep, TemporalDep, require_member
from api.errors import forbidden, responses
from api.temporal import workflow_state
from billing.db import orgs
from billing.db.models import Org
from billing.domain import OrgBillingState, row_billing_status
from billing.logging import bind_log_context

router = APIRouter(prefix="/api/orgs", tags=["orgs"])

OrgId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The org's id")]


class OrgBillingPublic(OrgBillingState):
    """The workflow's `state`, plus where it came from.

    `source` is `workflow` for live state, `database` when the workflow could
    not answer (not started yet, no worker, Temporal down): then only the
    row's fields are filled in.
    """

    source: Literal["workflow", "database"]


def _state_from_row(org: Org) -> OrgBillingPublic:
    return OrgBillingPublic(
        org_id=org.id,
        status=row_billing_status(
            billed_elsewhere=org.billed_elsewhere,
            stripe_subscription_id=org.stripe_subscription_id,
            subscription_status=org.subscription_status,
        ),
        stripe_customer_id=org.stripe_customer_id,
        stripe_subscription_id=org.stripe_subscription_id,
        subscription_status=org.subscription_status,
        subscription_end=org.subscription_end,
        source="database",
    )


@router.get(
    "/{org_id}/billing",
    response_model=OrgBillingPublic,
    responses=responses(401, 403, 404, 500, 503),
    summary="Read an org's billing state",
)
async def read_org_billing(
    org_id: OrgId, claims: ClaimsDep, factory: SessionFactoryDep, link: TemporalDep
) -> OrgBillingPublic:
    """The org workflow's live state, or the database row when the workflow cannot answer."""
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
        return _state_from_row(org)
    return OrgBillingPublic.model_validate({**state.model_dump(), "source": "workflow"})
