"""What handlers receive: the services built by the lifespan, and the caller's identity.

Handlers never build clients; they declare the `Annotated` dependencies they
use (settings, session factory, Temporal link, metrics, Stripe gateway) and get
what `api.main.create_app` wired (tests wire real ones pointed elsewhere).

Every dependency is `async def`, even those that only read an attribute:
FastAPI runs a plain `def` dependency in the thread pool, a round trip through
a worker thread for each one on every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api import store
from api.errors import (
    auth_not_configured,
    forbidden,
    jwks_unavailable,
    stripe_not_configured,
    unauthorized,
)
from api.metrics import BillingMetrics
from api.temporal import TemporalLink
from api.webhook_store import WebhookStore
from billing.auth import (
    ALGORITHM,
    Claims,
    InvalidTokenError,
    TokenRules,
    decode_token,
    key_matches,
)
from billing.config import Settings
from billing.db import orgs
from billing.domain import BILLING_MANAGER_ROLES, MembershipRole
from billing.jwks import (
    JWKS_ALGORITHMS,
    ExternalClaims,
    JwksKeys,
    JwksRules,
    JwksUnavailableError,
    UserClaim,
    decode_jwks_token,
    token_algorithm,
)
from billing.stripe_gateway import StripeGateway

NOT_A_MEMBER = "Not a member of this organization"


@dataclass
class ApiServices:
    """Everything the handlers use, built once per process by the lifespan."""

    settings: Settings
    metrics: BillingMetrics
    session_factory: store.SessionFactory
    temporal: TemporalLink
    stripe: StripeGateway | None
    webhook_store: WebhookStore
    # The identity provider's keys, when `AUTH_JWKS_URL` is set.
    jwks: JwksKeys | None = None


def services_of(request: Request) -> ApiServices:
    """The services the lifespan wired (the webhook route reads them directly)."""
    services: ApiServices | None = getattr(request.app.state, "services", None)
    if services is None:
        raise RuntimeError("The API's lifespan has not run: no services are wired.")
    return services


async def get_services(request: Request) -> ApiServices:
    return services_of(request)


# Only the dependencies below read the bag; each route declares just what it uses.
_ServicesDep = Annotated[ApiServices, Depends(get_services)]


async def get_api_settings(services: _ServicesDep) -> Settings:
    return services.settings


async def get_session_factory(services: _ServicesDep) -> store.SessionFactory:
    return services.session_factory


async def get_temporal(services: _ServicesDep) -> TemporalLink:
    return services.temporal


async def get_metrics(services: _ServicesDep) -> BillingMetrics:
    return services.metrics


async def get_optional_stripe(services: _ServicesDep) -> StripeGateway | None:
    """The Stripe gateway, or None when Stripe is not configured (see `require_stripe`)."""
    return services.stripe


SettingsDep = Annotated[Settings, Depends(get_api_settings)]
SessionFactoryDep = Annotated[store.SessionFactory, Depends(get_session_factory)]
TemporalDep = Annotated[TemporalLink, Depends(get_temporal)]
MetricsDep = Annotated[BillingMetrics, Depends(get_metrics)]
OptionalStripeDep = Annotated[StripeGateway | None, Depends(get_optional_stripe)]


def require_stripe(settings: Settings, gateway: StripeGateway | None) -> StripeGateway:
    """The Stripe gateway, or the documented 500 naming the missing settings."""
    missing = settings.missing_stripe_settings()
    if missing or gateway is None:
        raise stripe_not_configured(missing or ["STRIPE_SECRET_KEY"])
    return gateway


async def get_stripe(settings: SettingsDep, gateway: OptionalStripeDep) -> StripeGateway:
    return require_stripe(settings, gateway)


StripeDep = Annotated[StripeGateway, Depends(get_stripe)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description=(
        "HS256 JWT signed with AUTH_JWT_SECRET; claims `sub` (user id), `org_id`, `iat`, "
        "`exp` (at most AUTH_JWT_MAX_TTL_SECONDS after `iat`), `aud` (AUTH_JWT_AUDIENCE) "
        "and `iss` (AUTH_JWT_ISSUER). Or, with AUTH_JWKS_URL set, an RS256/ES256 JWT of the "
        "console's identity provider naming its key (`kid`), with `exp`, `aud`, `iss`, the "
        "user (AUTH_JWT_USER_CLAIM: `sub` as the user's external id, or `email`) and the "
        "org (AUTH_JWT_ORG_CLAIM, default `org_id`)."
    ),
)


async def get_jwks(services: _ServicesDep) -> JwksKeys | None:
    return services.jwks


async def _resolve_user(factory: store.SessionFactory, claims: ExternalClaims) -> Claims:
    """The member an identity provider's token names; 403 (as for a non-member) if none."""

    def lookup(session: Session) -> int | None:
        if claims.user_claim is UserClaim.EMAIL:
            return orgs.user_id_by_email(session, claims.user)
        return orgs.user_id_by_external_id(session, claims.user)

    user_id = await store.read(factory, lookup)
    if user_id is None:
        raise forbidden(NOT_A_MEMBER)
    return Claims(user_id=user_id, org_id=claims.org_id, expires_at=claims.expires_at)


