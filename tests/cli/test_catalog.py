"""The catalog `billing dev` creates in the emulator: right shapes, and never twice."""

from __future__ import annotations

import stripe

from billing.constants import HANDLED_EVENT_TYPES
from tooling.catalog import (
    BASE_LOOKUP_KEY,
    ensure_catalog,
    ensure_test_clock,
    ensure_webhook_endpoint,
)

USERS = "additional_users"
REQUESTS = "additional_requests"


def test_catalog_is_idempotent_and_well_formed(stripe_client: stripe.StripeClient) -> None:
    first = ensure_catalog(stripe_client, USERS, REQUESTS)
    second = ensure_catalog(stripe_client, USERS, REQUESTS)

    assert second == first
    meters = {m.event_name: m for m in stripe_client.v1.billing.meters.list({"limit": 100})}
    assert set(meters) == {USERS, REQUESTS}
    assert meters[USERS].id == first.users_meter_id
    assert meters[USERS].default_aggregation.formula == "last"
    assert meters[REQUESTS].default_aggregation.formula == "sum"
    for meter in meters.values():
        assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
        assert meter.value_settings.event_payload_key == "value"

    prices = stripe_client.v1.prices.list({"limit": 100}).data
    assert len(prices) == 3
    by_id = {p.id: p for p in prices}
    base = by_id[first.base_price_id]
    assert base.lookup_key == BASE_LOOKUP_KEY
    assert base.recurring is not None and base.recurring.usage_type == "licensed"
    assert base.recurring.interval == "month"
    for price_id, meter_id in (
        (first.users_price_id, first.users_meter_id),
        (first.requests_price_id, first.requests_meter_id),
    ):
        recurring = by_id[price_id].recurring
        assert recurring is not None
        assert recurring.usage_type == "metered"
        assert recurring.meter == meter_id
        assert recurring.interval == "month"
    assert {p.product for p in prices} == {first.product_id}
    assert len(stripe_client.v1.products.list({"limit": 100}).data) == 1


def test_webhook_endpoint_is_reused_while_its_secret_is_known(
    stripe_client: stripe.StripeClient,
) -> None:
    url = "http://127.0.0.1:8000/api/webhooks/stripe"

    first = ensure_webhook_endpoint(stripe_client, url)
    again = ensure_webhook_endpoint(stripe_client, url, first.secret)
    replaced = ensure_webhook_endpoint(stripe_client, url, None)

    assert first.secret.startswith("whsec_")
    assert again == first
    assert replaced.id != first.id
    endpoints = stripe_client.v1.webhook_endpoints.list({"limit": 100}).data
    assert [e.id for e in endpoints] == [replaced.id]
    assert set(endpoints[0].enabled_events) == HANDLED_EVENT_TYPES


def test_test_clock_is_reused(stripe_client: stripe.StripeClient) -> None:
    clock = ensure_test_clock(stripe_client, None)

    assert ensure_test_clock(stripe_client, clock) == clock
    assert ensure_test_clock(stripe_client, "clock_gone") != clock
