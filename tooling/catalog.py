"""The Stripe catalog billing relies on, created idempotently.

Every object is looked up before it is created (meters by `event_name`, prices
by `lookup_key`, the product through its prices or its metadata, the webhook
endpoint by URL, the test clock by id), so running this on every `billing dev`
start, or against a real Stripe test account, never makes duplicates. Creates
also carry idempotency keys derived from what they create.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import stripe
from stripe.params import PriceCreateParams, ProductCreateParams
from stripe.params.billing import MeterCreateParams

from billing.constants import HANDLED_EVENT_TYPES

CATALOG_KEY = "org-billing"
PRODUCT_NAME = "Org billing"
CURRENCY = "usd"

BASE_LOOKUP_KEY = "org_billing_base_monthly"
USERS_LOOKUP_KEY = "org_billing_users_monthly"
REQUESTS_LOOKUP_KEY = "org_billing_requests_monthly"

# Amounts in cents: a monthly base fee, per additional user, per request.
BASE_AMOUNT = 4900
USER_AMOUNT = 500
REQUEST_AMOUNT = 1

CUSTOMER_PAYLOAD_KEY = "stripe_customer_id"
VALUE_PAYLOAD_KEY = "value"

Formula = Literal["last", "sum"]


@dataclass(frozen=True)
class CatalogIds:
    product_id: str
    base_price_id: str
    users_price_id: str
    requests_price_id: str
    users_meter_id: str
    requests_meter_id: str


def ensure_meter(
    client: stripe.StripeClient, event_name: str, formula: Formula, display_name: str
) -> str:
    """The meter for `event_name`; a deactivated one is reactivated rather than duplicated."""
    meters = client.v1.billing.meters
    for meter in meters.list({"limit": 100}).auto_paging_iter():
        if meter.event_name != event_name:
            continue
        if meter.default_aggregation.formula != formula:
            raise RuntimeError(
                f"Meter {meter.id} for {event_name} aggregates with "
                f"{meter.default_aggregation.formula}, not {formula}."
            )
        if meter.status != "active":
            meters.reactivate(meter.id)
        return meter.id
    params: MeterCreateParams = {
        "display_name": display_name,
        "event_name": event_name,
        "default_aggregation": {"formula": formula},
        "customer_mapping": {"type": "by_id", "event_payload_key": CUSTOMER_PAYLOAD_KEY},
        "value_settings": {"event_payload_key": VALUE_PAYLOAD_KEY},
    }
    created = meters.create(params, {"idempotency_key": f"catalog-meter-{event_name}"})
    return created.id


def _prices_by_lookup_key(client: stripe.StripeClient, keys: list[str]) -> dict[str, stripe.Price]:
    found = client.v1.prices.list({"lookup_keys": keys, "active": True, "limit": len(keys)})
    return {p.lookup_key: p for p in found.data if p.lookup_key}


def _find_product(client: stripe.StripeClient, prices: dict[str, stripe.Price]) -> str | None:
    for price in prices.values():
        product = price.product
        return product if isinstance(product, str) else product.id
    for candidate in client.v1.products.list({"limit": 100}).auto_paging_iter():
        metadata = candidate.to_dict().get("metadata") or {}
        if metadata.get("catalog") == CATALOG_KEY:
            return candidate.id
    return None


def ensure_product(client: stripe.StripeClient, prices: dict[str, stripe.Price]) -> str:
    existing = _find_product(client, prices)
    if existing:
        return existing
    params: ProductCreateParams = {"name": PRODUCT_NAME, "metadata": {"catalog": CATALOG_KEY}}
    key = f"catalog-product-{CATALOG_KEY}"
    return client.v1.products.create(params, {"idempotency_key": key}).id


def _price_matches(price: stripe.Price, meter_id: str | None) -> bool:
    recurring = price.recurring
    if recurring is None or recurring.interval != "month":
        return False
    if meter_id is None:
        return recurring.usage_type == "licensed"
    return recurring.usage_type == "metered" and recurring.meter == meter_id


def ensure_price(
    client: stripe.StripeClient,
    existing: dict[str, stripe.Price],
    *,
    product_id: str,
    lookup_key: str,
    nickname: str,
    unit_amount: int,
    meter_id: str | None,
) -> str:
    """A monthly price; metered ones are tied to their meter through `recurring[meter]`."""
    current = existing.get(lookup_key)
    if current is not None and _price_matches(current, meter_id):
        return current.id
    params: PriceCreateParams = {
        "product": product_id,
        "currency": CURRENCY,
        "unit_amount": unit_amount,
        "nickname": nickname,
        "lookup_key": lookup_key,
        "recurring": {"interval": "month", "usage_type": "licensed"},
    }
    if meter_id is not None:
        params["recurring"] = {"interval": "month", "usage_type": "metered", "meter": meter_id}
    key = f"catalog-price-{lookup_key}-{meter_id or 'licensed'}"
    if current is not None:
        # The key exists on a price of the wrong shape: move it to the new one.
        params["transfer_lookup_key"] = True
    return client.v1.prices.create(params, {"idempotency_key": key}).id


def ensure_catalog(
    client: stripe.StripeClient, users_dimension: str, requests_dimension: str
) -> CatalogIds:
    """Meters (users: last value, requests: sum), the product and its three monthly prices."""
    users_meter = ensure_meter(client, users_dimension, "last", "Org users")
    requests_meter = ensure_meter(client, requests_dimension, "sum", "Org requests")
    prices = _prices_by_lookup_key(client, [BASE_LOOKUP_KEY, USERS_LOOKUP_KEY, REQUESTS_LOOKUP_KEY])
    product_id = ensure_product(client, prices)
    base = ensure_price(
        client,
        prices,
        product_id=product_id,
        lookup_key=BASE_LOOKUP_KEY,
        nickname="Base (monthly)",
        unit_amount=BASE_AMOUNT,
        meter_id=None,
    )
    users = ensure_price(
        client,
        prices,
        product_id=product_id,
        lookup_key=USERS_LOOKUP_KEY,
        nickname="Users (monthly, metered)",
        unit_amount=USER_AMOUNT,
        meter_id=users_meter,
    )
    requests = ensure_price(
        client,
        prices,
        product_id=product_id,
        lookup_key=REQUESTS_LOOKUP_KEY,
        nickname="Requests (monthly, metered)",
        unit_amount=REQUEST_AMOUNT,
        meter_id=requests_meter,
    )
    return CatalogIds(
        product_id=product_id,
        base_price_id=base,
        users_price_id=users,
        requests_price_id=requests,
        users_meter_id=users_meter,
        requests_meter_id=requests_meter,
    )


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str
    secret: str


def ensure_webhook_endpoint(
    client: stripe.StripeClient, url: str, known_secret: str | None = None
) -> WebhookEndpoint:
    """One endpoint for `url`, listening to the event types billing handles.

    Stripe reveals a signing secret only at creation, so an existing endpoint is
    kept only when we still hold its secret; otherwise it is replaced.
    """
    endpoints = client.v1.webhook_endpoints
    events = sorted(HANDLED_EVENT_TYPES)
    # The SDK types event names as a Literal union; ours are checked by the endpoint.
    typed_events: Any = events
    for endpoint in endpoints.list({"limit": 100}).auto_paging_iter():
        if endpoint.url != url:
            continue
        if known_secret:
            if sorted(endpoint.enabled_events) != events or endpoint.status != "enabled":
                endpoints.update(endpoint.id, {"enabled_events": typed_events, "disabled": False})
            return WebhookEndpoint(endpoint.id, known_secret)
        endpoints.delete(endpoint.id)
    created = endpoints.create(
        {"url": url, "enabled_events": typed_events, "description": "billing dev"}
    )
    if not created.secret:
        raise RuntimeError("Stripe created a webhook endpoint without a signing secret.")
    return WebhookEndpoint(created.id, created.secret)


def ensure_test_clock(
    client: stripe.StripeClient, known_id: str | None, start: int | None = None
) -> str:
    """The dev stack's test clock: the one it made before, if it still exists.

    A new clock starts at `start` (epoch seconds), or now.
    """
    clocks = client.v1.test_helpers.test_clocks
    if known_id:
        try:
            clocks.retrieve(known_id)
            return known_id
        except stripe.InvalidRequestError:
            pass
    frozen = int(time.time()) if start is None else start
    clock = clocks.create({"frozen_time": frozen, "name": "billing dev"})
    return clock.id
