"""The keys Stripe deduplicates by keep their formats: objects made with them exist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from billing.stripe_keys import (
    customer_create_key,
    meter_event_key,
    meter_identifier,
    portal_configuration_key,
    subscription_create_key,
)


def test_idempotency_keys_name_the_org() -> None:
    assert customer_create_key(42) == "customer-create-42"
    assert subscription_create_key(42) == "subscription-create-42"
    assert portal_configuration_key("org-billing") == (
        "portal-configuration-org-billing-promotion-codes"
    )


def test_meter_identifier_names_org_dimension_period_and_sequence() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    identifier = meter_identifier(7, "additional_requests", start, 3)
    assert identifier == "7:additional_requests:1740787200:3"
    assert meter_event_key(identifier) == "meter-event-7:additional_requests:1740787200:3"


def test_meter_identifier_is_the_same_instant_in_any_timezone() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    elsewhere = start.astimezone(timezone(timedelta(hours=-5)))
    assert meter_identifier(7, "users", elsewhere, 1) == meter_identifier(7, "users", start, 1)
