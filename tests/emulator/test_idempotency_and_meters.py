"""Idempotency keys, meter event dedupe and time window, event summaries."""

from __future__ import annotations

import time

import httpx
import pytest
import stripe

from stripe_emulator.server import EmulatorServer
from tests.emulator.helpers import make_catalog

DAY = 86400


def test_same_key_same_params_replays(client: stripe.StripeClient, http: httpx.Client) -> None:
    first = client.v1.customers.create(
        params={"email": "i@x.io", "metadata": {"org_id": "1"}},
        options={"idempotency_key": "customer-create-1"},
    )
    again = client.v1.customers.create(
        params={"email": "i@x.io", "metadata": {"org_id": "1"}},
        options={"idempotency_key": "customer-create-1"},
    )
    assert again.id == first.id
    assert len(client.v1.customers.list().data) == 1
    raw = http.post(
        "/v1/customers",
        data={"email": "i@x.io", "metadata[org_id]": "1"},
        headers={
            "Idempotency-Key": "customer-create-1",
            "Authorization": "Bearer sk_test_emulator",
        },
    )
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert raw.json()["id"] == first.id


def test_same_key_other_params_is_an_idempotency_error(client: stripe.StripeClient) -> None:
    client.v1.customers.create(
        params={"email": "one@x.io"}, options={"idempotency_key": "customer-create-2"}
    )
    with pytest.raises(stripe.IdempotencyError) as caught:
        client.v1.customers.create(
            params={"email": "two@x.io"}, options={"idempotency_key": "customer-create-2"}
        )
    assert caught.value.http_status == 400
    assert caught.value.error is not None and caught.value.error.type == "idempotency_error"


def test_keys_are_scoped_per_api_key(emulator: EmulatorServer) -> None:
    from stripe_emulator.client import make_client

    one = make_client(emulator.url, "sk_test_one")
    two = make_client(emulator.url, "sk_test_two")
    a = one.v1.customers.create(params={"email": "a@x.io"}, options={"idempotency_key": "k"})
    b = two.v1.customers.create(params={"email": "b@x.io"}, options={"idempotency_key": "k"})
    assert a.id != b.id


def test_validation_errors_leave_the_key_free(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(params={"email": "v@x.io"})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.create(
            params={"customer": customer.id, "items": [{"price": "price_missing"}]},
            options={"idempotency_key": "subscription-create-v"},
        )
    catalog = make_catalog(client)
    sub = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": [{"price": catalog.base.id}]},
        options={"idempotency_key": "subscription-create-v"},
    )
    assert sub.id.startswith("sub_")


def test_a_missing_resource_can_be_saved_under_its_key_as_stripe_may(
    emulator: EmulatorServer, client: stripe.StripeClient
) -> None:
    """With the setting on, the corrected retry under the same key is refused like Stripe."""
    emulator.state.settings.idempotency_saves_missing_resources = True
    customer = client.v1.customers.create(params={"email": "m@x.io"})
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError, match="No such price"):
            client.v1.subscriptions.create(
                params={"customer": customer.id, "items": [{"price": "price_missing"}]},
                options={"idempotency_key": "subscription-create-m"},
            )
    catalog = make_catalog(client)
    with pytest.raises(stripe.IdempotencyError):
        client.v1.subscriptions.create(
            params={"customer": customer.id, "items": [{"price": catalog.base.id}]},
            options={"idempotency_key": "subscription-create-m"},
        )


