"""`POST /api/webhooks/stripe` against Postgres, the Temporal dev server and the emulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from api.webhook_events import MAX_BODY_BYTES
from billing.config import Settings
from billing.constants import org_workflow_id
from tests.api.conftest import Api, start_dev_server
from tests.api.support import (
    WEBHOOK_SECRET,
    event_row,
    event_rows,
    post_event,
    serve,
    signalled_events,
    workflow_exists,
)
from tests.factories.orgs import make_org, unused_org_id
from tests.factories.stripe_events import (
    event_body,
    invoice_object,
    sign_stripe_payload,
    stripe_event,
    subscription_object,
)

URL = "/api/webhooks/stripe"
UPDATED = "customer.subscription.updated"


async def _post_raw(api: Api, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    response = await api.http.post(URL, content=body, headers=headers)
    return response.status_code


# Bad input: 400/413, nothing signalled, nothing recorded -----------------------


async def test_missing_signature_is_400_and_signals_nothing(api: Api) -> None:
    org = make_org(api.session_factory)
    body = event_body(stripe_event(UPDATED, subscription_object(org_id=org.id)))

    response = await api.http.post(URL, content=body)

    assert response.status_code == 400
    assert response.json() == {"detail": "Missing Stripe-Signature header"}
    assert not await workflow_exists(api.temporal, org.id)
    assert event_rows(api.session_factory) == []


async def test_signature_with_another_secret_is_400(api: Api) -> None:
    org = make_org(api.session_factory)
    event = stripe_event(UPDATED, subscription_object(org_id=org.id))

    response = await post_event(api.http, event, secret="whsec_someone_else")

    assert response.status_code == 400
    assert response.json()["detail"] == "Stripe-Signature does not match the body"
    assert not await workflow_exists(api.temporal, org.id)


async def test_body_changed_after_signing_is_400(api: Api) -> None:
    org = make_org(api.session_factory)
    body = event_body(stripe_event(UPDATED, subscription_object(org_id=org.id)))
    signature = sign_stripe_payload(body, WEBHOOK_SECRET)

    status = await _post_raw(api, body.replace(b"active", b"past_due"), signature)

    assert status == 400
    assert not await workflow_exists(api.temporal, org.id)


async def test_stale_signature_timestamp_is_400(api: Api) -> None:
    org = make_org(api.session_factory)
    event = stripe_event(UPDATED, subscription_object(org_id=org.id))

    response = await post_event(api.http, event, timestamp=int(time.time()) - 301)

    assert response.status_code == 400
    assert "tolerance" in response.json()["detail"]
    assert not await workflow_exists(api.temporal, org.id)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("garbage", "Stripe-Signature header is malformed"),
        ("t=1700000000", "Stripe-Signature header is malformed"),
        ("t=abc,v1=00", "Stripe-Signature header is malformed"),
    ],
)
async def test_malformed_signature_header_is_400(api: Api, header: str, reason: str) -> None:
    body = event_body(stripe_event(UPDATED, subscription_object(org_id=1)))
    response = await api.http.post(URL, content=body, headers={"Stripe-Signature": header})
    assert (response.status_code, response.json()["detail"]) == (400, reason)


async def test_signed_non_json_body_is_400(api: Api) -> None:
    body = b"this is not json"
    response = await api.http.post(
        URL, content=body, headers={"Stripe-Signature": sign_stripe_payload(body, WEBHOOK_SECRET)}
    )
    assert (response.status_code, response.json()["detail"]) == (400, "Body is not JSON")


async def test_non_utf8_body_is_400(api: Api) -> None:
    signature = sign_stripe_payload(b"{}", WEBHOOK_SECRET)
    response = await api.http.post(
        URL, content=b'{"id": "\xff\xfe"}', headers={"Stripe-Signature": signature}
    )
    assert (response.status_code, response.json()["detail"]) == (400, "Body is not UTF-8")


@pytest.mark.parametrize("missing", ["id", "type", "created", "data", "data.object"])
async def test_signed_json_that_is_not_an_event_is_400(api: Api, missing: str) -> None:
    org = make_org(api.session_factory)
    event = stripe_event(UPDATED, subscription_object(org_id=org.id))
    if missing == "data.object":
        del event["data"]["object"]
    else:
        del event[missing]
    body = json.dumps(event).encode()

    status = await _post_raw(api, body, sign_stripe_payload(body, WEBHOOK_SECRET))

    assert status == 400
    assert not await workflow_exists(api.temporal, org.id)
    assert event_rows(api.session_factory) == []


async def test_signed_json_array_is_400(api: Api) -> None:
    body = b"[1, 2, 3]"
    assert await _post_raw(api, body, sign_stripe_payload(body, WEBHOOK_SECRET)) == 400


async def test_body_over_one_mib_is_413(api: Api) -> None:
    body = b"x" * (MAX_BODY_BYTES + 1)
    signature = sign_stripe_payload(body, WEBHOOK_SECRET)
    response = await api.http.post(URL, content=body, headers={"Stripe-Signature": signature})
    assert response.status_code == 413
    assert response.json() == {"detail": f"Body is larger than {MAX_BODY_BYTES} bytes"}


async def test_chunked_body_over_one_mib_is_413_without_reading_it_all(api: Api) -> None:
    chunk = b"x" * 64 * 1024
    total_chunks = 64  # 4 MiB offered, no Content-Length
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(total_chunks):
            sent += 1
            yield chunk

    response = await api.http.post(URL, content=chunks(), headers={"Stripe-Signature": "t=1,v1=0"})

    assert response.status_code == 413
    # Stopped just past the limit (1 MiB = 16 chunks), not at the end of the stream.
    assert sent <= MAX_BODY_BYTES // len(chunk) + 2 < total_chunks


async def test_body_of_exactly_one_mib_is_read(api: Api) -> None:
    event = stripe_event("customer.created", {"id": "cus_big", "object": "customer"})
    event["padding"] = ""
    filler = MAX_BODY_BYTES - len(event_body(event))
    event["padding"] = "x" * filler
    body = event_body(event)
    assert len(body) == MAX_BODY_BYTES

    status = await _post_raw(api, body, sign_stripe_payload(body, WEBHOOK_SECRET))

    assert status == 200


# Routing: each way an event names its org ---------------------------------------


async def test_event_with_subscription_metadata_is_signalled(api: Api) -> None:
    org = make_org(api.session_factory)
    sub = subscription_object(org_id=org.id, customer="cus_meta")
    event = stripe_event(UPDATED, sub)

    response = await post_event(api.http, event)

    assert response.status_code == 200
    assert response.json() == {
        "event_id": event["id"],
        "outcome": "signalled",
        "org_id": org.id,
        "detail": f"signalled org-billing-{org.id}",
    }
    [signal] = await signalled_events(api.temporal, org.id)
    assert signal.event_id == event["id"]
    assert signal.type == UPDATED
    assert signal.created == event["created"]
    assert signal.object_id == sub["id"]
    assert signal.subscription_id == sub["id"]
    assert signal.customer_id == "cus_meta"
    row = event_row(api.session_factory, event["id"])
    assert row is not None
    assert (row.outcome, row.org_id, row.type, row.object_id) == (
        "signalled",
        org.id,
        UPDATED,
        sub["id"],
    )


async def test_invoice_routed_by_parent_subscription_details_metadata(api: Api) -> None:
    org = make_org(api.session_factory)
    invoice = invoice_object(org_id=org.id, subscription_id="sub_from_parent")
    event = stripe_event("invoice.payment_failed", invoice)

    response = await post_event(api.http, event)

    assert response.json()["outcome"] == "signalled"
    [signal] = await signalled_events(api.temporal, org.id)
    assert (signal.object_id, signal.subscription_id) == (invoice["id"], "sub_from_parent")
    assert signal.customer_id == invoice["customer"]


async def test_event_routed_by_customer_id_in_database(api: Api) -> None:
    org = make_org(api.session_factory, stripe_customer_id="cus_known_in_db")
    event = stripe_event(UPDATED, subscription_object(customer="cus_known_in_db"))

    response = await post_event(api.http, event)

    assert (response.status_code, response.json()["org_id"]) == (200, org.id)
    assert [s.event_id for s in await signalled_events(api.temporal, org.id)] == [event["id"]]


async def test_the_database_customer_wins_over_metadata_naming_another_org(api: Api) -> None:
    owner = make_org(api.session_factory, stripe_customer_id="cus_owned_by_a")
    other = make_org(api.session_factory)
    # E.g. a subscription made in the dashboard with a mistyped org_id.
    event = stripe_event(UPDATED, subscription_object(org_id=other.id, customer="cus_owned_by_a"))

    response = await post_event(api.http, event)

    assert (response.status_code, response.json()["org_id"]) == (200, owner.id)
    assert [s.event_id for s in await signalled_events(api.temporal, owner.id)] == [event["id"]]
    assert not await workflow_exists(api.temporal, other.id)


async def test_event_routed_by_customer_metadata_in_stripe(api: Api) -> None:
    org = make_org(api.session_factory)
    customer = api.stripe.v1.customers.create({"metadata": {"org_id": str(org.id)}})
    event = stripe_event("invoice.payment_succeeded", invoice_object(customer=customer.id))

    response = await post_event(api.http, event)

    assert (response.status_code, response.json()["org_id"]) == (200, org.id)
    assert response.json()["detail"] == f"signalled org-billing-{org.id}"
    assert [s.customer_id for s in await signalled_events(api.temporal, org.id)] == [customer.id]


async def test_redelivered_event_is_signalled_again_and_recorded_once(api: Api) -> None:
    org = make_org(api.session_factory)
    event = stripe_event(UPDATED, subscription_object(org_id=org.id))

    first = await post_event(api.http, event)
    second = await post_event(api.http, event)

    assert first.status_code == second.status_code == 200
    # The workflow drops the duplicate by event id; the log keeps one row.
    assert [r.id for r in event_rows(api.session_factory)] == [event["id"]]


async def test_deliveries_signal_the_running_workflow_and_start_a_new_one_once_it_ended(
    api: Api,
) -> None:
    """A running workflow is signalled (one run, every event in it); once that run has
    ended, the next delivery starts a new run that receives it first."""
    org = make_org(api.session_factory)
    first, second, third = (
        stripe_event(UPDATED, subscription_object(org_id=org.id)) for _ in range(3)
    )
    handle = api.temporal.get_workflow_handle(org_workflow_id(org.id))

    assert (await post_event(api.http, first)).status_code == 200
    started = (await handle.describe()).run_id
    assert (await post_event(api.http, second)).status_code == 200
    assert (await handle.describe()).run_id == started
    assert [s.event_id for s in await signalled_events(api.temporal, org.id)] == [
        first["id"],
        second["id"],
    ]

    await handle.terminate("the run ended")
    assert (await post_event(api.http, third)).status_code == 200
    after = await handle.describe()
    assert after.run_id != started and after.status == WorkflowExecutionStatus.RUNNING
    assert [s.event_id for s in await signalled_events(api.temporal, org.id)] == [third["id"]]


async def test_a_burst_of_deliveries_is_answered_and_logged_event_by_event(api: Api) -> None:
    """Deliveries in flight together share database round trips; each keeps its own answer."""
    owners = [make_org(api.session_factory, stripe_customer_id=f"cus_burst_{i}") for i in range(4)]
    other = make_org(api.session_factory)
    routed = [
        stripe_event(
            UPDATED,
            subscription_object(
                # Every other one names another org in its metadata: the database wins.
                org_id=other.id if i % 2 else None,
                customer=owners[i % 4].stripe_customer_id,
            ),
        )
        for i in range(40)
    ]
    missing = unused_org_id()
    unroutable = stripe_event(UPDATED, subscription_object(org_id=missing))
    ignored = stripe_event("customer.created", {"id": "cus_burst_new"})
    deliveries = [*routed, unroutable, ignored, routed[0]]  # and one redelivered at once

    responses = await asyncio.gather(*(post_event(api.http, e) for e in deliveries))

    assert [r.status_code for r in responses] == [200] * len(deliveries)
    answers = [r.json() for r in responses]
    for i, answer in enumerate(answers[:40]):
        assert (answer["outcome"], answer["org_id"]) == ("signalled", owners[i % 4].id)
    assert answers[40]["outcome"] == "unroutable"
    assert answers[41]["outcome"] == "ignored_type"
    for i, owner in enumerate(owners):
        signalled = {s.event_id for s in await signalled_events(api.temporal, owner.id)}
        assert signalled == {e["id"] for e in routed[i::4]}
    assert not await workflow_exists(api.temporal, other.id)
    rows = {row.id: row for row in event_rows(api.session_factory)}
    assert len(rows) == 42
    assert {rows[e["id"]].org_id for e in routed} == {o.id for o in owners}
    assert (rows[unroutable["id"]].outcome, rows[ignored["id"]].outcome) == (
        "unroutable",
        "ignored_type",
    )


# Events that are not ours: 200 and a row, no signal -----------------------------


async def test_unhandled_type_is_recorded_as_ignored(api: Api) -> None:
    org = make_org(api.session_factory)
    event = stripe_event("customer.created", {"id": "cus_x", "metadata": {"org_id": str(org.id)}})

    response = await post_event(api.http, event)

    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored_type"
    row = event_row(api.session_factory, event["id"])
    assert row is not None and row.outcome == "ignored_type"
    assert not await workflow_exists(api.temporal, org.id)


async def test_metadata_naming_a_missing_org_is_unroutable(api: Api) -> None:
    missing = unused_org_id()
    event = stripe_event(UPDATED, subscription_object(org_id=missing))

    response = await post_event(api.http, event)

    assert (response.status_code, response.json()["outcome"]) == (200, "unroutable")
    row = event_row(api.session_factory, event["id"])
    assert row is not None
    assert (row.outcome, row.org_id) == ("unroutable", None)
    assert f"org {missing}" in (row.detail or "")
    assert not await workflow_exists(api.temporal, missing)


async def test_customer_unknown_everywhere_is_unroutable(api: Api) -> None:
    customer = api.stripe.v1.customers.create({"metadata": {}})
    event = stripe_event(UPDATED, subscription_object(customer=customer.id))

    response = await post_event(api.http, event)

    assert (response.status_code, response.json()["outcome"]) == (200, "unroutable")


async def test_customer_missing_from_stripe_is_unroutable(api: Api) -> None:
    event = stripe_event(UPDATED, subscription_object(customer="cus_never_created"))
    response = await post_event(api.http, event)
    assert (response.status_code, response.json()["outcome"]) == (200, "unroutable")


async def test_non_numeric_org_metadata_is_unroutable(api: Api) -> None:
    event = stripe_event(UPDATED, subscription_object(org_id="acme"))
    response = await post_event(api.http, event)
    assert (response.status_code, response.json()["outcome"]) == (200, "unroutable")


# Dependencies down: 503, so Stripe retries --------------------------------------


async def test_temporal_down_is_503_and_nothing_recorded(
    api_settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
    stopped_temporal_client: Client,
    temporal_dev_env: WorkflowEnvironment,
) -> None:
    app = create_app(
        api_settings,
        temporal_client=stopped_temporal_client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    org = make_org(session_factory)
    event = stripe_event(UPDATED, subscription_object(org_id=org.id))
    async with serve(app) as http:
        started = time.monotonic()
        response = await post_event(http, event)
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["detail"]["title"] == "Temporal unavailable"
    assert response.headers["Retry-After"]
    assert elapsed < 5
    assert event_rows(session_factory) == []
    assert not await workflow_exists(temporal_dev_env.client, org.id)


async def test_temporal_going_down_after_startup_is_503(
    api_settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    env = await start_dev_server()
    app = create_app(
        api_settings,
        temporal_client=env.client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    org = make_org(session_factory)
    before = stripe_event(UPDATED, subscription_object(org_id=org.id))
    during = stripe_event(UPDATED, subscription_object(org_id=org.id))
    async with serve(app) as http:
        assert (await post_event(http, before)).status_code == 200
        await env.shutdown()
        assert (await post_event(http, during)).status_code == 503
        # Now known down: the next delivery is refused without waiting on retries.
        started = time.monotonic()
        assert (await post_event(http, during)).status_code == 503
        assert time.monotonic() - started < 1

    assert [r.id for r in event_rows(session_factory)] == [before["id"]]


async def test_database_down_is_503(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    dead_session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    app = create_app(
        api_settings,
        temporal_client=temporal_dev_env.client,
        session_factory=dead_session_factory,
        stripe_client=stripe_client,
    )
    org_id = unused_org_id()
    async with serve(app) as http:
        routed = await post_event(http, stripe_event(UPDATED, subscription_object(org_id=org_id)))
        ignored = await post_event(http, stripe_event("customer.created", {"id": "cus_1"}))

    for response in (routed, ignored):
        assert response.status_code == 503
        assert response.json()["detail"]["title"] == "Database unavailable"
    assert not await workflow_exists(temporal_dev_env.client, org_id)


async def test_stripe_down_while_routing_by_customer_is_503(api: Api) -> None:
    event = stripe_event(UPDATED, subscription_object(customer="cus_only_stripe_knows"))
    api.emulator.set_faults(error_rate_500=1.0)

    response = await post_event(api.http, event)

    assert response.status_code == 503
    assert response.json()["detail"]["title"] == "Stripe unavailable"
    assert event_rows(api.session_factory) == []


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ({"stripe_webhook_secret": ""}, "STRIPE_WEBHOOK_SECRET"),
        ({"stripe_secret_key": ""}, "STRIPE_SECRET_KEY"),
    ],
)
async def test_stripe_not_configured_is_500_naming_the_variable(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    unset: dict[str, str],
    named: str,
) -> None:
    settings = api_settings.model_copy(update=unset)
    app = create_app(
        settings, temporal_client=temporal_dev_env.client, session_factory=session_factory
    )
    event = stripe_event(UPDATED, subscription_object(org_id=1))
    async with serve(app) as http:
        response = await post_event(http, event)

    assert response.status_code == 500
    detail = response.json()["detail"]
    assert detail["title"] == "Stripe not configured"
    assert named in detail["description"]
