"""Webhook endpoints, signed deliveries, retries, chaos, and the events API."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import stripe
from stripe.params import WebhookEndpointCreateParams

from stripe_emulator.server import EmulatorServer
from tests.emulator.helpers import Receiver


def endpoint_for(
    client: stripe.StripeClient, receiver: Receiver, only: str | None = None
) -> stripe.WebhookEndpoint:
    params: WebhookEndpointCreateParams = {"url": receiver.url, "enabled_events": ["*"]}
    if only == "customer.updated":
        params["enabled_events"] = ["customer.updated"]
    endpoint = client.v1.webhook_endpoints.create(params=params)
    assert endpoint.secret is not None and endpoint.secret.startswith("whsec_")
    return endpoint


def test_endpoint_crud(client: stripe.StripeClient) -> None:
    endpoint = client.v1.webhook_endpoints.create(
        params={"url": "http://127.0.0.1:9/hook", "enabled_events": ["customer.created"]}
    )
    assert endpoint.id.startswith("we_") and endpoint.status == "enabled"
    fetched = client.v1.webhook_endpoints.retrieve(endpoint.id)
    assert fetched.url == endpoint.url and "secret" not in fetched.to_dict()
    updated = client.v1.webhook_endpoints.update(
        endpoint.id, params={"enabled_events": ["*"], "disabled": True}
    )
    assert updated.enabled_events == ["*"] and updated.status == "disabled"
    assert [e.id for e in client.v1.webhook_endpoints.list().data] == [endpoint.id]
    assert client.v1.webhook_endpoints.delete(endpoint.id).deleted is True
    assert client.v1.webhook_endpoints.list().data == []


def test_deliveries_are_signed_and_ordered(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint = endpoint_for(client, receiver)
    customers = [client.v1.customers.create(params={"name": f"c{i}"}) for i in range(5)]
    client.v1.customers.update(customers[0].id, params={"name": "renamed"})
    assert emulator.wait_for_webhooks()
    assert endpoint.secret is not None
    events = receiver.events(endpoint.secret)
    assert [e.type for e in events] == ["customer.created"] * 5 + ["customer.updated"]
    assert [e.data.object["id"] for e in events[:5]] == [c.id for c in customers]
    assert all(e.api_version == stripe.api_version for e in events)
    update = events[-1]
    assert update.data.previous_attributes is not None
    assert update.data.previous_attributes.to_dict() == {"name": "c0"}
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            receiver.deliveries[0].body, receiver.deliveries[0].signature, "whsec_wrong"
        )
    stored = client.v1.events.retrieve(events[0].id)
    assert stored.pending_webhooks == 0


def test_only_enabled_events_are_sent(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint_for(client, receiver, "customer.updated")
    customer = client.v1.customers.create(params={"name": "a"})
    client.v1.customers.update(customer.id, params={"name": "b"})
    assert emulator.wait_for_webhooks()
    assert [json.loads(b)["type"] for b in receiver.bodies()] == ["customer.updated"]


def test_failed_delivery_is_retried(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint = endpoint_for(client, receiver)
    receiver.statuses.extend([500, 503])
    started = time.monotonic()
    customer = client.v1.customers.create(params={"name": "retry"})
    assert emulator.wait_for_webhooks()
    assert time.monotonic() - started >= 0.6
    assert endpoint.secret is not None
    [event] = receiver.events(endpoint.secret)
    assert event.data.object["id"] == customer.id
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()["webhooks"]
    assert stats["attempted"] == 3 and stats["failed"] == 2 and stats["succeeded"] == 1
    assert client.v1.events.retrieve(event.id).pending_webhooks == 0


def test_unreachable_endpoint_is_given_up_and_stays_pending(
    client: stripe.StripeClient, emulator: EmulatorServer
) -> None:
    client.v1.webhook_endpoints.create(
        params={"url": "http://127.0.0.1:9/closed", "enabled_events": ["*"]}
    )
    client.v1.customers.create(params={"name": "nobody listens"})
    assert emulator.wait_for_webhooks()
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()["webhooks"]
    assert stats["attempted"] == 4 and stats["given_up"] == 1
    [event] = client.v1.events.list().data
    assert event.pending_webhooks == 1
    undelivered = client.v1.events.list(params={"delivery_success": False})
    assert [e.id for e in undelivered.data] == [event.id]


def test_duplicate_and_delay_faults(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint_for(client, receiver)
    httpx.post(
        f"{emulator.url}/_emulator/faults",
        json={"webhook_duplicate_rate": 1.0, "webhook_delay_ms": 150},
    ).raise_for_status()
    started = time.monotonic()
    client.v1.customers.create(params={"name": "twice"})
    assert emulator.wait_for_webhooks()
    assert time.monotonic() - started >= 0.15
    bodies = receiver.bodies()
    assert len(bodies) == 2 and json.loads(bodies[0])["id"] == json.loads(bodies[1])["id"]
    assert httpx.get(f"{emulator.url}/_emulator/stats").json()["webhooks"]["duplicated"] == 1


def test_shuffle_window_reorders_deliveries(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint_for(client, receiver)
    emulator.set_faults(webhook_shuffle_window=10, seed=7)
    ids = [client.v1.customers.create(params={"name": f"s{i}"}).id for i in range(10)]
    assert emulator.wait_for_webhooks()
    delivered = [json.loads(b)["data"]["object"]["id"] for b in receiver.bodies()]
    assert sorted(delivered) == sorted(ids)
    assert delivered != ids


def test_events_api(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(params={"name": "e"})
    client.v1.customers.update(customer.id, params={"name": "f"})
    client.v1.products.create(params={"name": "p"})
    everything = client.v1.events.list()
    assert [e.type for e in everything.data] == [
        "product.created",
        "customer.updated",
        "customer.created",
    ]
    created = everything.data[-1]
    assert created.id.startswith("evt_") and created.request is not None
    assert created.request.id is not None and created.request.id.startswith("req_")
    assert [e.type for e in client.v1.events.list(params={"type": "customer.*"}).data] == [
        "customer.updated",
        "customer.created",
    ]
    typed = client.v1.events.list(params={"types": ["product.created", "customer.created"]})
    assert len(typed.data) == 2
    window = client.v1.events.list(params={"created": {"gte": created.created}})
    assert len(window.data) == 3
    assert client.v1.events.retrieve(created.id).data.object["id"] == customer.id
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.events.retrieve("evt_missing")


def test_dropped_deliveries_stay_pending(
    client: stripe.StripeClient, receiver: Receiver, emulator: EmulatorServer
) -> None:
    endpoint_for(client, receiver)
    emulator.set_faults(webhook_drop_rate=1.0)
    client.v1.customers.create(params={"name": "lost"})
    assert emulator.wait_for_webhooks()
    assert receiver.bodies() == []
    assert httpx.get(f"{emulator.url}/_emulator/stats").json()["webhooks"]["dropped"] == 1
    [event] = client.v1.events.list().data
    assert event.pending_webhooks == 1
