"""Activities that talk to Stripe. They run on the rate-limited Stripe task queue."""

from __future__ import annotations

import logging

from temporalio import activity

from activities.errors import stripe_errors_classified
from activities.models import EnsureSubscriptionInput, FetchSubscriptionInput, MeterEventToSend
from billing.config import Settings
from billing.domain import LIVE_SUBSCRIPTION_STATUSES, OrgProfile, SubscriptionSnapshot
from billing.stripe_gateway import MeterOutcome, StripeGateway
from billing.stripe_keys import customer_create_key, subscription_create_key

log = logging.getLogger(__name__)


class StripeActivities:
    def __init__(self, gateway: StripeGateway, settings: Settings) -> None:
        self._gateway = gateway
        self._settings = settings

    @activity.defn(name="stripe_ensure_customer")
    @stripe_errors_classified
    async def ensure_customer(self, org: OrgProfile) -> str:
        """Find the org's customer by metadata, or create it with a stable key."""
        customer_id = await self._gateway.create_or_get_customer(
            org,
            idempotency_key=customer_create_key(org.org_id),
            test_clock=self._settings.stripe_test_clock,
        )
        log.info("customer ready", extra={"org_id": org.org_id, "customer_id": customer_id})
        return customer_id

    @activity.defn(name="stripe_ensure_subscription")
    @stripe_errors_classified
    async def ensure_subscription(self, data: EnsureSubscriptionInput) -> SubscriptionSnapshot:
        """Reuse the customer's live subscription, or create the one we bill with."""
        existing = await self._gateway.find_live_subscription(data.customer_id)
        if existing is not None:
            return existing
        sub = await self._gateway.create_subscription(
            data.customer_id, data.org, idempotency_key=subscription_create_key(data.org.org_id)
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