def test_errors_are_replayed_too(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(params={"email": "e@x.io"})
    for _ in range(2):
        with pytest.raises(stripe.CardError):
            client.v1.payment_methods.attach(
                "pm_card_chargeDeclined",
                params={"customer": customer.id},
                options={"idempotency_key": "attach-declined"},
            )


def meter_event(
    client: stripe.StripeClient, customer: str, value: int, at: int | None, ident: str
) -> stripe.billing.MeterEvent:
    params: stripe.params.billing.MeterEventCreateParams = {
        "event_name": "additional_requests",
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        "identifier": ident,
    }
    if at is not None:
        params["timestamp"] = at
    return client.v1.billing.meter_events.create(params=params)


def test_duplicate_identifier_is_rejected_like_stripe(
    client: stripe.StripeClient, emulator: EmulatorServer
) -> None:
    make_catalog(client)
    customer = client.v1.customers.create(params={"email": "m@x.io"})
    event = meter_event(client, customer.id, 5, None, "org1:requests:1700000000:0")
    assert (
        event.object == "billing.meter_event" and event.identifier == "org1:requests:1700000000:0"
    )
    assert abs(event.timestamp - int(time.time())) < 5
    with pytest.raises(stripe.InvalidRequestError) as caught:
        meter_event(client, customer.id, 5, None, "org1:requests:1700000000:0")
    assert caught.value.http_status == 400
    assert caught.value.code is None
    assert str(caught.value.user_message) == (
        "An event already exists with identifier org1:requests:1700000000:0."
    )
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    assert stats["meter_events"] == {
        "accepted": 1,
        "duplicate": 1,
        "rejected_window": 0,
        "no_meter": 0,
        "unknown_customer": 0,
    }


def test_timestamp_window_follows_the_customer_clock(client: stripe.StripeClient) -> None:
    make_catalog(client)
    frozen = 1767225600
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": frozen})
    on_clock = client.v1.customers.create(params={"test_clock": clock.id})
    in_wall_time = client.v1.customers.create(params={"email": "w@x.io"})
    meter_event(client, on_clock.id, 1, frozen - 35 * DAY, "edge-past")
    meter_event(client, on_clock.id, 1, frozen + 300, "edge-future")
    with pytest.raises(stripe.InvalidRequestError, match="35 days in past") as old:
        meter_event(client, on_clock.id, 1, frozen - 35 * DAY - 1, "too-old")
    assert old.value.param == "timestamp"
    with pytest.raises(stripe.InvalidRequestError, match="5 minutes in the future"):
        meter_event(client, on_clock.id, 1, frozen + 301, "too-new")
    with pytest.raises(stripe.InvalidRequestError):
        meter_event(client, in_wall_time.id, 1, frozen, "wall-too-old")
    meter_event(client, in_wall_time.id, 1, int(time.time()) - 34 * DAY, "wall-ok")


def test_event_summaries_aggregate_by_formula(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "s@x.io"})
    now = int(time.time())
    start = now - 10 * DAY
    for i, (value, offset) in enumerate([(3, 1), (8, 5), (4, 2)]):
        client.v1.billing.meter_events.create(
            params={
                "event_name": "additional_users",
                "payload": {"stripe_customer_id": customer.id, "value": str(value)},
                "timestamp": start + offset * DAY,
                "identifier": f"u{i}",
            }
        )
        meter_event(client, customer.id, value, start + offset * DAY, f"r{i}")
    users = client.v1.billing.meters.event_summaries.list(
        catalog.users_meter.id,
        params={"customer": customer.id, "start_time": start, "end_time": now},
    )
    assert users.data[0].aggregated_value == 8
    assert users.data[0].object == "billing.meter_event_summary"
    requests = client.v1.billing.meters.event_summaries.list(
        catalog.requests_meter.id,
        params={"customer": customer.id, "start_time": start, "end_time": now},
    )
    assert requests.data[0].aggregated_value == 15
    daily = client.v1.billing.meters.event_summaries.list(
        catalog.requests_meter.id,
        params={
            "customer": customer.id,
            "start_time": start,
            "end_time": start + 3 * DAY,
            "value_grouping_window": "day",
        },
    )
    assert [s.aggregated_value for s in daily.data] == [0, 3, 4]


def test_concurrent_requests_with_one_key_create_once(client: stripe.StripeClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(_: int) -> str:
        return client.v1.customers.create(
            params={"email": "race@x.io"}, options={"idempotency_key": "customer-create-race"}
        ).id

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(create, range(16)))
    assert len(ids) == 1
    assert len(client.v1.customers.list().data) == 1
