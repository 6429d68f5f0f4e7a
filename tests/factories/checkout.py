"""Checkout in live-stack tests: an org whose subscription ended, and its owner's token."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from billing.auth import TokenRules, mint_token
from billing.db.models import Membership
from billing.domain import BillingStatus, MembershipRole, OrgBillingState
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from tests.factories.live import LiveStack
from tests.factories.stack import create_org, eventually, wait_for_status

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
    """An org whose subscription was canceled in Stripe during the trial, its access over.

    A subscription canceled during its trial keeps access until the trial's end
    (docs/entitlement.md), weeks after the test clock's time. So the trial is
    first moved to end a second after the clock's time, which the wall clock
    (what the entitlement is decided with) has already passed, and only then
    canceled: the org is `canceled` and no longer entitled.
    """
    state = await trialing_org(stack, **kwargs)
    subscription_id = state.stripe_subscription_id
    assert subscription_id
    trial_end = stack.clock_time() + 1
    stack.stripe.v1.subscriptions.update(subscription_id, {"trial_end": trial_end})
    await eventually(
        lambda: query_state(stack.client, state.org_id),
        lambda s: (
            s.current_period_end is not None
            and int(s.current_period_end.timestamp()) == trial_end
        ),
    )
    stack.stripe.v1.subscriptions.cancel(subscription_id)
    canceled = await wait_for_status(stack.client, state.org_id, {BillingStatus.CANCELED})
    while time.time() <= trial_end:
        await asyncio.sleep(0.1)
    return canceled
