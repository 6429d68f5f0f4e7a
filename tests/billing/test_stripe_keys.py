"""The keys Stripe deduplicates by name the environment, the org and the intent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from billing.config import Settings
from billing.stripe_keys import (
    customer_create_key,
    environment_tag,
    meter_event_key,
    meter_identifier,
    params_digest,
    portal_configuration_key,
    subscription_create_key,
)

UID = "6f1c2b1e-8d8a-4c55-9d1e-2f0d9c0b7a11"
OTHER_UID = "0b7e5c61-3a4f-4e0c-8a66-1d2e3f4a5b6c"
PARAMS = {"email": "ada@acme.test", "metadata": {"org_id": "42", "org_uid": UID}}


def test_idempotency_keys_name_the_environment_the_org_and_the_parameters() -> None:
    digest = params_digest(PARAMS)
    assert customer_create_key("production", 42, UID, PARAMS) == (
        f"customer-create-production-42-{UID}-{digest}"
    )
    assert subscription_create_key("production", 42, UID, PARAMS) == (
        f"subscription-create-production-42-{UID}-{digest}"
    )
    assert portal_configuration_key("org-billing", PARAMS) == (
        f"portal-configuration-org-billing-promotion-codes-{digest}"
    )
    assert len(digest) == 16


def test_keys_differ_across_environments_and_orgs_with_the_same_id() -> None:
    production = customer_create_key("production", 7, UID, PARAMS)
    assert customer_create_key("staging", 7, UID, PARAMS) != production
    assert customer_create_key("production", 7, OTHER_UID, PARAMS) != production
    assert subscription_create_key("staging", 7, OTHER_UID, PARAMS) != (
        subscription_create_key("production", 7, UID, PARAMS)
    )


def test_a_changed_intent_gets_a_new_key_and_the_same_intent_the_same_one() -> None:
    bad = {"customer": "cus_1", "items": [{"price": "price_missing", "quantity": 1}]}
    fixed = {"customer": "cus_1", "items": [{"price": "price_base", "quantity": 1}]}
    reordered = {"items": [{"quantity": 1, "price": "price_base"}], "customer": "cus_1"}
    assert subscription_create_key("p", 7, UID, bad) != subscription_create_key("p", 7, UID, fixed)
    assert subscription_create_key("p", 7, UID, fixed) == (
        subscription_create_key("p", 7, UID, reordered)
    )


def test_meter_identifier_names_org_dimension_period_sequence_and_environment() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    identifier = meter_identifier(
        7, "additional_requests", start, 3, source="production", org_uid=UID
    )
    tag = environment_tag("production", UID)
    assert identifier == f"7:additional_requests:1740787200:3:{tag}"
    assert len(tag) == 16
    assert meter_event_key(identifier) == f"meter-event-{identifier}"


def test_meter_identifiers_differ_across_environments_sharing_an_account() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    production = meter_identifier(7, "users", start, 1, source="production", org_uid=UID)
    staging = meter_identifier(7, "users", start, 1, source="staging", org_uid=OTHER_UID)
    same_source = meter_identifier(7, "users", start, 1, source="production", org_uid=OTHER_UID)
    assert len({production, staging, same_source}) == 3
    # And none is the identifier the earlier format gave every environment alike.
    assert "7:users:1740787200:1" not in {production, staging, same_source}


def test_meter_identifier_fits_stripes_limit_with_the_longest_settings() -> None:
    identifier = meter_identifier(
        2**31 - 1,
        "d" * 48,
        datetime(2099, 1, 1, tzinfo=UTC),
        99999,
        source="s" * 40,
        org_uid="u" * 36,
    )
    assert len(identifier) <= 100


def test_meter_identifier_is_the_same_instant_in_any_timezone() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)
    elsewhere = start.astimezone(timezone(timedelta(hours=-5)))
    assert meter_identifier(7, "users", elsewhere, 1, source="p", org_uid=UID) == (
        meter_identifier(7, "users", start, 1, source="p", org_uid=UID)
    )


def test_a_source_that_cannot_sit_in_a_search_query_is_refused_at_startup() -> None:
    with pytest.raises(ValidationError, match="billing_source"):
        Settings.model_validate({"billing_source": "prod' OR metadata['org_id']:'7"})
    with pytest.raises(ValidationError, match="stripe_users_dimension"):
        Settings.model_validate({"stripe_users_dimension": "u" * 49})
    assert Settings.model_validate({"billing_source": "staging-eu.2"}).billing_source == (
        "staging-eu.2"
    )
