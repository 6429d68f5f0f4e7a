"""Types shared by the DB layer, the workflows, the activities and the API.

Everything a workflow sends or receives is one of these pydantic models, so the
pydantic data converter carries them through Temporal unchanged.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class SubscriptionStatus(StrEnum):
    """Stripe's eight subscription statuses."""

    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    PAUSED = "paused"


class BillingStatus(StrEnum):
    """The `BillingStatus` search attribute: a Stripe status or one of our own."""

    PROVISIONING = "provisioning"
    PROVISIONING_FAILED = "provisioning_failed"
    NOT_BILLED = "not_billed"
    # Closed (service API) before Stripe billed it: nothing to cancel.
    CLOSED = "closed"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    PAUSED = "paused"

    @classmethod
    def of(cls, status: SubscriptionStatus) -> BillingStatus:
        return cls(status.value)


class BillingProblem(StrEnum):
    """The `BillingProblem` search attribute: why an org needs a person (docs/contracts.md).

    Unset while nothing needs one. Each code is documented with its fix in
    docs/operations.md.
    """

    PROVISIONING_FAILED = "provisioning_failed"
    PAYMENT_FAILED = "payment_failed"
    USAGE_REPORT_FAILING = "usage_report_failing"
    STRIPE_AUTH = "stripe_auth"
    ADOPTION_REFUSED = "adoption_refused"
    EVENT_FAILED = "event_failed"


class MembershipRole(StrEnum):
    """A user's role in an org (`memberships.role`); every org has exactly one owner.

    A billing admin may do what the owner does with billing (portal, checkout);
    a member may only read the org's public billing view.
    """

    OWNER = "owner"
    BILLING_ADMIN = "billing_admin"
    MEMBER = "member"


# Roles that may act on the org's billing: open the Stripe portal (card, invoices,
# cancel) and, later, checkout.
BILLING_MANAGER_ROLES = frozenset({MembershipRole.OWNER, MembershipRole.BILLING_ADMIN})
# Roles an operator may grant: the owner is set when the org is created, and stays one.
GRANTABLE_ROLES = (MembershipRole.MEMBER, MembershipRole.BILLING_ADMIN)


class LedgerStatus(StrEnum):
    """A usage ledger row: `pending` until Stripe accepted its meter event, then
    `sent`; `skipped` when Stripe would refuse it (older than Stripe accepts)."""

    PENDING = "pending"
    SENT = "sent"
    SKIPPED = "skipped"


# Statuses of a subscription that still bills the org: provisioning must reuse it.
LIVE_SUBSCRIPTION_STATUSES = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.PAUSED,
        SubscriptionStatus.INCOMPLETE,
    }
)


def is_billed_elsewhere(aws_account_id: str | None, azure_subscription_id: str | None) -> bool:
    """An org billed through a cloud marketplace (AWS or Azure) is never billed by us.

    Written with `!=` and `|` so that, given the columns instead of values, the
    same expression is the SQL condition (see the `Org.billed_elsewhere` hybrid).
    """
    return (aws_account_id != None) | (azure_subscription_id != None)  # noqa: E711


def row_billing_status(
    *,
    billed_elsewhere: bool,
    stripe_subscription_id: str | None,
    subscription_status: SubscriptionStatus,
) -> BillingStatus:
    """What an org's row alone says: without a subscription it is still waiting for one."""
    if billed_elsewhere:
        return BillingStatus.NOT_BILLED
    if stripe_subscription_id is None:
        return BillingStatus.PROVISIONING
    return BillingStatus.of(subscription_status)


class StripeEventSignal(BaseModel):
    """The small payload a webhook becomes: enough to dedupe, order and re-read."""

    event_id: str
    type: str
    created: int
    object_id: str
    customer_id: str | None = None
    subscription_id: str | None = None


class SubscriptionSnapshot(BaseModel):
    """What we keep of a Stripe subscription, already reduced by docs/contracts.md's rules."""

    id: str
    customer_id: str
    status: SubscriptionStatus
    subscription_end: datetime | None
    trial_end: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at: datetime | None = None
    pause_collection: bool = False
    org_id: str | None = None
    # The day of month periods renew on (clamped in short months).
    billing_cycle_anchor: datetime | None = None
    # Stripe's own clock when it was read: the test clock's time for an object on
    # one, else the time of the read. None in reads recorded before it was kept.
    read_at: datetime | None = None


class RefusedAdoption(BaseModel):
    """A Stripe object that named the org but is not provably its own: never linked.

    Kept in the state (the newest few) and in the `stripe_events` log.
    """

    at: datetime
    reason: str
    customer_id: str | None = None
    subscription_id: str | None = None
    event_id: str | None = None


