"""`GET /api/orgs/{org_id}/entitlement`: the one rule, from the workflow or from the row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from billing.config import Settings
from billing.db.models import Org
from billing.domain import BillingStatus, OrgBillingState, SubscriptionStatus
from stripe_emulator.server import EmulatorServer
from tests.api.conftest import Api
from tests.api.support import bearer, make_api_settings, org_workflow_with_state
from tests.factories.orgs import make_org, make_org_with_member, make_user, unused_org_id

SERVICE_KEY = "svc-0123456789abcdef0123456789abcdef"


@pytest.fixture
def api_settings(database_url: str, emulator: EmulatorServer, task_queue: str) -> Settings:
    """The suite's API settings, with service keys (one of them ours)."""
    return make_api_settings(
        database_url=database_url,
        stripe_api_base=emulator.url,
        temporal_task_queue=task_queue,
        billing_service_api_keys=f" svc-someone-else-{'0' * 32} ,{SERVICE_KEY},",
    )


def _service() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_KEY}"}


FIELDS = {"entitled", "reason", "status", "access_until", "trial_end", "grace_until"}


def _url(org_id: int) -> str:
    return f"/api/orgs/{org_id}/entitlement"


async def test_a_member_reads_the_workflow_s_answer(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)
    now = datetime.now(UTC)
    failed = now - timedelta(days=2)
    state = OrgBillingState(
        org_id=org.id,
        status=BillingStatus.PAST_DUE,
        subscription_status=SubscriptionStatus.PAST_DUE,
        current_period_end=now + timedelta(days=20),
        payment_failed_at=failed,
    )
    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == FIELDS
    assert (body["entitled"], body["reason"], body["status"]) == (
        True,
        "past_due_grace",
        "past_due",
    )
    grace_until = failed + timedelta(days=api.settings.past_due_grace_days)
    assert datetime.fromisoformat(body["grace_until"]) == grace_until
    assert body["access_until"] == body["grace_until"]


async def test_without_a_workflow_the_row_answers(api: Api) -> None:
    org, user = make_org_with_member(
        api.session_factory,
        stripe_customer_id="cus_row",
        stripe_subscription_id="sub_row",
        subscription_status=SubscriptionStatus.CANCELED,
    )
    ended = datetime.now(UTC) - timedelta(hours=1)
    with api.session_factory.begin() as session:
        session.execute(
            update(Org).where(Org.id == org.id).values(access_until=ended, entitled=False)
        )
    response = await api.http.get(_url(org.id), headers=bearer(user.id, org.id))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["entitled"], body["reason"], body["status"]) == (False, "canceled", "canceled")

    never_billed, member = make_org_with_member(api.session_factory)
    response = await api.http.get(_url(never_billed.id), headers=bearer(member.id, never_billed.id))
    assert response.json()["reason"] == "provisioning" and response.json()["entitled"] is True


async def test_callers_who_may_not_read_it(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)
    stranger = make_user(api.session_factory)
    other = make_org(api.session_factory)
    assert (await api.http.get(_url(org.id))).status_code == 401
    assert (
        await api.http.get(_url(org.id), headers=bearer(stranger.id, org.id))
    ).status_code == 403
    assert (await api.http.get(_url(org.id), headers=bearer(user.id, other.id))).status_code == 403
    assert (
        await api.http.get(_url(org.id), headers={"Authorization": "Bearer not-a-service-key"})
    ).status_code == 401
    assert (await api.http.get(_url(0), headers=bearer(user.id, org.id))).status_code == 422
    missing = unused_org_id()
    assert (await api.http.get(_url(missing), headers=bearer(user.id, missing))).status_code == 403


async def test_a_service_key_reads_any_org_and_learns_which_do_not_exist(api: Api) -> None:
    org = make_org(api.session_factory, aws_account_id="123456789012")
    response = await api.http.get(_url(org.id), headers=_service())
    assert response.status_code == 200, response.text
    assert (response.json()["entitled"], response.json()["reason"]) == (True, "not_billed")
    missing = await api.http.get(_url(unused_org_id()), headers=_service())
    assert missing.status_code == 404
    near_miss = {"Authorization": f"Bearer {SERVICE_KEY[:-1]}"}
    assert (await api.http.get(_url(org.id), headers=near_miss)).status_code == 401
