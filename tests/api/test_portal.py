"""`POST /api/payments/stripe/portal`: tokens, roles, customer lookup, Stripe failures.

The portal cancels subscriptions and changes cards: the owner and billing
admins get one, a plain member gets 403.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.auth import TokenRules, WeakSecretError, mint_token
from billing.config import Settings
from billing.domain import BillingStatus, OrgBillingState
from stripe_emulator.server import EmulatorServer
from tests.api.conftest import Api
from tests.api.support import JWT_SECRET, bearer, member_token, org_workflow_with_state, serve
from tests.factories.orgs import make_org, make_org_with_member, make_user, remove_member

URL = "/api/payments/stripe/portal"
OWNER = "owner"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token(user_id: int, org_id: int) -> str:
    """A token that claims `alg: none`: no signature at all."""
    header = _b64({"alg": "none", "typ": "JWT"})
    payload = _b64({"sub": str(user_id), "org_id": org_id, "exp": int(time.time()) + 600})
    return f"{header}.{payload}."


def _portal_sessions_created(api: Api) -> int:
    """How many portal sessions the emulator has been asked for, from its own counters."""
    requests = httpx.get(f"{api.emulator.url}/_emulator/stats").json()["requests"]
    return sum(
        count
        for key, count in requests.items()
        if key.startswith("POST ") and "billing_portal/sessions" in key
    )


def _customer(api: Api) -> str:
    customer_id: str = api.stripe.v1.customers.create({"email": "billing@example.com"}).id
    return customer_id


@pytest.mark.parametrize("role", ["owner", "billing_admin"])
async def test_owner_and_billing_admin_get_a_portal_url_for_the_org_customer(
    api: Api, role: str
) -> None:
    org, user = make_org_with_member(
        api.session_factory, role=role, stripe_customer_id=_customer(api)
    )

    response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 200
    assert response.json()["url"].startswith(f"{api.emulator.url}/p/session/bps_")


async def test_plain_member_is_403_and_no_portal_session_is_created(api: Api) -> None:
    """Bug 3 of issue 12: any member could open the portal (cancel, change the card)."""
    customer_id = _customer(api)
    org, member = make_org_with_member(api.session_factory, stripe_customer_id=customer_id)
    before = _portal_sessions_created(api)

    response = await api.http.post(URL, headers=bearer(member.id, org.id))

    assert response.status_code == 403
    assert response.json() == {
        "detail": "Only the organization's owner or a billing admin may manage billing"
    }
    assert _portal_sessions_created(api) == before


async def test_customer_id_comes_from_the_workflow_state_first(api: Api) -> None:
    customer_id = _customer(api)
    # The row does not know the customer yet; the workflow (which created it) does.
    org, user = make_org_with_member(api.session_factory, role=OWNER)
    state = OrgBillingState(
        org_id=org.id, status=BillingStatus.TRIALING, stripe_customer_id=customer_id
    )
    async with org_workflow_with_state(api.temporal, api.settings.temporal_task_queue, state):
        response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 200, response.text


async def test_org_without_customer_is_404(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, role=OWNER)

    response = await api.http.post(URL, headers=bearer(user.id, org.id))

    assert response.status_code == 404
    assert response.json() == {"detail": "Stripe customer not found"}


async def test_customer_deleted_in_stripe_is_404(api: Api) -> None:
    org, user = make_org_with_member(api.session_factory, role=OWNER, stripe_customer_id="cus_gone")
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


async def test_removed_billing_admin_is_403(api: Api) -> None:
    org, user = make_org_with_member(
        api.session_factory, role="billing_admin", stripe_customer_id=_customer(api)
    )
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
    org, user = make_org_with_member(
        api.session_factory, role=OWNER, stripe_customer_id=_customer(api)
    )
    issued = datetime.now(UTC) - timedelta(minutes=2)
    token = member_token(user.id, org.id, ttl=timedelta(minutes=1), now=issued)

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


def _token(**claims: object) -> dict[str, str]:
    """A token signed with the API's secret, carrying exactly `claims`."""
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


def _valid_claims(user_id: int, org_id: int) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": str(user_id),
        "org_id": org_id,
        "iat": now,
        "exp": now + 600,
        "aud": "org-billing",
        "iss": "org-billing",
    }


async def test_token_without_org_claim_is_401(api: Api) -> None:
    claims = _valid_claims(1, 1)
    del claims["org_id"]
    response = await api.http.post(URL, headers=_token(**claims))
    assert response.json() == {"detail": "Token is missing the 'org_id' claim"}


