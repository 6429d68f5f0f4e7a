"""Checkout in live-stack tests: an org whose subscription ended, and its owner's token."""

from __future__ import annotations

from sqlalchemy import select

from billing.auth import TokenRules, mint_token
from billing.db.models import Membership
from billing.domain import BillingStatus, MembershipRole, OrgBillingState
from billing.orchestration import RETRY_PROVISIONING, start_org_workflow
from tests.factories.live import LiveStack
from tests.factories.stack import create_org, wait_for_status

CHECKOUT_URL = "/api/payments/stripe/checkout"


def owner_headers(stack: LiveStack, org_id: int) -> dict[str, str]:
    """The org owner's bearer token, as the console would mint it."""
    with stack.session_factory() as session:
        user_id = session.scalars(
            select(Membership.user_id).where(
                Membership.org_id == org_id, Membership.role == MembershipRole.OWNER
            )
        ).one()
    token = mint_token(TokenRules.of(stack.settings), user_id, org_id)
    return {"Authorization": f"Bearer {token}"}


async def trialing_org(stack: LiveStack, **kwargs: str) -> OrgBillingState:
    org_id = create_org(stack.session_factory, **kwargs)
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    return await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})


async def canceled_org(stack: LiveStack, **kwargs: str) -> OrgBillingState:
    """An org whose subscription was canceled in Stripe (the owner left during the trial)."""
    state = await trialing_org(stack, **kwargs)
    assert state.stripe_subscription_id
    stack.stripe.v1.subscriptions.cancel(state.stripe_subscription_id)
    return await wait_for_status(stack.client, state.org_id, {BillingStatus.CANCELED})