class BillingPeriod(BaseModel):
    start: datetime
    end: datetime


class UsagePeriodReport(BaseModel):
    """What was sent to Stripe for one billing period of one org."""

    period_start: datetime
    period_end: datetime
    users: int = 0
    requests: int = 0
    meter_events_sent: int = 0
    skipped_reason: str | None = None
    last_reported_at: datetime | None = None


class FailedEvent(BaseModel):
    """A Stripe event whose processing failed: kept (not marked seen) and retried."""

    event: StripeEventSignal
    # The watermark key it is ordered by: one failed event is kept per key, the
    # newest, since its re-read covers the older ones.
    key: str
    attempts: int = 1
    retry_at: datetime
    error: str


class NotificationType(StrEnum):
    """What a notification to the console (`BILLING_NOTIFY_URL`) tells (docs/notifications.md)."""

    STATUS_CHANGED = "org.billing.status_changed"
    ENTITLEMENT_CHANGED = "org.billing.entitlement_changed"
    TRIAL_WILL_END = "org.billing.trial_will_end"
    PAYMENT_FAILED = "org.billing.payment_failed"
    PAYMENT_SUCCEEDED = "org.billing.payment_succeeded"


class BillingNotification(BaseModel):
    """One notification: `id` is stable per change, so a redelivery is deduplicated."""

    id: str
    type: NotificationType
    org_id: int
    data: dict[str, Any] = Field(default_factory=dict)
    created: datetime

    def body(self) -> dict[str, Any]:
        """The JSON body sent: `{"type", "org_id", "data", "created"}`."""
        return {
            "type": self.type.value,
            "org_id": self.org_id,
            "data": self.data,
            "created": self.created.isoformat(),
        }


class PublishedBilling(BaseModel):
    """What the org's row and the console were last told (the workflow compares against it)."""

    status: BillingStatus
    entitled: bool
    access_until: datetime | None = None


class OrgCloseCancels(StrEnum):
    """`ORG_CLOSE_CANCELS`: how a closed org's subscription ends."""

    IMMEDIATELY = "immediately"
    PERIOD_END = "period_end"


class OrgCloseSignal(BaseModel):
    """The `close_org` signal: the org was closed in the database at `closed_at`."""

    closed_at: datetime
    cancels: OrgCloseCancels = OrgCloseCancels.IMMEDIATELY


class CustomerSync(BaseModel):
    """The Stripe customer as last checked against the org: name, email, and whether
    the check changed it (the `org_changed` signal's work)."""

    customer_id: str
    name: str
    email: str
    synced_at: datetime
    updated: bool


class OrgBillingState(BaseModel):
    """Everything the `OrgBilling` workflow knows; carried across continue-as-new."""

    org_id: int
    status: BillingStatus = BillingStatus.PROVISIONING
    stripe_customer_id: str | None = None
    stripe_subscription_id: str | None = None
    subscription_status: SubscriptionStatus | None = None
    subscription_end: datetime | None = None
    trial_end: datetime | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    pause_collection: bool = False
    last_error: str | None = None
    last_event_id: str | None = None
    last_event_type: str | None = None
    # Subscriptions and customers that named the org and were not linked, newest last.
    refused_adoptions: list[RefusedAdoption] = Field(default_factory=list)
    # Watermark: `created` of the newest event applied, per Stripe object id.
    watermarks: dict[str, int] = Field(default_factory=dict)
    # Recently applied event ids, oldest first, bounded.
    seen_event_ids: list[str] = Field(default_factory=list)
    trial_will_end_noted_for: datetime | None = None
    last_synced_at: datetime | None = None
    usage: list[UsagePeriodReport] = Field(default_factory=list)
    # Ended periods whose final usage report is still owed (kept until it is made).
    to_finalize: list[BillingPeriod] = Field(default_factory=list)
    # After a usage report Stripe refused, nothing is retried before this time.
    usage_retry_after: datetime | None = None
    # Usage reports refused in a row (the backoff grows with it), and what kind
    # of problem that is (`stripe_auth` or `usage_report_failing`); reset by the
    # next report that goes through.
    usage_failures: int = 0
    usage_problem: BillingProblem | None = None
    # Events whose processing failed, retried with backoff (one per watermark key).
    failed_events: list[FailedEvent] = Field(default_factory=list)
    # The subscription whose cancellation at period end this workflow asked for
    # because the org moved to a cloud marketplace (undone if it moves back in time).
    marketplace_cancel_of: str | None = None
    # Whether the org row named an AWS/Azure marketplace id when the workflow last
    # read it (kept under the patch `marketplace-ended`): such an org never adopts
    # a Stripe subscription, and its own one ended leaves it `not_billed`.
    billed_elsewhere: bool = False
    # What needs a person, if anything: the `BillingProblem` search attribute.
    problem: BillingProblem | None = None
    # When the workflow first saw a failed payment (past_due/unpaid), until paid:
    # the past-due grace counts from it (billing/entitlement.py).
    payment_failed_at: datetime | None = None
    # The grace (`PAST_DUE_GRACE_DAYS`) the workflow decides with, for the API
    # to give the same answer; None until the workflow first publishes.
    past_due_grace_days: int | None = None
    # What the org row and the console were last told, and how many changes were
    # published (part of each change's notification id).
    published: PublishedBilling | None = None
    published_changes: int = 0
    # Notices (payments, trial end) waiting to be written with the next publish.
    pending_notifications: list[BillingNotification] = Field(default_factory=list)


    # The org was closed (`close_org` signal): when, and how its subscription ends
    # (`immediately` or `period_end`); the run finishes once nothing is owed.
    closed_at: datetime | None = None
    close_cancels: OrgCloseCancels | None = None
    # The subscription whose end at period end the close asked Stripe for.
    close_cancel_of: str | None = None
    # The last time the Stripe customer was checked against the org (`org_changed`).
    customer_sync: CustomerSync | None = None


