"""The gateway's Stripe settings have their effect, checked against the emulator."""

from __future__ import annotations

import pytest
import stripe

from billing.config import Settings
from billing.domain import OrgProfile
from billing.stripe_gateway import StripeGateway, make_stripe_client
from stripe_emulator.server import EmulatorServer

pytestmark = pytest.mark.asyncio


def gateway(emulator: EmulatorServer, catalog: dict[str, str], **values: object) -> StripeGateway:
    settings = Settings.model_validate(
        {
            "stripe_secret_key": "sk_test_gateway",
            "stripe_webhook_secret": "whsec_gateway",
            "stripe_api_base": emulator.url,
            **catalog,
            **values,
        }
    )
    return StripeGateway(
        make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base), settings
    )


async def test_promotion_codes_turn_on_the_portal_code_entry(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    customer = stripe_client.v1.customers.create({"email": "a@example.com"})
    plain = gateway(emulator, catalog, stripe_allow_promotion_codes=False)
    assert await plain.portal_configuration() is None
    assert await plain.create_portal_link(customer.id, return_url="https://app.test/")

    allowing = gateway(emulator, catalog, stripe_allow_promotion_codes=True)
    config_id = await allowing.portal_configuration()
    assert config_id
    config = stripe_client.v1.billing_portal.configurations.retrieve(config_id).to_dict()
    update = config["features"]["subscription_update"]
    assert update["enabled"] is True
    assert update["default_allowed_updates"] == ["promotion_code"]
    assert await allowing.create_portal_link(customer.id, return_url="https://app.test/")
    # Found again by its metadata, not created twice (another process, same account).
    again = gateway(emulator, catalog, stripe_allow_promotion_codes=True)
    assert await again.portal_configuration() == config_id
    managed = [
        c
        for c in stripe_client.v1.billing_portal.configurations.list().data
        if (c.to_dict().get("metadata") or {}).get("promotion_codes") == "on"
    ]
    assert len(managed) == 1


@pytest.mark.parametrize("enabled", [True, False])
async def test_automatic_tax_follows_the_setting(
    emulator: EmulatorServer,
    catalog: dict[str, str],
    stripe_client: stripe.StripeClient,
    enabled: bool,
) -> None:
    gw = gateway(emulator, catalog, stripe_automatic_tax=enabled)
    org = OrgProfile(org_id=7, org_uid="uid-7", name="Tax Co", owner_email="t@example.com")
    customer_id = await gw.create_customer(org, idempotency_key=f"customer-create-tax-{enabled}")
    snapshot = await gw.create_subscription(
        customer_id, org, idempotency_key=f"subscription-create-tax-{enabled}"
    )
    sub = stripe_client.v1.subscriptions.retrieve(snapshot.id)
    assert sub.automatic_tax.enabled is enabled


def _sub(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "sub_1",
        "customer": "cus_1",
        "status": "active",
        "items": {"data": [{"current_period_start": 1000, "current_period_end": 2000}]},
    }
    return {**base, **fields}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cancel_at": 1500, "status": "active"}, 1500),
        ({"cancel_at": 1500, "status": "trialing", "trial_end": 1800}, 1500),
        ({"status": "canceled", "ended_at": 1400, "canceled_at": 1300}, 1400),
        ({"status": "canceled", "ended_at": None, "canceled_at": 1300}, 1300),
        ({"status": "trialing", "trial_end": 1800}, 1800),
        ({"status": "active", "trial_end": 900}, 2000),
        ({"status": "past_due"}, 2000),
        ({"status": "active", "pause_collection": {"behavior": "void"}}, 2000),
    ],
)
async def test_subscription_end_follows_the_design_rule(
    fields: dict[str, object], expected: int
) -> None:
    from datetime import UTC, datetime

    from billing.stripe_gateway import snapshot_of

    snapshot = snapshot_of(_sub(**fields))
    assert snapshot.subscription_end == datetime.fromtimestamp(expected, UTC)
    assert snapshot.status.value == fields["status"]
    assert snapshot.pause_collection is bool(fields.get("pause_collection"))


async def test_a_read_carries_stripes_clock_a_test_clocks_time_for_objects_on_one(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    from datetime import UTC, datetime, timedelta

    ahead = int((datetime.now(UTC) + timedelta(days=40)).timestamp())
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": ahead})
    customer = stripe_client.v1.customers.create({"test_clock": clock.id})
    on_clock = stripe_client.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"price": catalog["stripe_price_id"], "quantity": 1}]}
    )
    plain = stripe_client.v1.customers.create({})
    off_clock = stripe_client.v1.subscriptions.create(
        {"customer": plain.id, "items": [{"price": catalog["stripe_price_id"], "quantity": 1}]}
    )
    stripe_gateway = gateway(emulator, catalog)
    before = datetime.now(UTC)

    read = await stripe_gateway.get_subscription(on_clock.id)
    listed = await stripe_gateway.find_live_subscription(customer.id)
    plain_read = await stripe_gateway.get_subscription(off_clock.id)

    assert read.read_at == datetime.fromtimestamp(ahead, UTC)
    assert listed is not None and listed.read_at == datetime.fromtimestamp(ahead, UTC)
    assert plain_read.read_at is not None
    assert before - timedelta(seconds=1) <= plain_read.read_at <= datetime.now(UTC)
    ended = await stripe_gateway.set_cancel_at_period_end(
        on_clock.id, True, idempotency_key="cancel-at-period-end-test"
    )
    assert ended.cancel_at == ended.current_period_end
    assert ended.read_at == datetime.fromtimestamp(ahead, UTC)
