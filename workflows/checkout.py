"""Following a completed Checkout Session: pure rules, called from `OrgBillingWorkflow`.

A `checkout.session.completed` event is only a hint, like every event: the
workflow re-reads the session and links what it gave (a new subscription, or a
card for the trial's end) only when the session is provably the org's (its
customer is the org's own, its metadata names the org's `org_uid` and our
`source`). The new subscription then replaces an ended one under the usual
adoption rule (`decisions.refusal`): never a subscription that still bills.
"""

from __future__ import annotations

from activities.models import CheckoutCompletedInput
from billing.domain import OrgBillingState, OrgProfile, StripeEventSignal

CHECKOUT_COMPLETED = "checkout.session.completed"


def is_checkout(event: StripeEventSignal) -> bool:
    return event.type == CHECKOUT_COMPLETED


def checkout_input(
    state: OrgBillingState, event: StripeEventSignal, org: OrgProfile
) -> CheckoutCompletedInput | str:
    """What to ask Stripe about the session, or why it cannot be the org's (a refusal)."""
    named = f"checkout session {event.object_id}"
    if org.billed_elsewhere:
        return f"{named} not followed: the org is billed through a marketplace"
    if state.stripe_customer_id is None:
        return f"{named} not followed: the org has no customer of its own yet"
    if event.customer_id is not None and event.customer_id != state.stripe_customer_id:
        return (
            f"{named} belongs to customer {event.customer_id}, "
            f"not to this org's {state.stripe_customer_id}"
        )
    return CheckoutCompletedInput(
        session_id=event.object_id, org=org, customer_id=state.stripe_customer_id
    )


def needs_resync(state: OrgBillingState, linked: str | None) -> bool:
    """The session's subscription was not linked: our read of the old one may be behind.

    A re-sync re-reads the org's subscription; if it ended, the customer's live
    one (the session's) takes its place.
    """
    return linked is not None and state.stripe_subscription_id != linked
