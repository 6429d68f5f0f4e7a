"""`POST /api/payments/stripe/portal`: tokens, membership, customer lookup, Stripe failures."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import jwt
import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.auth import mint_token
from billing.config import Settings
from billing.domain import BillingStatus, OrgBillingState
from stripe_emulator.server import EmulatorServer
from tests.api.conftest import Api
from tests.api.support import JWT_SECRET, bearer, org_workflow_with_state, serve
from tests.factories.orgs import make_org, make_org_with_member, make_user, remove_member

URL = "/api/payments/stripe/portal"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token(user_id: int, org_id: int) -> str:
    """A token that claims `alg: none`: no signature at all."""
    header = _b64({"alg": "none", "typ": "JWT"})
    payload = _b64({"sub": str(user_id), "org_id": org_id, "exp": int(time.time()) + 600})
    return f"{header}.{payload}."


def _customer(api: Api) -> str:
    customer_id: str = api.stripe.v1.customers.create({"email": "billing@example.com"}).id
    return customer_id


async def test_member_gets_a_portal_url_for_the_org_customer(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))

    response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 200
    assert response.json()["url"].startswith(f"{api.emulator.url}/p/session/bps_")


async def test_customer_id_comes_from_the_workflow_state_first(api: Api) -> None:
    customer_id = _customer(api)
    # The row does not know the customer yet; the workflow (which created it) does.
    org, user = make_org_with_member(api.session_factory)
    state = OrgBillingState(
        org_id=org.id, status=BillingStatus.TRIALING, stripe_customer_id=customer_id
    )
    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 200, response.text


async def test_org_without_customer_is_404(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory)

    response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 404
    assert response.json() == {"detail": "Stripe customer not found"}


async def test_customer_deleted_in_stripe_is_404(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id="cus_gone")
    response = await api.http.post(URL, headers=bearer(user.id, org.id))
    assert (response.status_code, response.json()) == (404, {"detail": "Stripe customer not found"})


async def test_user_outside_the_org_is_403(api: Api) -> None:
    org = make_org(api.session_factory, stripe_customer_id=_customer(api))
    stranger = make_user(api.session_factory)

    response = await api.http.post(URL, headers=bearer(stranger.id, org.id))

    assert response.status_code == 403
    assert response.json() == {"detail": "Not a member of this organization"}


async def test_token_naming_another_org_is_403(api: Api) -> None:
    _mine, me = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    theirs = make_org(api.session_factory, stripe_customer_id=_customer(api))

    response = await api.http.post(URL, headers=bearer(me.id, theirs.id))

    assert response.status_code == 403


async def test_removed_member_is_403(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    headers = bearer(user.id, org.id)
    assert (await api.http.post(URL, headers=headers)).status_code == 200

    remove_member(api.session_factory, org.id, user.id)

    assert (await api.http.post(URL, headers=headers)).status_code == 403


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "Missing bearer token"),
        ("Basic dXNlcjpwYXNz", "Missing bearer token"),
        ("Bearer not-a-jwt", "Token is malformed"),
    ],
)
async def test_missing_or_malformed_token_is_401(
    api: Api, authorization: str | None, reason: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await api.http.post(URL, headers=headers)
    assert (response.status_code, response.json()) == (401, {"detail": reason})
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_expired_token_is_401(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    token = mint_token(JWT_SECRET, user.id, org.id, ttl=timedelta(seconds=-5))

    response = await api.http.post(URL, headers={"Authorization": f"Bearer {token}"})

    assert (response.status_code, response.json()) == (401, {"detail": "Token has expired"})
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_unsigned_alg_none_token_is_401(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    token = unsigned_token(user.id, org.id)

    response = await api.http.post(URL, headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401
    assert response.json() == {"detail": "Token algorithm is not allowed (HS256 only)"}


async def test_token_signed_with_another_secret_is_401(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    headers = bearer(user.id, org.id, secret="another-secret-another-secret-0123")

    response = await api.http.post(URL, headers=headers)

    assert (response.status_code, response.json()) == (
        401,
        {"detail": "Token signature is invalid"},
    )


async def test_token_without_org_claim_is_401(api: Api) -> None:
    token = jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
    response = await api.http.post(URL, headers={"Authorization": f"Bearer {token}"})
    assert response.json() == {"detail": "Token is missing the 'org_id' claim"}


async def test_stripe_failing_is_502_without_a_traceback(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, stripe_customer_id=_customer(api))
    api.emulator.set_faults(error_rate_500=1.0)

    response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 502
    detail = response.json()["detail"]
    assert detail["title"] == "Stripe request failed"
    assert "billing portal" in detail["description"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    metrics = (await api.http.get("/metrics")).text
    assert 'billing_stripe_errors_total{error="APIError",operation="create_portal_link"}' in metrics


async def test_stripe_not_configured_is_500(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    emulator: EmulatorServer,
) -> None:
    settings = api_settings.model_copy(update={"stripe_secret_key": ""})
    app = create_app(
        settings, temporal_client=temporal_dev_env.client, session_factory=session_factory
    )
    org, user = make_org_with_member(session_factory, stripe_customer_id="cus_any")
    async with serve(app) as http:
        response = await http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 500
    assert response.json()["detail"]["title"] == "Stripe not configured"
    assert "STRIPE_SECRET_KEY" in response.json()["detail"]["description"]


async def test_auth_not_configured_is_500(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    settings = api_settings.model_copy(update={"auth_jwt_secret": ""})
    app = create_app(
        settings, temporal_client=temporal_dev_env.client, session_factory=session_factory
    )
    async with serve(app) as http:
        response = await http.post(URL, headers={"Authorization": "Bearer x.y.z"})

    assert response.status_code == 500
    assert response.json()["detail"]["title"] == "Authentication not configured"