@pytest.mark.parametrize("claim", ["iat", "aud", "iss"])
async def test_token_without_issue_time_audience_or_issuer_is_401(api: Api, claim: str) -> None:
    """Tokens minted before these claims were required (sub, org_id, exp only) are refused."""
    org, user = make_org_with_member(
        api.session_factory, role=OWNER, stripe_customer_id=_customer(api)
    )
    claims = _valid_claims(user.id, org.id)
    del claims[claim]

    response = await api.http.post(URL, headers=_token(**claims))

    assert (response.status_code, response.json()) == (
        401,
        {"detail": f"Token is missing the {claim!r} claim"},
    )


@pytest.mark.parametrize(
    ("claim", "value", "reason"),
    [
        ("aud", "another-api", "Token audience is not this API's (AUTH_JWT_AUDIENCE)"),
        ("iss", "someone-else", "Token issuer is not trusted (AUTH_JWT_ISSUER)"),
    ],
)
async def test_token_for_another_audience_or_from_another_issuer_is_401(
    api: Api, claim: str, value: str, reason: str
) -> None:
    org, user = make_org_with_member(
        api.session_factory, role=OWNER, stripe_customer_id=_customer(api)
    )
    claims = {**_valid_claims(user.id, org.id), claim: value}

    response = await api.http.post(URL, headers=_token(**claims))

    assert (response.status_code, response.json()) == (401, {"detail": reason})


async def test_token_living_longer_than_the_maximum_is_401(api: Api) -> None:
    org, user = make_org_with_member(
        api.session_factory, role=OWNER, stripe_customer_id=_customer(api)
    )
    claims = _valid_claims(user.id, org.id)
    at_limit = {**claims, "exp": int(claims["iat"]) + 3600}
    beyond = {**claims, "exp": int(claims["iat"]) + 30 * 86400}

    accepted = await api.http.post(URL, headers=_token(**at_limit))
    refused = await api.http.post(URL, headers=_token(**beyond))

    assert accepted.status_code == 200, accepted.text
    assert (refused.status_code, refused.json()) == (
        401,
        {"detail": "Token lifetime exceeds the maximum of 3600 s"},
    )


async def test_audience_issuer_and_lifetime_come_from_the_settings(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    settings = api_settings.model_copy(
        update={
            "auth_jwt_audience": "console-billing",
            "auth_jwt_issuer": "https://accounts.example.com",
            "auth_jwt_max_ttl_seconds": 300,
        }
    )
    app = create_app(
        settings,
        temporal_client=temporal_dev_env.client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    customer = stripe_client.v1.customers.create({"email": "billing@example.com"}).id
    org, user = make_org_with_member(session_factory, role=OWNER, stripe_customer_id=customer)
    theirs = TokenRules.of(settings)
    async with serve(app) as http:
        minted = mint_token(theirs, user.id, org.id)
        ok = await http.post(URL, headers={"Authorization": f"Bearer {minted}"})
        default_rules = await http.post(URL, headers=bearer(user.id, org.id))
        too_long = _valid_claims(user.id, org.id) | {
            "aud": "console-billing",
            "iss": "https://accounts.example.com",
        }
        too_long["exp"] = int(too_long["iat"]) + 301
        long_lived = await http.post(URL, headers=_token(**too_long))

    assert ok.status_code == 200, ok.text
    assert default_rules.status_code == 401
    assert long_lived.json() == {"detail": "Token lifetime exceeds the maximum of 300 s"}


@pytest.mark.parametrize("secret", ["short", "x" * 31])
async def test_api_refuses_to_start_with_a_secret_shorter_than_32_bytes(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    secret: str,
) -> None:
    settings = api_settings.model_copy(update={"auth_jwt_secret": secret})
    app = create_app(
        settings, temporal_client=temporal_dev_env.client, session_factory=session_factory
    )

    with pytest.raises(WeakSecretError, match="AUTH_JWT_SECRET"):
        async with serve(app):
            pass


async def test_stripe_failing_is_502_without_a_traceback(api: Api) -> None:
    org, user = make_org_with_member(
        api.session_factory, role=OWNER, stripe_customer_id=_customer(api)
    )
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
    org, user = make_org_with_member(session_factory, role=OWNER, stripe_customer_id="cus_any")
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
