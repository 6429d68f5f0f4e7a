"""The gateway's Stripe settings have their effect, checked against the emulator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import stripe

from billing.config import Settings
from billing.domain import OrgProfile
from billing.stripe_gateway import StripeGateway, make_stripe_client
from billing.stripe_keys import meter_identifier
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
    customer_id = await gw.create_customer(org)
    snapshot = await gw.create_subscription(customer_id, org)
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


# Environment identity -------------------------------------------------------------------

PRODUCTION_UID = "11111111-1111-4111-8111-111111111111"
STAGING_UID = "22222222-2222-4222-8222-222222222222"


def org_seven(uid: str) -> OrgProfile:
    """Org 7 as each environment knows it: same id, same owner, its own uid."""
    return OrgProfile(org_id=7, org_uid=uid, name="Seven", owner_email="ops@seven.test")


async def test_the_customer_lookup_finds_only_this_environments_customer_of_the_org(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    production = gateway(emulator, catalog, billing_source="production")
    staging = gateway(emulator, catalog, billing_source="staging")
    staging_customer = await staging.create_or_get_customer(org_seven(STAGING_UID))
    # Look-alikes: a dashboard customer naming org 7, and production's uid under
    # another source (a database restored into staging).
    stripe_client.v1.customers.create({"email": "x@seven.test", "metadata": {"org_id": "7"}})
    await staging.create_customer(org_seven(PRODUCTION_UID))

    assert await production.find_customer_for_org(org_seven(PRODUCTION_UID)) is None
    mine = await production.create_or_get_customer(org_seven(PRODUCTION_UID))
    assert mine != staging_customer
    assert await production.create_or_get_customer(org_seven(PRODUCTION_UID)) == mine
    assert await staging.create_or_get_customer(org_seven(STAGING_UID)) == staging_customer
    metadata = stripe_client.v1.customers.retrieve(mine).to_dict()["metadata"]
    assert (metadata["org_id"], metadata["org_uid"], metadata["source"]) == (
        "7",
        PRODUCTION_UID,
        "production",
    )


async def test_idempotency_keys_of_two_environments_never_replay_each_other(
    emulator: EmulatorServer, catalog: dict[str, str]
) -> None:
    """Same org id, same owner, same prices: two customers and two subscriptions."""
    production = gateway(emulator, catalog, billing_source="production")
    staging = gateway(emulator, catalog, billing_source="staging")
    ours = await production.create_customer(org_seven(PRODUCTION_UID))
    theirs = await staging.create_customer(org_seven(STAGING_UID))
    assert ours != theirs
    our_sub = await production.create_subscription(ours, org_seven(PRODUCTION_UID))
    their_sub = await staging.create_subscription(theirs, org_seven(STAGING_UID))
    assert our_sub.id != their_sub.id
    assert (our_sub.customer_id, their_sub.customer_id) == (ours, theirs)


async def test_meter_events_of_two_environments_are_both_counted(
    emulator: EmulatorServer, catalog: dict[str, str]
) -> None:
    """The same org id, dimension, period and seq is a different event in each environment."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    outcomes = []
    for source, uid in (("production", PRODUCTION_UID), ("staging", STAGING_UID)):
        gw = gateway(emulator, catalog, billing_source=source)
        customer = await gw.create_customer(org_seven(uid))
        identifier = meter_identifier(
            7, "additional_requests", start, 1, source=source, org_uid=uid
        )
        outcomes.append(
            await gw.report_usage(
                customer_id=customer,
                event_name="additional_requests",
                value=5,
                timestamp=now,
                identifier=identifier,
            )
        )
    assert outcomes == ["sent", "sent"]


async def test_a_customer_is_the_orgs_only_with_its_uid_and_source(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    production = gateway(emulator, catalog, billing_source="production")
    staging = gateway(emulator, catalog, billing_source="staging")
    org = org_seven(PRODUCTION_UID)
    ours = await production.create_customer(org)
    assert await production.customer_problem(ours, org) is None
    restored = await staging.create_customer(org_seven(STAGING_UID))
    problem = await production.customer_problem(restored, org)
    assert problem is not None and "not provably org 7's" in problem
    dashboard = stripe_client.v1.customers.create({"metadata": {"org_id": "7"}}).id
    assert await production.customer_problem(dashboard, org) is not None
    stripe_client.v1.customers.delete(ours)
    assert await production.customer_problem(ours, org) == f"customer {ours} is deleted in Stripe"


async def test_webhook_routing_ignores_another_environments_customer(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    production = gateway(emulator, catalog, billing_source="production")
    staging = gateway(emulator, catalog, billing_source="staging")
    theirs = await staging.create_customer(org_seven(STAGING_UID))
    assert await production.customer_org_id(theirs) is None
    assert await staging.customer_org_id(theirs) == "7"
    dashboard = stripe_client.v1.customers.create({"metadata": {"org_id": "7"}}).id
    assert await production.customer_org_id(dashboard) == "7"


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
