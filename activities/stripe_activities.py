"""Activities that talk to Stripe. They run on the rate-limited Stripe task queue."""

from __future__ import annotations

import logging

from temporalio import activity

from activities.errors import stripe_errors_classified
from activities.models import (
    CancelAtPeriodEndInput,
    CancelSubscriptionInput,
    CheckoutCompletedInput,
    EnsureSubscriptionInput,
    FetchSubscriptionInput,
    MeterEventToSend,
    OwnCustomer,
    SyncCustomerInput,
)
from billing.config import Settings
from billing.domain import (
    LIVE_SUBSCRIPTION_STATUSES,
    CheckoutOutcome,
    OrgProfile,
    SubscriptionSnapshot,
)
from billing.stripe_gateway import MeterOutcome, StripeGateway
from billing.stripe_keys import params_digest

log = logging.getLogger(__name__)


class StripeActivities:
    def __init__(self, gateway: StripeGateway, settings: Settings) -> None:
        self._gateway = gateway
        self._settings = settings

    @activity.defn(name="stripe_ensure_customer")
    @stripe_errors_classified
    async def ensure_customer(self, org: OrgProfile) -> str:
        """Find the org's customer (by `org_uid` and `source`), or create it.

        Runs recorded before `stripe_own_customer` existed still call this.
        """
        customer_id = await self._gateway.create_or_get_customer(
            org, test_clock=self._settings.stripe_test_clock
        )
        log.info("customer ready", extra={"org_id": org.org_id, "customer_id": customer_id})
        return customer_id

    @activity.defn(name="stripe_own_customer")
    @stripe_errors_classified
    async def own_customer(self, org: OrgProfile) -> OwnCustomer:
        """The org's customer: the one its row names if provably the org's, else found or made.

        A row can name a customer that is not the org's (a database restored into
        another environment, or a link made by an older version from a webhook):
        that one is refused, never billed, and the workflow says why.
        """
        if org.stripe_customer_id:
            problem = await self._gateway.customer_problem(org.stripe_customer_id, org)
            if problem is not None:
                log.warning("customer refused", extra={"org_id": org.org_id, "reason": problem})
                return OwnCustomer(refused=problem)
            return OwnCustomer(customer_id=org.stripe_customer_id)
        customer_id = await self._gateway.create_or_get_customer(
            org, test_clock=self._settings.stripe_test_clock
        )
        log.info("customer ready", extra={"org_id": org.org_id, "customer_id": customer_id})
        return OwnCustomer(customer_id=customer_id)

    @activity.defn(name="stripe_ensure_subscription")
    @stripe_errors_classified
    async def ensure_subscription(self, data: EnsureSubscriptionInput) -> SubscriptionSnapshot:
        """Reuse the customer's live subscription, or create the one we bill with."""
        existing = await self._gateway.find_live_subscription(data.customer_id)
        if existing is not None:
            return existing
        sub = await self._gateway.create_subscription(
            data.customer_id, data.org, replaces=data.replaces
        )
        log.info(
            "subscription created",
            extra={"org_id": data.org.org_id, "subscription_id": sub.id},
        )
        return sub

    @activity.defn(name="stripe_fetch_subscription")
    @stripe_errors_classified
    async def fetch_subscription(self, data: FetchSubscriptionInput) -> SubscriptionSnapshot | None:
        """Stripe is the source of truth: every event is applied from a fresh read."""
        if data.subscription_id:
            sub = await self._gateway.get_subscription(data.subscription_id)
            if sub.status in LIVE_SUBSCRIPTION_STATUSES or not data.customer_id:
                return sub
            # Ours ended: a live one made elsewhere (e.g. the dashboard) takes its place.
            return await self._gateway.find_live_subscription(data.customer_id) or sub
        if data.customer_id:
            return await self._gateway.find_live_subscription(data.customer_id)
        return None

    @activity.defn(name="stripe_checkout_completed")
    @stripe_errors_classified
    async def checkout_completed(self, data: CheckoutCompletedInput) -> CheckoutOutcome:
        """Follow a completed Checkout Session that is provably the org's."""
        outcome = await self._gateway.checkout_outcome(data.session_id, data.org, data.customer_id)
        log.info(
            "checkout session followed",
            extra={
                "org_id": data.org.org_id,
                "session_id": data.session_id,
                "mode": outcome.mode,
                "refused": outcome.refused,
            },
        )
        return outcome

    @activity.defn(name="stripe_cancel_at_period_end")
    @stripe_errors_classified
    async def cancel_at_period_end(self, data: CancelAtPeriodEndInput) -> SubscriptionSnapshot:
        """End the subscription at its period end (the org moved to a marketplace), or undo it."""
        verb = "cancel" if data.cancel else "keep"
        key = (
            f"subscription-{verb}-at-period-end-{data.subscription_id}-"
            f"{int(data.requested_at.timestamp())}"
        )
        sub = await self._gateway.set_cancel_at_period_end(
            data.subscription_id, data.cancel, idempotency_key=key
        )
        log.info(
            "subscription cancel at period end set",
            extra={"subscription_id": data.subscription_id, "cancel": data.cancel},
        )
        return sub

    @activity.defn(name="stripe_sync_customer")
    @stripe_errors_classified
    async def sync_customer(self, data: SyncCustomerInput) -> bool:
        """The customer's name and email as the org has them now; True if Stripe's changed."""
        params = {"name": data.name, "email": data.email}
        key = (
            f"customer-update-{data.customer_id}-{params_digest(params)}-"
            f"{int(data.requested_at.timestamp())}"
        )
        changed = await self._gateway.sync_customer(
            data.customer_id, name=data.name, email=data.email, idempotency_key=key
        )
        log.info("customer synced", extra={"customer_id": data.customer_id, "changed": changed})
        return changed

    @activity.defn(name="stripe_cancel_subscription")
    @stripe_errors_classified
    async def cancel_subscription(self, data: CancelSubscriptionInput) -> SubscriptionSnapshot:
        """End the subscription now (the org was closed)."""
        key = f"subscription-cancel-{data.subscription_id}-{int(data.requested_at.timestamp())}"
        sub = await self._gateway.cancel_subscription_now(data.subscription_id, idempotency_key=key)
        log.info("subscription canceled", extra={"subscription_id": data.subscription_id})
        return sub

    @activity.defn(name="stripe_send_meter_event")
    @stripe_errors_classified
    async def send_meter_event(self, event: MeterEventToSend) -> MeterOutcome:
        """Send one ledger row; a duplicate identifier means it was delivered before."""
        outcome = await self._gateway.report_usage(
            customer_id=event.customer_id,
            event_name=event.event_name,
            value=event.value,
            timestamp=event.timestamp,
            identifier=event.identifier,
        )
        if outcome == "duplicate":
            log.info("meter event already delivered", extra={"identifier": event.identifier})
        activity.metric_meter().create_counter(
            "billing_meter_events_sent_total",
            "Meter events Stripe accepted (sent) or already had (duplicate)",
        ).add(1, {"outcome": outcome, "event_name": event.event_name})
        return outcome