async def get_claims(
    settings: SettingsDep,
    factory: SessionFactoryDep,
    jwks: Annotated[JwksKeys | None, Depends(get_jwks)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Claims:
    """A verified token (401 otherwise; 503 if the identity provider's keys are out of
    reach); membership is checked by the route."""
    if not settings.auth_jwt_secret and jwks is None:
        raise auth_not_configured()
    if credentials is None:
        raise unauthorized("Missing bearer token")
    token = credentials.credentials
    try:
        alg = token_algorithm(token)
        if alg in JWKS_ALGORITHMS and jwks is not None:
            external = await decode_jwks_token(JwksRules.of(settings), jwks, token)
            return await _resolve_user(factory, external)
        if alg == ALGORITHM and not settings.auth_jwt_secret:
            raise InvalidTokenError(
                "Token algorithm is not allowed (RS256 or ES256 with AUTH_JWKS_URL)"
            )
        return decode_token(TokenRules.of(settings), token)
    except InvalidTokenError as err:
        raise unauthorized(err.reason) from None
    except JwksUnavailableError as err:
        raise jwks_unavailable(str(err)) from None


ClaimsDep = Annotated[Claims, Depends(get_claims)]

NOT_A_BILLING_MANAGER = "Only the organization's owner or a billing admin may manage billing"


async def require_role(
    factory: store.SessionFactory,
    claims: Claims,
    allowed: frozenset[MembershipRole] | None = None,
) -> MembershipRole:
    """The caller's role in the token's org; 403 unless a member (with a role in `allowed`).

    A non-member always gets the same 403, whether or not the org exists, so a
    token never tells its holder which orgs there are.
    """
    role = await store.read(factory, lambda s: orgs.member_role(s, claims.org_id, claims.user_id))
    if role is None:
        raise forbidden(NOT_A_MEMBER)
    if allowed is not None and role not in allowed:
        raise forbidden(NOT_A_BILLING_MANAGER)
    return role


async def require_member(factory: store.SessionFactory, claims: Claims) -> None:
    """403 unless the token's user is (still) a member of the token's org."""
    await require_role(factory, claims)


async def get_billing_manager_claims(claims: ClaimsDep, factory: SessionFactoryDep) -> Claims:
    """A verified token of the org's owner or a billing admin: who may change billing.

    For every route that acts on the org's Stripe billing (the portal, checkout).
    """
    await require_role(factory, claims, BILLING_MANAGER_ROLES)
    return claims


BillingManagerDep = Annotated[Claims, Depends(get_billing_manager_claims)]


def service_key_ok(settings: Settings, presented: str) -> bool:
    """Whether `presented` is one of `BILLING_SERVICE_API_KEYS` (constant time)."""
    keys = settings.service_api_keys()
    return bool(keys and presented) and key_matches(presented, keys)


# An org id in a route's path: what Postgres's integer column holds, with an example.
OrgIdPath = Annotated[
    int,
    Path(
        ge=1,
        le=2**31 - 1,
        description="The org's id",
        openapi_examples={"org": {"summary": "Org 42", "value": 42}},
    ),
]


async def get_org_reader(
    org_id: OrgIdPath,
    settings: SettingsDep,
    factory: SessionFactoryDep,
    jwks: Annotated[JwksKeys | None, Depends(get_jwks)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """A service key, or a member token of this org (401/403 otherwise).

    For read routes the console backend calls for any org, and members call for
    their own.
    """
    if credentials is not None and service_key_ok(settings, credentials.credentials):
        return
    claims = await get_claims(settings, factory, jwks, credentials)
    if claims.org_id != org_id:
        raise forbidden("This token is not valid for this organization")
    await require_member(factory, claims)
