"""`GET /api/orgs/{org_id}/billing`: members see a public view; nobody learns about other orgs.

The workflow's full state (Stripe ids, raw errors, watermarks, event ids) is
for operators; members get status, dates and the current period's usage.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from api.temporal import QUERY_TIMEOUT_SECONDS
from billing.db import orgs
from billing.domain import (
    BillingPeriod,
    BillingStatus,
    OrgBillingState,
    StripeEventSignal,
    SubscriptionStatus,
    UsagePeriodReport,
)
from billing.orchestration import StartSignal, start_org_workflow
from tests.api.conftest import Api
from tests.api.support import bearer, org_workflow_with_state
from tests.factories.orgs import (
    add_member,
    make_org,
    make_org_with_member,
    make_user,
    unused_org_id,
)


def _url(org_id: int) -> str:
    return f"/api/orgs/{org_id}/billing"


PUBLIC_FIELDS = {
    "org_id",
    "status",
    "subscription_end",
    "trial_end",
    "current_period_start",
    "current_period_end",
    "usage",
    "source",
}


def _record(api: Api, org_id: int, count: int, at: datetime) -> None:
    with api.session_factory.begin() as session:
        orgs.record_requests(session, org_id, count, at)


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _internal_state(org_id: int, now: datetime) -> OrgBillingState:
    """A state holding everything a member must not see."""
    start, end = now - timedelta(days=10), now + timedelta(days=20)
    return OrgBillingState(
        org_id=org_id,
        status=BillingStatus.PAST_DUE,
        stripe_customer_id="cus_secret_customer",
        stripe_subscription_id="sub_secret_subscription",
        subscription_status=SubscriptionStatus.PAST_DUE,
        subscription_end=end,
        trial_end=start - timedelta(days=30),
        current_period_start=start,
        current_period_end=end,
        last_error="InvalidRequestError: No such customer: 'cus_someone_else' (req_secret)",
        last_event_id="evt_secret_event",
        last_event_type="invoice.payment_failed",
        watermarks={"sub_secret_subscription": 1_700_000_000},
        seen_event_ids=["evt_secret_seen"],
        usage=[UsagePeriodReport(period_start=start, period_end=end, users=9, requests=99)],
        to_finalize=[BillingPeriod(start=start - timedelta(days=30), end=start)],
    )


async def test_member_reads_the_public_view_of_the_live_state(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)
    owner = make_user(api.session_factory)
    add_member(api.session_factory, org.id, owner.id, role="owner")
    now = datetime.now(UTC)
    state = _internal_state(org.id, now)
    assert state.current_period_start is not None
    _record(api, org.id, 5, state.current_period_start - timedelta(seconds=1))  # last period
    _record(api, org.id, 7, state.current_period_start)
    _record(api, org.id, 11, now - timedelta(hours=1))
    _record(api, org.id, 13, now + timedelta(days=2))  # recorded ahead: not used yet

    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == PUBLIC_FIELDS
    assert body["source"] == "workflow"
    assert (body["org_id"], body["status"]) == (org.id, "past_due")
    assert body["current_period_start"] == _iso(state.current_period_start)
    assert body["current_period_end"] == _iso(state.current_period_end)  # type: ignore[arg-type]
    assert body["subscription_end"] == _iso(state.subscription_end)  # type: ignore[arg-type]
    assert body["trial_end"] == _iso(state.trial_end)  # type: ignore[arg-type]
    usage = body["usage"]
    assert (usage["users"], usage["requests"]) == (2, 7 + 11)
    as_of = datetime.fromisoformat(usage["as_of"])
    assert now <= as_of <= datetime.now(UTC)


async def test_the_public_view_holds_no_stripe_ids_errors_watermarks_or_event_ids(
    api: Api,
) -> None:
    """The whole state used to be answered: another customer's id in a raw Stripe
    error, our customer and subscription ids, watermarks and event ids."""
    org, user = make_org_with_member(api.session_factory)
    state = _internal_state(org.id, datetime.now(UTC))

    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))

    assert response.status_code == 200, response.text
    for secret in (
        "cus_",
        "sub_secret",
        "req_secret",
        "evt_",
        "InvalidRequestError",
        "1700000000",
        "watermarks",
        "seen_event_ids",
        "last_error",
        "to_finalize",
    ):
        assert secret not in response.text, secret


async def test_the_documented_answer_is_the_public_view(api: Api) -> None:
    document = (await api.http.get("/openapi.json")).json()
    answer = document["paths"]["/api/orgs/{org_id}/billing"]["get"]["responses"]["200"]
    schema = answer["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/OrgBillingPublic"}
    model = document["components"]["schemas"]["OrgBillingPublic"]
    assert set(model["properties"]) == PUBLIC_FIELDS
    usage = document["components"]["schemas"]["UsageSoFarPublic"]
    assert set(usage["properties"]) == {"users", "requests", "as_of"}


async def test_the_public_view_is_the_same_for_owner_billing_admin_and_member(api: Api) -> None:
    org, member = make_org_with_member(api.session_factory)
    admin = make_user(api.session_factory)
    owner = make_user(api.session_factory)
    add_member(api.session_factory, org.id, admin.id, role="billing_admin")
    add_member(api.session_factory, org.id, owner.id, role="owner")
    state = _internal_state(org.id, datetime.now(UTC))

    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        bodies = [
            (await api.http.get(_url(org.id), headers=bearer(who.id, org.id))).json()
            for who in (member, admin, owner)
        ]

    for body in bodies:
        assert set(body) == PUBLIC_FIELDS
        assert body["usage"]["users"] == 3


async def test_without_a_workflow_the_row_answers(api: Api) -> None:
    org, user = make_org_with_member(
        api.session_factory,
        stripe_customer_id="cus_row",
        stripe_subscription_id="sub_row",
        subscription_status=SubscriptionStatus.ACTIVE,
    )

    response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == PUBLIC_FIELDS
    assert (body["source"], body["org_id"], body["status"]) == ("database", org.id, "active")
    # The row knows no period: usage so far cannot be told.
    assert (body["current_period_start"], body["usage"]) == (None, None)
    assert "cus_row" not in response.text and "sub_row" not in response.text


async def test_row_of_an_org_not_provisioned_yet_says_provisioning(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)
    response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))
    assert (response.json()["source"], response.json()["status"]) == ("database", "provisioning")


async def test_other_orgs_token_gets_the_same_403_whether_or_not_the_org_exists(api: Api) -> None:
    mine, me = make_org_with_member(api.session_factory)
    existing = make_org(api.session_factory)
    headers = bearer(me.id, mine.id)

    for_existing = await api.http.get(_url(existing.id), headers=headers)
    for_missing = await api.http.get(_url(unused_org_id()), headers=headers)

    assert for_existing.status_code == for_missing.status_code == 403
    assert for_existing.json() == for_missing.json()
    assert for_existing.content == for_missing.content


async def test_token_for_a_missing_org_gets_the_same_403_on_every_route(api: Api) -> None:
    user = make_user(api.session_factory)
    missing = unused_org_id()
    headers = bearer(user.id, missing)

    billing = await api.http.get(_url(missing), headers=headers)
    portal = await api.http.post("/api/payments/stripe/portal", headers=headers)

    expected = {"detail": "Not a member of this organization"}
    assert (billing.status_code, billing.json()) == (403, expected)
    assert (portal.status_code, portal.json()) == (403, expected)


async def test_non_member_with_a_token_for_the_org_is_403(api: Api) -> None:
    org = make_org(api.session_factory)
    stranger = make_user(api.session_factory)
    response = await api.http.get(_url(org.id), headers=bearer(stranger.id, org.id))
    assert (response.status_code, response.json()) == (
        403,
        {"detail": "Not a member of this organization"},
    )


async def test_no_token_is_401(api: Api) -> None:
    org = make_org(api.session_factory)
    response = await api.http.get(_url(org.id))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_org_id_that_is_not_an_id_is_422(api: Api) -> None:
    user = make_user(api.session_factory)
    for bad in ("abc", "0", str(2**31)):
        response = await api.http.get(f"/api/orgs/{bad}/billing", headers=bearer(user.id, 1))
        assert response.status_code == 422, bad


async def test_workflow_without_a_worker_falls_back_to_the_row(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id="cus_row")
    signal = StripeEventSignal(event_id="evt_1", type="x", created=1, object_id="sub_1")
    await start_org_workflow(
        api.temporal,
        api.settings.temporal_task_queue,
        org.id,
        signal=StartSignal.stripe_event(signal),
    )

    started = time.monotonic()
    response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))

    assert response.status_code == 200
    assert response.json()["source"] == "database"
    assert time.monotonic() - started < QUERY_TIMEOUT_SECONDS + 1
