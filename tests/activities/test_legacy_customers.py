"""Legacy customers (metadata `orgId`, `orgUid`, `source`) and what the meter already holds."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest
import stripe

from billing.domain import OrgProfile
from stripe_emulator.server import EmulatorServer
from tests.activities.test_stripe_gateway import gateway

pytestmark = pytest.mark.asyncio


def org(uid: str) -> OrgProfile:
    return OrgProfile(org_id=7, org_uid=uid, name="Acme", owner_email="ada@example.com")


async def test_a_legacy_customer_is_linked_only_once_adoption_added_org_uid(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    ours = gateway(emulator, catalog, billing_source="production")
    uid = str(uuid.uuid4())
    legacy = {"orgId": "7", "orgUid": uid, "source": "flotorch_console"}
    customer = stripe_client.v1.customers.create({"metadata": legacy}).id
    metadata = await ours.customer_metadata(customer)
    assert metadata == legacy
    # `billing adopt` recognizes it; provisioning does not link it yet.
    assert ours.is_legacy_customer_of(metadata, org(uid))
    problem = await ours.customer_problem(customer, org(uid))
    assert problem is not None and "not provably org 7's" in problem

    await ours.add_customer_metadata(
        customer, {"org_id": "7", "org_uid": uid}, idempotency_key=f"adopt-{customer}"
    )
    merged = await ours.customer_metadata(customer)
    assert merged == {**legacy, "org_id": "7", "org_uid": uid}
    assert await ours.customer_problem(customer, org(uid)) is None

    # Another org's uid, another org's id, a source not listed: never the org's.
    assert not ours.is_legacy_customer_of(merged, org(str(uuid.uuid4())))
    assert not ours.is_legacy_customer_of({**legacy, "orgId": "8"}, org(uid))
    assert not ours.is_legacy_customer_of({**legacy, "source": "elsewhere"}, org(uid))
    strict = gateway(emulator, catalog, billing_source="production", billing_legacy_sources="")
    assert not strict.is_legacy_customer_of(legacy, org(uid))
    assert await strict.customer_problem(customer, org(uid)) is not None


async def test_reported_usage_sums_the_meter_over_whole_minutes(
    emulator: EmulatorServer, catalog: dict[str, str], stripe_client: stripe.StripeClient
) -> None:
    ours = gateway(emulator, catalog)
    customer = stripe_client.v1.customers.create({"metadata": {}}).id
    meter = await ours.meter_id("additional_requests")
    assert meter is not None
    assert await ours.meter_id("no_such_event") is None
    now = int(time.time()) // 60 * 60 - 600
    for i, (value, offset) in enumerate([(5, 0), (7, 59), (11, 125), (100, 400)]):
        stripe_client.v1.billing.meter_events.create(
            {
                "event_name": "additional_requests",
                "payload": {"stripe_customer_id": customer, "value": str(value)},
                "timestamp": now + offset,
                "identifier": f"requests-7-{customer}-{i}",
            }
        )

    def ts(seconds: int) -> datetime:
        return datetime.fromtimestamp(seconds, UTC)

    # From 30 s into the first minute to 10 s into the third: the whole minutes
    # around it, so events of the range's first and last seconds are counted.
    assert await ours.reported_usage(meter, customer, ts(now + 30), ts(now + 130)) == 23
    assert await ours.reported_usage(meter, customer, ts(now), ts(now + 120)) == 12
    assert await ours.reported_usage(meter, customer, ts(now), ts(now)) == 0