class OrgBillingTuning(BaseModel):
    """Timings of an org workflow; tests shrink them to exercise the same paths quickly."""

    resync_interval_seconds: int = 86400
    usage_lead_seconds: int = 3600
    usage_grace_seconds: int = 300
    failed_retry_seconds: int = 3600
    # A refused usage report (a revoked key, a missing meter) is retried on this
    # short backoff, doubling up to the maximum: the invoice finalizes about an
    # hour after the period ends, and a fix must still make it in.
    usage_retry_initial_seconds: int = 30
    usage_retry_max_seconds: int = 300
    # A Stripe event whose processing failed is retried on this backoff.
    event_retry_initial_seconds: int = 30
    event_retry_max_seconds: int = 3600
    # Continue-as-new once a run's history reaches this many events (Temporal's
    # own suggestion applies too); small values exercise the path in tests.
    max_history_events: int = 2000
    seen_events_limit: int = 500
    # A past-due org stays entitled this long after its first failed payment.
    past_due_grace_days: int = 7


class OrgBillingInput(BaseModel):
    """Workflow input: a `state` field so continue-as-new carries everything forward."""

    org_id: int
    state: OrgBillingState | None = None
    pending_events: list[StripeEventSignal] = Field(default_factory=list)
    retry_requested: bool = False
    resync_requested: bool = False
    tuning: OrgBillingTuning = Field(default_factory=OrgBillingTuning)
    # An `org_changed` signal not acted on yet.
    org_changed: bool = False


class BackfillInput(BaseModel):
    after_id: int = 0
    page_size: int = 200
    started: int = 0


class BackfillResult(BaseModel):
    started: int


class OrgProfile(BaseModel):
    """What Stripe needs to know about an org to bill it."""

    org_id: int
    org_uid: str
    name: str
    owner_email: str
    owner_first_name: str = ""
    owner_last_name: str = ""
    aws_account_id: str | None = None
    azure_subscription_id: str | None = None
    stripe_customer_id: str | None = None
    stripe_subscription_id: str | None = None
    # When the org was closed (None: open); a closed org is never provisioned.
    closed_at: datetime | None = None
    # The row's subscription status (what the last Stripe read wrote there).
    subscription_status: SubscriptionStatus | None = None

    @property
    def billed_elsewhere(self) -> bool:
        return is_billed_elsewhere(self.aws_account_id, self.azure_subscription_id)

    @property
    def customer_name(self) -> str:
        person = f"{self.owner_first_name} {self.owner_last_name}".strip() or self.owner_email
        return f"{person} ({self.name})"


class FieldDifference(BaseModel):
    field: str
    before: str | None
    after: str | None


class ReconcileResult(BaseModel):
    """What a re-sync from Stripe changed in the org's state and row."""

    org_id: int
    differences: list[FieldDifference] = Field(default_factory=list)
    status: BillingStatus


class UsageReportResult(BaseModel):
    """The answer of the `report_usage` update: what this call sent."""

    org_id: int
    periods: list[UsagePeriodReport] = Field(default_factory=list)
    meter_events_sent: int = 0
    skipped_reason: str | None = None


class CheckoutOutcome(BaseModel):
    """What a completed Checkout Session gave the org, or why it is not the org's.

    `subscription` is the session's subscription (`subscription` mode) or the
    customer's live one after a card was saved (`setup` mode).
    """

    mode: str | None = None
    subscription: SubscriptionSnapshot | None = None
    refused: str | None = None
    # The subscription the session names, for the record of a refusal.
    subscription_id: str | None = None
