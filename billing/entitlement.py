"""Whether an org may use the product: one rule, for the API, the workflow and the row.

Pure code: the answer depends only on what the org's workflow knows and on
`now`, which is always a parameter. docs/entitlement.md has the same rule as a
table, one row per status.

- `trialing`, `active`: entitled.
- `past_due`: entitled for `grace_days` after the first failed payment
  (`payment_failed_at`, kept by the workflow); `grace_until` says until when.
- `canceled`: entitled until the paid period ends (`access_until`).
- `not_billed` (billed through a cloud marketplace): entitled.
- `unpaid`, `paused`, `incomplete_expired`: not entitled.
- `incomplete`: entitled; Stripe expires an unpaid first invoice within a day
  (then `incomplete_expired`).
- `provisioning`, `provisioning_failed`: entitled, and the reason says billing
  is not set up: a billing fault never locks customers out.
- `closed` (the console closed the org, and Stripe never billed it): not entitled.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel

from billing.domain import BillingStatus, OrgBillingState

DEFAULT_GRACE_DAYS = 7


class EntitlementReason(StrEnum):
    """Why an org is (or is not) entitled: one code per case of the rule."""

    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE_GRACE = "past_due_grace"
    PAST_DUE_GRACE_OVER = "past_due_grace_over"
    CANCELED_PAID_PERIOD = "canceled_paid_period"
    CANCELED = "canceled"
    NOT_BILLED = "not_billed"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    UNPAID = "unpaid"
    PAUSED = "paused"
    # Flagged: billing is not set up yet, or setting it up failed (needs a person).
    PROVISIONING = "provisioning"
    PROVISIONING_FAILED = "provisioning_failed"
    # The console closed the org (`DELETE /api/orgs/{org_id}`).
    CLOSED = "closed"


# Reasons that grant access while billing itself is not in order: a console may
# show them to operators (the org is entitled only so a fault never locks it out).
FLAGGED_REASONS = frozenset({EntitlementReason.PROVISIONING, EntitlementReason.PROVISIONING_FAILED})


class Entitlement(BaseModel):
    """The answer of `GET /api/orgs/{org_id}/entitlement` (docs/contracts.md).

    `access_until`: when access ends unless something changes (a past-due grace
    or a canceled org's paid period running out); None when open-ended.
    `grace_until`: the end of a past-due grace; None outside one.
    """

    entitled: bool
    reason: EntitlementReason
    status: BillingStatus
    access_until: datetime | None = None
    trial_end: datetime | None = None
    grace_until: datetime | None = None


def grace_end(payment_failed_at: datetime | None, now: datetime, grace_days: int) -> datetime:
    """The end of the past-due grace: `grace_days` after the first failed payment.

    A failure not recorded (a run from before it was kept) counts from `now`.
    """
    return (payment_failed_at or now) + timedelta(days=grace_days)


def decide(
    status: BillingStatus,
    *,
    now: datetime,
    grace_days: int = DEFAULT_GRACE_DAYS,
    trial_end: datetime | None = None,
    current_period_end: datetime | None = None,
    subscription_end: datetime | None = None,
    payment_failed_at: datetime | None = None,
) -> Entitlement:
    """The rule (see the module's docstring and docs/entitlement.md)."""
    reason: EntitlementReason
    entitled = True
    access_until: datetime | None = None
    grace_until: datetime | None = None
    if status is BillingStatus.TRIALING or status is BillingStatus.ACTIVE:
        # A scheduled cancel changes nothing yet: once it takes effect the
        # subscription is canceled, and the paid period still counts.
        reason = EntitlementReason(status.value)
    elif status is BillingStatus.PAST_DUE:
        grace_until = grace_end(payment_failed_at, now, grace_days)
        access_until = grace_until
        entitled = now < grace_until
        reason = (
            EntitlementReason.PAST_DUE_GRACE if entitled else EntitlementReason.PAST_DUE_GRACE_OVER
        )
    elif status is BillingStatus.CANCELED:
        ends = [e for e in (current_period_end, subscription_end) if e is not None]
        access_until = max(ends) if ends else None
        entitled = access_until is not None and now < access_until
        reason = EntitlementReason.CANCELED_PAID_PERIOD if entitled else EntitlementReason.CANCELED
    elif status in (
        BillingStatus.UNPAID,
        BillingStatus.PAUSED,
        BillingStatus.INCOMPLETE_EXPIRED,
        BillingStatus.CLOSED,
    ):
        entitled = False
        reason = EntitlementReason(status.value)
    else:
        # not_billed, incomplete, provisioning, provisioning_failed
        reason = EntitlementReason(status.value)
    return Entitlement(
        entitled=entitled,
        reason=reason,
        status=status,
        access_until=access_until,
        trial_end=trial_end,
        grace_until=grace_until,
    )


def next_change(entitlement: Entitlement, now: datetime) -> datetime | None:
    """When the answer changes by time alone (a grace or paid period ending), if it will."""
    until = entitlement.access_until
    if entitlement.entitled and until is not None and until > now:
        return until
    return None


def of_state(state: OrgBillingState, now: datetime, grace_days: int) -> Entitlement:
    """The rule applied to what an org's workflow knows (with the grace it decides with)."""
    return decide(
        state.status,
        now=now,
        grace_days=grace_days if state.past_due_grace_days is None else state.past_due_grace_days,
        trial_end=state.trial_end,
        current_period_end=state.current_period_end,
        subscription_end=state.subscription_end,
        payment_failed_at=state.payment_failed_at,
    )


def of_row(
    status: BillingStatus,
    *,
    access_until: datetime | None,
    subscription_end: datetime | None,
    now: datetime,
    grace_days: int,
) -> Entitlement:
    """The rule applied to an org row (when its workflow cannot answer).

    The row keeps what the workflow last published: `access_until` is the end
    of a past-due grace (so the first failure was `grace_days` before it) or
    of a canceled org's paid period.
    """
    failed_at = None
    if status is BillingStatus.PAST_DUE and access_until is not None:
        failed_at = access_until - timedelta(days=grace_days)
    return decide(
        status,
        now=now,
        grace_days=grace_days,
        current_period_end=access_until if status is BillingStatus.CANCELED else None,
        subscription_end=subscription_end,
        payment_failed_at=failed_at,
    )
