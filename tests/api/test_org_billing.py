"""`GET /api/orgs/{org_id}/billing`: members see the state; nobody learns about other orgs."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from api.temporal import QUERY_TIMEOUT_SECONDS
from billing.domain import BillingStatus, OrgBillingState, StripeEventSignal, SubscriptionStatus
from billing.orchestration import StartSignal, start_org_workflow
from tests.api.conftest import Api
from tests.api.support import bearer, org_workflow_with_state
from tests.factories.orgs import make_org, make_org_with_member, make_user, unused_org_id


def _url(org_id: int) -> str:
    return f"/api/orgs/{org_id}/billing"


async def test_member_reads_live_workflow_state(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)
    state = OrgBillingState(
        org_id=org.id,
        status=BillingStatus.PAST_DUE,
        stripe_customer_id="cus_live",
        stripe_subscription_id="sub_live",
        subscription_status=SubscriptionStatus.PAST_DUE,
        current_period_end=datetime(2030, 1, 1, tzinfo=UTC),
    )
    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))

    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "workflow"
    assert OrgBillingState.model_validate(body) == state


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
    assert body["source"] == "database"
    assert (body["org_id"], body["status"], body["subscription_status"]) == (
        org.id,
        "active",
        "active",
    )
    assert (body["stripe_customer_id"], body["stripe_subscription_id"]) == ("cus_row", "sub_row")


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
