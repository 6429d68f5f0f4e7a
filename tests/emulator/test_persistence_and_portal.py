"""A restarted emulator keeps its objects; the billing portal answers on the emulator."""

from __future__ import annotations

from pathlib import Path

import httpx
import stripe

from stripe_emulator.client import make_client
from stripe_emulator.server import EmulatorConfig, EmulatorServer
from tests.emulator.helpers import make_catalog, subscription_items


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "emulator.json"
    with EmulatorServer(EmulatorConfig(port=0, state_file=str(state_file))) as first:
        client = make_client(first.url)
        catalog = make_catalog(client)
        clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": 1767225600})
        customer = client.v1.customers.create(
            params={"email": "keep@x.io", "test_clock": clock.id, "metadata": {"org_id": "5"}},
            options={"idempotency_key": "customer-create-5"},
        )
        sub = client.v1.subscriptions.create(
            params={
                "customer": customer.id,
                "items": subscription_items(catalog),
                "trial_period_days": 30,
            }
        )
        client.v1.billing.meter_events.create(
            params={
                "event_name": "additional_requests",
                "payload": {"stripe_customer_id": customer.id, "value": "3"},
                "identifier": "kept-identifier",
                "timestamp": 1767225600,
            }
        )
    assert state_file.exists()

    with EmulatorServer(EmulatorConfig(port=0, state_file=str(state_file))) as second:
        client = make_client(second.url)
        assert client.v1.customers.retrieve(customer.id).email == "keep@x.io"
        assert client.v1.subscriptions.retrieve(sub.id).status == "trialing"
        found = client.v1.customers.search(params={"query": "metadata['org_id']:'5'"})
        assert [c.id for c in found.data] == [customer.id]
        replay = client.v1.customers.create(
            params={"email": "keep@x.io", "test_clock": clock.id, "metadata": {"org_id": "5"}},
            options={"idempotency_key": "customer-create-5"},
        )
        assert replay.id == customer.id
        try:
            client.v1.billing.meter_events.create(
                params={
                    "event_name": "additional_requests",
                    "payload": {"stripe_customer_id": customer.id, "value": "3"},
                    "identifier": "kept-identifier",
                    "timestamp": 1767225600,
                }
            )
            raise AssertionError("the identifier should still be known")
        except stripe.InvalidRequestError as exc:
            assert "already exists" in str(exc)
        client.v1.test_helpers.test_clocks.advance(
            clock.id, params={"frozen_time": 1767225600 + 31 * 86400}
        )
        assert client.v1.subscriptions.retrieve(sub.id).status == "past_due"


def test_portal_configuration_and_session(
    emulator: EmulatorServer, client: stripe.StripeClient
) -> None:
    configuration = client.v1.billing_portal.configurations.create(
        params={
            "features": {"invoice_history": {"enabled": True}},
            "business_profile": {"headline": "Acme billing"},
            "default_return_url": "https://app.example.com/settings",
        }
    )
    assert configuration.id.startswith("bpc_") and configuration.is_default
    listed = client.v1.billing_portal.configurations.list()
    assert [c.id for c in listed.data] == [configuration.id]
    customer = client.v1.customers.create(params={"name": "Portal Person", "email": "p@x.io"})
    session = client.v1.billing_portal.sessions.create(
        params={"customer": customer.id, "return_url": "https://app.example.com/back"}
    )
    assert session.id.startswith("bps_")
    assert session.configuration == configuration.id
    assert session.url == f"{emulator.url}/p/session/{session.id}"
    page = httpx.get(session.url)
    assert page.status_code == 200 and "Portal Person" in page.text
    assert customer.id in page.text and "https://app.example.com/back" in page.text
    assert httpx.get(f"{emulator.url}/p/session/bps_nope").status_code == 404
    other = client.v1.billing_portal.sessions.create(
        params={"customer": customer.id, "configuration": configuration.id}
    )
    assert other.return_url == "https://app.example.com/settings"


def test_the_portal_page_shows_dates_a_person_reads(
    emulator: EmulatorServer, client: stripe.StripeClient
) -> None:
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": 1798761600})
    customer = client.v1.customers.create(params={"name": "Dated", "test_clock": clock.id})
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 4900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Base"},
        }
    )
    sub = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": [{"price": price.id}], "trial_period_days": 30}
    )
    session = client.v1.billing_portal.sessions.create(params={"customer": customer.id})
    page = httpx.get(session.url).text
    # 2027-01-01 00:00 UTC plus a 30-day trial; never the raw epoch.
    assert f"{sub.id}: trialing, trial ends 2027-01-31 00:00 UTC" in page
    assert str(sub.trial_end) not in page


def test_undelivered_webhooks_are_sent_after_a_restart(tmp_path: Path) -> None:
    from tests.emulator.helpers import start_receiver

    receiver = start_receiver()
    receiver.statuses.append(500)
    state_file = str(tmp_path / "emulator.json")
    config = EmulatorConfig(port=0, state_file=state_file, webhook_retry_delays=(60,))
    with EmulatorServer(config) as first:
        client = make_client(first.url)
        endpoint = client.v1.webhook_endpoints.create(
            params={"url": receiver.url, "enabled_events": ["customer.created"]}
        )
        customer = client.v1.customers.create(params={"name": "late"})
        receiver.wait_for(lambda _: receiver.statuses == [])
    assert receiver.deliveries == []
    with EmulatorServer(EmulatorConfig(port=0, state_file=state_file)) as second:
        assert second.wait_for_webhooks()
    assert endpoint.secret is not None
    [event] = receiver.events(endpoint.secret)
    assert event.data.object["id"] == customer.id
    receiver.server.shutdown()
