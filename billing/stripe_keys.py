"""The keys Stripe deduplicates by, derived from business identity.

A retried activity or a restarted worker builds the same key again, so Stripe
answers with the first result instead of creating a second object or counting
a meter event twice. These formats are part of the contract with objects that
already exist in Stripe: never change them.
"""

from __future__ import annotations

from datetime import datetime


def customer_create_key(org_id: int) -> str:
    """Idempotency key of the request that creates the org's customer."""
    return f"customer-create-{org_id}"


def subscription_create_key(org_id: int) -> str:
    """Idempotency key of the request that creates the org's subscription."""
    return f"subscription-create-{org_id}"


def meter_event_key(identifier: str) -> str:
    """Idempotency key of the request that sends one meter event."""
    return f"meter-event-{identifier}"


def portal_configuration_key(billing_source: str) -> str:
    """Idempotency key of our billing portal configuration (promotion codes on)."""
    return f"portal-configuration-{billing_source}-promotion-codes"


def meter_identifier(org_id: int, dimension: str, period_start: datetime, seq: int) -> str:
    """The meter event's own identifier: one per usage ledger row, so Stripe
    recognises a re-sent row as the event it already counted. The period is
    named by its start in Unix seconds."""
    return f"{org_id}:{dimension}:{int(period_start.timestamp())}:{seq}"
