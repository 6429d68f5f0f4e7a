"""Pure decisions of the org lifecycle the service API drives: changes and closes.

An org whose name or owner changed gets its Stripe customer brought in line
(`org_changed`); a closed org (`close_org`) has its subscription ended as
`ORG_CLOSE_CANCELS` says, and its run finishes once nothing is owed to Stripe.
No I/O here: the workflow asks, these answer, tests call them directly.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from billing.domain import (
        LIVE_SUBSCRIPTION_STATUSES,
        BillingStatus,
        OrgBillingState,
        OrgCloseCancels,
        OrgCloseSignal,
        OrgProfile,
    )

# Statuses in which the org has no Stripe subscription to end.
UNBILLED_STATUSES = frozenset(
    {
        BillingStatus.PROVISIONING,
        BillingStatus.PROVISIONING_FAILED,
        BillingStatus.NOT_BILLED,
        BillingStatus.CLOSED,
    }
)


class CloseStep(Enum):
    """What a closed org's run does next."""

    NONE = "none"  # nothing to end (no live subscription); wait for owed reports
    CANCEL_NOW = "cancel_now"  # final usage report of the period so far, then cancel
    CANCEL_AT_PERIOD_END = "cancel_at_period_end"


def note_close(state: OrgBillingState, close: OrgCloseSignal) -> None:
    """Record the close (the first one counts; a repeated DELETE changes nothing)."""
    if state.closed_at is None:
        state.closed_at = close.closed_at
        state.close_cancels = close.cancels


def has_live_subscription(state: OrgBillingState) -> bool:
    return (
        state.status not in UNBILLED_STATUSES
        and state.stripe_subscription_id is not None
        and state.subscription_status in LIVE_SUBSCRIPTION_STATUSES
    )


def close_step(state: OrgBillingState, cancel_requested_for: str | None) -> CloseStep:
    """The step a closed org owes Stripe now; `cancel_requested_for` is the subscription
    whose end at period end this run already asked for."""
    if state.closed_at is None or not has_live_subscription(state):
        return CloseStep.NONE
    if state.close_cancels == OrgCloseCancels.PERIOD_END:
        if cancel_requested_for == state.stripe_subscription_id:
            return CloseStep.NONE
        return CloseStep.CANCEL_AT_PERIOD_END
    return CloseStep.CANCEL_NOW


def close_finished(state: OrgBillingState) -> bool:
    """A closed org's run is done: no live subscription and no usage report owed."""
    return (
        state.closed_at is not None and not has_live_subscription(state) and not state.to_finalize
    )


def closed_status(state: OrgBillingState) -> BillingStatus:
    """The status a finished close shows: Stripe's (canceled) if it billed, else `closed`."""
    return BillingStatus.CLOSED if state.status in UNBILLED_STATUSES else state.status


def closed_row_status(org: OrgProfile) -> BillingStatus | None:
    """For a closed org's row: the status to end with when nothing of it bills any more
    (never subscribed: `closed`; its subscription ended: that status), else None."""
    if not org.stripe_subscription_id:
        return BillingStatus.CLOSED
    status = org.subscription_status
    if status is not None and status not in LIVE_SUBSCRIPTION_STATUSES:
        return BillingStatus.of(status)
    return None


def before_cancel(now: datetime) -> datetime:
    """The time of the report made just before an immediate cancel (a second earlier)."""
    return now - timedelta(seconds=1)


def customer_target(org: OrgProfile) -> tuple[str, str]:
    """The Stripe customer's name (`"{first} {last} ({org})"`) and email, from the org."""
    return org.customer_name, org.owner_email


def customer_sync_needed(state: OrgBillingState, name: str, email: str) -> bool:
    """Whether the customer must be checked against Stripe: it exists and differs from
    what the last check left (never checked: it may hold what provisioning wrote)."""
    customer_id = state.stripe_customer_id
    if customer_id is None:
        return False
    last = state.customer_sync
    return last is None or (last.customer_id, last.name, last.email) != (customer_id, name, email)
