"""Inputs and outputs of activities (pydantic, carried by the pydantic data converter)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from billing.domain import (
    BillingNotification,
    OrgProfile,
    PublishedBilling,
    RefusedAdoption,
    SubscriptionSnapshot,
)


class EnsureSubscriptionInput(BaseModel):
    customer_id: str
    org: OrgProfile
    # The org's subscription ended for a marketplace it has left: the new one
    # follows it (no second trial, its own idempotency key).
    replaces: str | None = None


class OwnCustomer(BaseModel):
    """The org's customer, or why the one its row names is not provably the org's."""

    customer_id: str | None = None
    refused: str | None = None


class AdoptionRefusalInput(BaseModel):
    """A refused adoption, for the `stripe_events` log (outcome `adoption_refused`)."""

    org_id: int
    refusal: RefusedAdoption
    # The event that named the object, when an event did.
    event_type: str | None = None
    event_created: int | None = None


class FetchSubscriptionInput(BaseModel):
    """Re-read from Stripe: by id when known, else the customer's live one."""

    subscription_id: str | None = None
    customer_id: str | None = None


class SaveCustomerInput(BaseModel):
    org_id: int
    customer_id: str


class SaveSubscriptionInput(BaseModel):
    org_id: int
    subscription: SubscriptionSnapshot
    # When the workflow decided this write: an older one never overwrites a newer.
    synced_at: datetime | None = None


class CancelAtPeriodEndInput(BaseModel):
    """End the subscription when its period ends (`cancel=False` takes that back)."""

    subscription_id: str
    cancel: bool
    # When the workflow asked: with the subscription, it names this one request.
    requested_at: datetime


class OrgPage(BaseModel):
    after_id: int = 0
    limit: int = 200


class PlanUsageInput(BaseModel):
    org_id: int
    customer_id: str
    period_start: datetime
    period_end: datetime
    # When the report is made, on Stripe's clock: the meter events' timestamp is
    # clamped into the period, requests after it wait for a later report, and
    # the users level is the one at the events' timestamp.
    report_time: datetime


class MeterEventToSend(BaseModel):
    identifier: str
    dimension: str
    event_name: str
    customer_id: str
    value: int
    timestamp: datetime


class UsagePlan(BaseModel):
    """Ledger rows (new or left pending by an earlier attempt) to send now."""

    events: list[MeterEventToSend]
    users: int
    requests: int
    skipped_reason: str | None = None


class MarkSentInput(BaseModel):
    identifiers: list[str]


class PublishInput(BaseModel):
    """What the org's workflow publishes after a change: the row's entitlement, notifications.

    `row_changed` says whether `entitled`/`access_until` differ from what the
    row was last given; the notifications go to the outbox (in this order).
    """

    org_id: int
    published: PublishedBilling
    row_changed: bool
    notifications: list[BillingNotification] = Field(default_factory=list)


class CheckoutCompletedInput(BaseModel):
    """A completed Checkout Session to follow, and whose it must provably be."""

    session_id: str
    org: OrgProfile
    # The org's customer as its workflow knows it: the session must be this one's.
    customer_id: str


class SyncCustomerInput(BaseModel):
    """Bring the Stripe customer in line with the org (name and owner email)."""

    customer_id: str
    name: str
    email: str
    # When the workflow asked: part of the idempotency key, so a later change back
    # to an earlier name is a new request.
    requested_at: datetime


class CancelSubscriptionInput(BaseModel):
    """End the subscription now: the org was closed."""

    subscription_id: str
    requested_at: datetime
