"""Member tokens signed by the console's identity provider: RS256/ES256 checked with a JWKS.

Besides the HS256 tokens of `billing.auth`, the API accepts tokens the
console's identity provider signs, verified with the public keys it publishes
at `AUTH_JWKS_URL` (docs/http.md, "Bearer tokens"):

- the token's header names its key (`kid`) and an algorithm, RS256 or ES256;
  the key must be of that algorithm's type (and name it, if its `alg` is set);
- `aud` (`AUTH_JWKS_AUDIENCE`, else `AUTH_JWT_AUDIENCE`), `iss`
  (`AUTH_JWKS_ISSUER`, else `AUTH_JWT_ISSUER`) and `exp` are required; a token
  with `iat` lives at most `AUTH_JWT_MAX_TTL_SECONDS`;
- the user is named by `AUTH_JWT_USER_CLAIM`: `sub` (the user's external id,
  `users.external_id`) or `email`; the org by `AUTH_JWT_ORG_CLAIM` (`org_id`).

Keys are cached (`AUTH_JWKS_CACHE_SECONDS`) and fetched again when a token names
a key the cache does not hold (the provider rotated its keys), at most once per
`AUTH_JWKS_REFRESH_SECONDS`, so a flood of tokens with made-up key ids costs the
provider one request, not one each. A fetch runs in a thread: it never blocks
the event loop. A provider that cannot be reached while its keys are needed is
`JwksUnavailableError` (the API answers 503); a stale cache is used meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKClientConnectionError, PyJWKClientError, PyJWKSet
from jwt.exceptions import PyJWKSetError

from billing.auth import CLOCK_SKEW, InvalidTokenError, positive_id, timestamp_claim
from billing.config import Settings

log = logging.getLogger(__name__)

# Asymmetric algorithms only: a JWKS key is public, anyone could "sign" HS256 with it.
JWKS_ALGORITHMS = ("RS256", "ES256")
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
JWKS_REQUIRED_CLAIMS = ("exp", "aud", "iss")
FETCH_TIMEOUT_SECONDS = 5.0
MAX_EXTERNAL_ID = 255
UNAVAILABLE = "The identity provider's keys (AUTH_JWKS_URL) could not be fetched"


class UserClaim(StrEnum):
    """Which claim names the user: `sub` (the user's external id) or `email`."""

    SUB = "sub"
    EMAIL = "email"


class JwksUnavailableError(RuntimeError):
    """The identity provider's keys could not be fetched while a token needed them."""


@dataclass(frozen=True)
class ExternalClaims:
    """Who an identity provider's token speaks for, before the user is looked up.

    `user` is an external id (`user_claim` `sub`) or an email address (`email`).
    """

    user_claim: UserClaim
    user: str
    org_id: int
    expires_at: datetime


@dataclass(frozen=True)
class JwksRules:
    """What an identity provider's token must say, from the settings."""

    url: str
    audience: str
    issuer: str
    max_ttl: timedelta
    user_claim: UserClaim
    org_claim: str
    cache_seconds: float
    refresh_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> JwksRules:
        return cls(
            url=settings.auth_jwks_url,
            audience=settings.auth_jwks_audience or settings.auth_jwt_audience,
            issuer=settings.auth_jwks_issuer or settings.auth_jwt_issuer,
            max_ttl=timedelta(seconds=settings.auth_jwt_max_ttl_seconds),
            user_claim=UserClaim(settings.auth_jwt_user_claim),
            org_claim=settings.auth_jwt_org_claim,
            cache_seconds=settings.auth_jwks_cache_seconds,
            refresh_seconds=settings.auth_jwks_refresh_seconds,
        )


def token_algorithm(token: str) -> str:
    """The `alg` a token's header names (unverified: it only picks the check)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as err:
        raise InvalidTokenError("Token is malformed") from err
    alg = header.get("alg")
    return alg if isinstance(alg, str) else ""


class JwksKeys:
    """The identity provider's public keys, cached, refreshed on an unknown `kid`.

    One per process (the API's lifespan builds it). `clock` is monotonic seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float = 300.0,
        refresh_seconds: float = 30.0,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=timeout)
        self._cache_seconds = cache_seconds
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    @classmethod
    def of(cls, rules: JwksRules) -> JwksKeys:
        return cls(
            rules.url, cache_seconds=rules.cache_seconds, refresh_seconds=rules.refresh_seconds
        )

    def _fresh(self) -> bool:
        return self._fetched_at is not None and (
            self._clock() - self._fetched_at < self._cache_seconds
        )

    def _may_fetch(self) -> bool:
        """At most one fetch (successful or not) per `refresh_seconds`."""
        return self._attempted_at is None or (
            self._clock() - self._attempted_at >= self._refresh_seconds
        )

    async def signing_key(self, kid: str) -> PyJWK:
        """The key named `kid`; `InvalidTokenError` if the provider has none by that id."""
        if kid in self._keys and self._fresh():
            return self._keys[kid]
        async with self._lock:
            # Another request may have fetched meanwhile.
            if kid in self._keys and self._fresh():
                return self._keys[kid]
            if self._may_fetch():
                await self._fetch(have_keys=bool(self._keys))
            elif self._fetched_at is None:
                # No key was ever fetched and the last attempt failed a moment ago.
                raise JwksUnavailableError(UNAVAILABLE)
        key = self._keys.get(kid)
        if key is None:
            raise InvalidTokenError(
                f"Token key id {kid[:64]!r} is not among the identity provider's keys "
                "(AUTH_JWKS_URL)"
            )
        return key

    async def _fetch(self, *, have_keys: bool) -> None:
        self._attempted_at = self._clock()
        self.fetches += 1
        try:
            key_set: PyJWKSet = await asyncio.to_thread(self._client.get_jwk_set, True)
        except (PyJWKClientConnectionError, PyJWKClientError, PyJWKSetError) as err:
            log.warning("identity provider keys not fetched: %s", err)
            if have_keys:
                return  # the keys we have stay in use until the provider answers again
            raise JwksUnavailableError(UNAVAILABLE) from err
        self._keys = {key.key_id: key for key in key_set.keys if key.key_id}
        self._fetched_at = self._clock()


def _external_user(value: object, claim: UserClaim) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_EXTERNAL_ID:
        raise InvalidTokenError(f"Token claim {claim.value!r} does not name a user")
    return value.strip().lower() if claim is UserClaim.EMAIL else value


async def decode_jwks_token(rules: JwksRules, keys: JwksKeys, token: str) -> ExternalClaims:
    """Verify an RS256/ES256 token with the provider's keys; `InvalidTokenError` otherwise.

    `JwksUnavailableError` when the keys are needed and cannot be fetched.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as err:
        raise InvalidTokenError("Token is malformed") from err
    alg = header.get("alg")
    if alg not in JWKS_ALGORITHMS:
        raise InvalidTokenError(
            "Token algorithm is not allowed (RS256 or ES256 with AUTH_JWKS_URL)"
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidTokenError("Token header has no key id ('kid')")
    key = await keys.signing_key(kid)
    if key.key_type != _KEY_TYPES[alg] or key.algorithm_name != alg:
        raise InvalidTokenError(f"Token key {kid[:64]!r} is not a {alg} key")
    required = [*JWKS_REQUIRED_CLAIMS, rules.user_claim.value, rules.org_claim]
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=rules.audience,
            issuer=rules.issuer,
            options={"require": required, "verify_iat": False},
        )
    except jwt.ExpiredSignatureError as err:
        raise InvalidTokenError("Token has expired") from err
    except jwt.InvalidSignatureError as err:
        raise InvalidTokenError("Token signature is invalid") from err
    except jwt.MissingRequiredClaimError as err:
        raise InvalidTokenError(f"Token is missing the {err.claim!r} claim") from err
    except jwt.InvalidAudienceError as err:
        raise InvalidTokenError(
            "Token audience is not this API's (AUTH_JWKS_AUDIENCE or AUTH_JWT_AUDIENCE)"
        ) from err
    except jwt.InvalidIssuerError as err:
        raise InvalidTokenError(
            "Token issuer is not trusted (AUTH_JWKS_ISSUER or AUTH_JWT_ISSUER)"
        ) from err
    except jwt.ImmatureSignatureError as err:
        raise InvalidTokenError("Token is not valid yet") from err
    except jwt.DecodeError as err:
        raise InvalidTokenError("Token is malformed") from err
    except jwt.InvalidTokenError as err:
        raise InvalidTokenError("Token is invalid") from err
    expires = timestamp_claim(payload.get("exp"), "exp")
    if "iat" in payload:
        issued = timestamp_claim(payload.get("iat"), "iat")
        if issued > datetime.now(UTC) + CLOCK_SKEW:
            raise InvalidTokenError("Token claim 'iat' is in the future")
        if expires - issued > rules.max_ttl:
            raise InvalidTokenError(
                f"Token lifetime exceeds the maximum of {int(rules.max_ttl.total_seconds())} s"
            )
    return ExternalClaims(
        user_claim=rules.user_claim,
        user=_external_user(payload.get(rules.user_claim.value), rules.user_claim),
        org_id=positive_id(payload.get(rules.org_claim), rules.org_claim),
        expires_at=expires,
    )
