"""The pure rules of checkout: which mode an org gets, and whose a completed session is."""

from __future__ import annotations

from typing import Any

import pytest

from activities.models import CheckoutCompletedInput
from api.routes.checkout import BillingFacts, NoCheckout, checkout_mode
from billing.domain import OrgBillingState, OrgProfile, StripeEventSignal, SubscriptionStatus
from billing.stripe_gateway import checkout_problem
from workflows.checkout import checkout_input, is_checkout, needs_resync

ORG = OrgProfile(org_id=7, org_uid="uid-7", name="Acme", owner_email="a@example.com")
S = SubscriptionStatus


def facts(status: SubscriptionStatus | None, **changes: Any) -> BillingFacts:
    values: dict[str, Any] = {
        "customer_id": "cus_1",
        "subscription_id": "sub_1",
        "subscription_status": status,
        "billed_elsewhere": False,
        **changes,
    }
    return BillingFacts(**values)


@pytest.mark.parametrize(
    ("status", "mode"),
    [
        (S.CANCELED, "subscription"),
        (S.INCOMPLETE_EXPIRED, "subscription"),
        (S.TRIALING, "setup"),
        (S.PAUSED, "setup"),
    ],
)
def test_modes(status: SubscriptionStatus, mode: str) -> None:
    assert checkout_mode(facts(status)) == mode


@pytest.mark.parametrize("status", [S.ACTIVE, S.PAST_DUE, S.UNPAID, S.INCOMPLETE, None])
def test_live_or_unknown_subscriptions_get_no_checkout(status: SubscriptionStatus | None) -> None:
    decided = checkout_mode(facts(status))
    assert isinstance(decided, NoCheckout) and "portal" in decided.reason


def test_marketplace_and_unprovisioned_orgs_get_no_checkout() -> None:
    assert isinstance(checkout_mode(facts(S.CANCELED, billed_elsewhere=True)), NoCheckout)
    assert isinstance(checkout_mode(facts(S.CANCELED, customer_id=None)), NoCheckout)
    assert isinstance(checkout_mode(facts(S.TRIALING, subscription_id=None)), NoCheckout)


def session(**changes: Any) -> dict[str, Any]:
    return {
        "id": "cs_test_1",
        "status": "complete",
        "customer": "cus_1",
        "metadata": {"org_id": "7", "org_uid": "uid-7", "source": "prod"},
        **changes,
    }


def test_a_session_is_the_org_s_only_with_its_customer_uid_and_source() -> None:
    assert checkout_problem(session(), ORG, "cus_1", "prod") is None
    assert checkout_problem(session(customer={"id": "cus_1"}), ORG, "cus_1", "prod") is None
    assert "not complete" in str(checkout_problem(session(status="open"), ORG, "cus_1", "prod"))
    assert "customer cus_2" in str(
        checkout_problem(session(customer="cus_2"), ORG, "cus_1", "prod")
    )
    # An org id alone (typed in the dashboard) proves nothing; another environment neither.
    only_id = session(metadata={"org_id": "7"})
    assert "not provably" in str(checkout_problem(only_id, ORG, "cus_1", "prod"))
    assert "not provably" in str(checkout_problem(session(), ORG, "cus_1", "staging"))


def event(**changes: Any) -> StripeEventSignal:
    values: dict[str, Any] = {
        "event_id": "evt_1",
        "type": "checkout.session.completed",
        "created": 1,
        "object_id": "cs_test_1",
        "customer_id": "cus_1",
        "subscription_id": "sub_2",
        **changes,
    }
    return StripeEventSignal(**values)


def test_what_the_workflow_asks_stripe() -> None:
    state = OrgBillingState(org_id=7, stripe_customer_id="cus_1", stripe_subscription_id="sub_1")
    assert is_checkout(event()) and not is_checkout(event(type="invoice.payment_succeeded"))
    asked = checkout_input(state, event(), ORG)
    assert asked == CheckoutCompletedInput(session_id="cs_test_1", org=ORG, customer_id="cus_1")
    assert "cus_9" in str(checkout_input(state, event(customer_id="cus_9"), ORG))
    no_customer = OrgBillingState(org_id=7)
    assert "no customer" in str(checkout_input(no_customer, event(), ORG))
    elsewhere = ORG.model_copy(update={"aws_account_id": "123456789012"})
    assert "marketplace" in str(checkout_input(state, event(), elsewhere))


def test_a_subscription_not_linked_asks_for_a_resync() -> None:
    state = OrgBillingState(org_id=7, stripe_subscription_id="sub_1")
    assert needs_resync(state, "sub_2")
    assert not needs_resync(state, "sub_1")
    assert not needs_resync(state, None)
