"""`POST /api/payments/stripe/checkout`: a Stripe Checkout link to start paying again, or to
save a card before the trial ends.

Who manages billing (the owner, billing admins) gets one; a plain member gets
403. The mode follows the org's subscription: ended (`canceled`,
`incomplete_expired`) → `subscription` mode with the three prices; `trialing`
→ `setup` mode (a card on file for the trial's end), `paused` (a trial that
ended without a card) → `setup` mode, and the subscription resumes; any other live
subscription → 409, its place is the billing portal. The org's workflow links
what the paid session gave once `checkout.session.completed` arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import stripe
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api import store
from api.deps import (
    BillingManagerDep,
    MetricsDep,
    SessionFactoryDep,
    SettingsDep,
    StripeDep,
    TemporalDep,
)
from api.errors import answer_example, problem, responses, stripe_not_configured
from api.temporal import workflow_state
from billing.config import Settings
from billing.db import orgs
from billing.domain import OrgBillingState, OrgProfile, SubscriptionStatus
from billing.logging import bind_log_context
from billing.stripe_gateway import CheckoutMode

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/payments", tags=["payments"])

# Ended for good: only a new subscription bills the org again.
ENDED_STATUSES = frozenset({SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED})
# A card is what these need: in trial (before it ends), or paused by a trial that
# ended without one (`STRIPE_TRIAL_END_BEHAVIOR=pause`; resumed once it is saved).
SETUP_STATUSES = frozenset({SubscriptionStatus.TRIALING, SubscriptionStatus.PAUSED})
PORTAL = "POST /api/payments/stripe/portal"


class CheckoutSessionPublic(BaseModel):
    """Where to send the owner or billing admin: a Stripe Checkout page."""

    url: str
    mode: CheckoutMode


@dataclass(frozen=True)
class BillingFacts:
    """What decides the checkout mode, from the workflow's state (else the org row)."""

    customer_id: str | None
    subscription_id: str | None
    subscription_status: SubscriptionStatus | None
    billed_elsewhere: bool


@dataclass(frozen=True)
class NoCheckout:
    """Why the org gets no checkout session (the 409's description)."""

    reason: str


def checkout_mode(facts: BillingFacts) -> CheckoutMode | NoCheckout:
    """The session's mode, or why the org gets none."""
    if facts.billed_elsewhere:
        return NoCheckout("The org is billed through a cloud marketplace, not through Stripe.")
    if facts.customer_id is None or facts.subscription_id is None:
        return NoCheckout(
            "The org's billing is not set up yet; its trial starts once it is provisioned."
        )
    if facts.subscription_status in ENDED_STATUSES:
        return "subscription"
    if facts.subscription_status in SETUP_STATUSES:
        return "setup"
    shown = facts.subscription_status.value if facts.subscription_status else "unknown"
    return NoCheckout(
        f"The org has a live subscription (status {shown}); manage it in the billing portal "
        f"({PORTAL})."
    )


def facts_of(state: OrgBillingState | None, profile: OrgProfile, row_status: str) -> BillingFacts:
    if state is not None and state.stripe_customer_id:
        return BillingFacts(
            customer_id=state.stripe_customer_id,
            subscription_id=state.stripe_subscription_id,
            subscription_status=state.subscription_status,
            billed_elsewhere=profile.billed_elsewhere,
        )
    return BillingFacts(
        customer_id=profile.stripe_customer_id,
        subscription_id=profile.stripe_subscription_id,
        subscription_status=SubscriptionStatus(row_status),
        billed_elsewhere=profile.billed_elsewhere,
    )


def _missing_prices(settings: Settings) -> list[str]:
    return [
        name
        for name, value in (
            ("STRIPE_PRICE_ID", settings.stripe_price_id),
            ("STRIPE_USERS_PRICE_ID", settings.stripe_users_price_id),
            ("STRIPE_REQUESTS_PRICE_ID", settings.stripe_requests_price_id),
        )
        if not value
    ]


def _stripe_failed(err: stripe.StripeError) -> HTTPException:
    said = (err.user_message or "no message")[:200]
    return problem(
        status.HTTP_502_BAD_GATEWAY,
        "Stripe request failed",
        f"Stripe could not create a checkout session ({type(err).__name__}: {said}).",
    )


def _profile_and_status(session: Session, org_id: int) -> tuple[OrgProfile, str] | str | None:
    """The org as Stripe knows it and its row's status; None: no such org; text: unbillable."""
    org = orgs.find_org(session, org_id)
    if org is None:
        return None
    try:
        profile = orgs.org_profile(session, org_id)
    except orgs.OrgWithoutOwnerError as err:
        return str(err)
    return profile, org.subscription_status.value


@router.post(
    "/stripe/checkout",
    response_model=CheckoutSessionPublic,
    responses={
        **responses(401, 403, 404, 409, 500, 502, 503),
        **answer_example(
            200,
            "A canceled org subscribes again",
            {"url": "https://checkout.stripe.com/c/pay/cs_test_a1B2c3", "mode": "subscription"},
        ),
    },
    summary="Create a Stripe Checkout session",
)
async def create_checkout_session(
    claims: BillingManagerDep,
    gateway: StripeDep,
    settings: SettingsDep,
    factory: SessionFactoryDep,
    link: TemporalDep,
    metrics: MetricsDep,
) -> CheckoutSessionPublic:
    """A Checkout link for the org named in the caller's token (owner or billing admin)."""
    org_id = claims.org_id
    bind_log_context(org_id=org_id)
    found = await store.read(factory, lambda s: _profile_and_status(s, org_id))
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Org not found")
    if isinstance(found, str):
        raise problem(status.HTTP_409_CONFLICT, "No checkout for this org", found)
    profile, row_status = found
    facts = facts_of(await workflow_state(link, org_id), profile, row_status)
    mode = checkout_mode(facts)
    if isinstance(mode, NoCheckout):
        raise problem(status.HTTP_409_CONFLICT, "No checkout for this org", mode.reason)
    assert facts.customer_id is not None
    missing = _missing_prices(settings) if mode == "subscription" else []
    if missing:
        raise stripe_not_configured(missing)
    try:
        async with metrics.stripe_call("create_checkout_session"):
            url = await gateway.create_checkout_session(profile, facts.customer_id, mode)
    except stripe.InvalidRequestError as err:
        if err.code == "resource_missing" and err.param in (None, "customer"):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, detail="Stripe customer not found"
            ) from None
        log.warning("Stripe refused a checkout session: %s", err.user_message)
        raise _stripe_failed(err) from None
    except stripe.StripeError as err:
        log.warning("Stripe failed a checkout session: %s", type(err).__name__)
        raise _stripe_failed(err) from None
    log.info("checkout session created", extra={"mode": mode})
    return CheckoutSessionPublic(url=url, mode=mode)
