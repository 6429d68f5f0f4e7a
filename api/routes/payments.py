"""`POST /api/payments/stripe/portal`: a Stripe billing portal link, for who manages billing.

The portal changes the card, shows invoices and cancels the subscription, so
only the org's owner and its billing admins get one; a plain member gets 403.
"""

from __future__ import annotations

import logging

import stripe
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from api import store
from api.deps import (
    BillingManagerDep,
    MetricsDep,
    SessionFactoryDep,
    SettingsDep,
    StripeDep,
    TemporalDep,
)
from api.errors import answer_example, problem, responses
from api.temporal import TemporalLink, workflow_state
from billing.db import orgs
from billing.logging import bind_log_context

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/payments", tags=["payments"])

CUSTOMER_NOT_FOUND = "Stripe customer not found"


class PortalSessionPublic(BaseModel):
    """Where to send the member: a short-lived Stripe billing portal session."""

    url: str


async def _customer_id(
    link: TemporalLink, factory: store.SessionFactory, org_id: int
) -> str | None:
    """The workflow knows first (it created the customer); the row catches up after."""
    state = await workflow_state(link, org_id)
    if state is not None and state.stripe_customer_id:
        return state.stripe_customer_id
    org = await store.read(factory, lambda s: orgs.find_org(s, org_id))
    return org.stripe_customer_id if org is not None else None


def _stripe_failed(err: stripe.StripeError) -> HTTPException:
    said = (err.user_message or "no message")[:200]
    return problem(
        status.HTTP_502_BAD_GATEWAY,
        "Stripe request failed",
        f"Stripe could not create a billing portal session ({type(err).__name__}: {said}).",
    )


@router.post(
    "/stripe/portal",
    response_model=PortalSessionPublic,
    responses={
        **responses(401, 403, 404, 500, 502, 503),
        **answer_example(
            200,
            "The portal of the org's customer",
            {"url": "https://billing.stripe.com/p/session/test_YWNjdF8xTjJ"},
        ),
    },
    summary="Create a Stripe billing portal session",
)
async def create_portal_session(
    claims: BillingManagerDep,
    gateway: StripeDep,
    settings: SettingsDep,
    factory: SessionFactoryDep,
    link: TemporalDep,
    metrics: MetricsDep,
) -> PortalSessionPublic:
    """A billing portal link for the org named in the caller's token (owner or billing admin)."""
    bind_log_context(org_id=claims.org_id)
    customer_id = await _customer_id(link, factory, claims.org_id)
    if customer_id is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=CUSTOMER_NOT_FOUND)
    try:
        async with metrics.stripe_call("create_portal_link"):
            url = await gateway.create_portal_link(
                customer_id, return_url=settings.stripe_portal_return_url
            )
    except stripe.InvalidRequestError as err:
        if err.code == "resource_missing" and err.param in (None, "customer"):
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=CUSTOMER_NOT_FOUND) from None
        log.warning("Stripe refused a portal session: %s", err.user_message)
        raise _stripe_failed(err) from None
    except stripe.StripeError as err:
        log.warning("Stripe failed a portal session: %s", type(err).__name__)
        raise _stripe_failed(err) from None
    return PortalSessionPublic(url=url)
