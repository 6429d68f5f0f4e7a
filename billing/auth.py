"""Bearer tokens for org members: HS256 JWTs signed with `AUTH_JWT_SECRET`.

The API verifies them and the CLI's `billing token` mints them, so both sides
share one definition (docs/http.md, "Bearer tokens"):

- claims `sub` (user id), `org_id`, `iat`, `exp`, `aud` (`AUTH_JWT_AUDIENCE`)
  and `iss` (`AUTH_JWT_ISSUER`), all required;
- a lifetime (`exp - iat`) of at most `AUTH_JWT_MAX_TTL_SECONDS`, so a leaked
  token is worth little and nobody mints one that lives for years;
- a secret of at least 32 bytes: a shorter one is a startup error, because an
  HS256 key that short can be guessed offline from any token.

Only HS256 is accepted: a token that names another algorithm (or `none`) is
refused before its signature is even looked at.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from billing.config import Settings

ALGORITHM = "HS256"
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash (256 bits).
MIN_SECRET_BYTES = 32
REQUIRED_CLAIMS = ("sub", "org_id", "iat", "exp", "aud", "iss")
DEFAULT_TTL = timedelta(hours=1)
# The issuer's clock may run a little ahead of ours.
CLOCK_SKEW = timedelta(seconds=60)


class AuthConfigError(RuntimeError):
    """The token settings cannot be used; the message names the setting to fix."""


class AuthNotConfiguredError(AuthConfigError):
    """`AUTH_JWT_SECRET` is empty: no token can be minted or trusted."""

    def __init__(self) -> None:
        super().__init__("AUTH_JWT_SECRET is not set: bearer tokens cannot be minted or verified.")


class WeakSecretError(AuthConfigError):
    """`AUTH_JWT_SECRET` is set but too short to sign tokens safely."""

    def __init__(self, length: int) -> None:
        super().__init__(
            f"AUTH_JWT_SECRET is {length} bytes long; it must be at least {MIN_SECRET_BYTES} "
            "bytes (e.g. the output of `openssl rand -base64 48`)."
        )


class TokenLifetimeError(ValueError):
    """A token was asked for with a lifetime the rules do not allow."""


class InvalidTokenError(ValueError):
    """A token that must be refused; `reason` is one line, safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TokenRules:
    """What a token must be signed with and say: one definition for minting and checking."""

    secret: str
    audience: str
    issuer: str
    max_ttl: timedelta

    @classmethod
    def of(cls, settings: Settings) -> TokenRules:
        return cls(
            secret=settings.auth_jwt_secret,
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
            max_ttl=timedelta(seconds=settings.auth_jwt_max_ttl_seconds),
        )

    @property
    def configured(self) -> bool:
        return bool(self.secret)

    def check(self) -> None:
        """Raise `AuthConfigError` naming the setting unless tokens can be minted and trusted."""
        check_secret(self.secret)


@dataclass(frozen=True)
class Claims:
    """Who the token speaks for: one user, in one org, until `expires_at`."""

    user_id: int
    org_id: int
    expires_at: datetime


def check_secret(secret: str) -> None:
    """Empty is "not configured"; shorter than `MIN_SECRET_BYTES` is refused outright."""
    if not secret:
        raise AuthNotConfiguredError()
    length = len(secret.encode())
    if length < MIN_SECRET_BYTES:
        raise WeakSecretError(length)


def check_settings(settings: Settings) -> None:
    """For processes that start: a set but short `AUTH_JWT_SECRET` stops them.

    An empty secret is allowed (authenticated routes then answer 500 and name
    it): a process that only takes webhooks needs none.
    """
    if settings.auth_jwt_secret:
        check_secret(settings.auth_jwt_secret)


def mint_token(
    rules: TokenRules,
    user_id: int,
    org_id: int,
    ttl: timedelta | None = None,
    *,
    now: datetime | None = None,
) -> str:
    """A token for `user_id` acting in `org_id`; membership is checked when it is used.

    `ttl` defaults to an hour, or the maximum if that is shorter; a longer one
    than `rules.max_ttl` raises `TokenLifetimeError`.
    """
    rules.check()
    lifetime = ttl if ttl is not None else min(DEFAULT_TTL, rules.max_ttl)
    if lifetime <= timedelta(0):
        raise TokenLifetimeError("A token's lifetime must be positive.")
    if lifetime > rules.max_ttl:
        raise TokenLifetimeError(
            f"A token may live at most {int(rules.max_ttl.total_seconds())} s "
            f"(AUTH_JWT_MAX_TTL_SECONDS), not {int(lifetime.total_seconds())} s."
        )
    issued = int((now or datetime.now(UTC)).timestamp())
    payload: dict[str, Any] = {
        # PyJWT requires `sub` to be a string.
        "sub": str(user_id),
        "org_id": org_id,
        "iat": issued,
        "exp": issued + int(lifetime.total_seconds()),
        "aud": rules.audience,
        "iss": rules.issuer,
    }
    return jwt.encode(payload, rules.secret, algorithm=ALGORITHM)


def positive_id(value: object, claim: str) -> int:
    """A claim naming a row id: a positive 32-bit integer, or its decimal string."""
    if isinstance(value, bool):
        raise InvalidTokenError(f"Token claim {claim!r} is not an id")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise InvalidTokenError(f"Token claim {claim!r} is not an id")
    if number <= 0 or number > 2**31 - 1:
        raise InvalidTokenError(f"Token claim {claim!r} is not an id")
    return number


def decode_token(rules: TokenRules, token: str) -> Claims:
    """Verify signature, algorithm, audience, issuer, times and claims.

    Raise `InvalidTokenError` with a one-line reason otherwise.
    """
    rules.check()
    try:
        payload = jwt.decode(
            token,
            rules.secret,
            algorithms=[ALGORITHM],
            audience=rules.audience,
            issuer=rules.issuer,
            # `iat` is checked below, as an integer, with the lifetime.
            options={"require": list(REQUIRED_CLAIMS), "verify_iat": False},
        )
    except jwt.ExpiredSignatureError as err:
        raise InvalidTokenError("Token has expired") from err
    except jwt.InvalidAlgorithmError as err:
        raise InvalidTokenError("Token algorithm is not allowed (HS256 only)") from err
    except jwt.InvalidSignatureError as err:
        raise InvalidTokenError("Token signature is invalid") from err
    except jwt.MissingRequiredClaimError as err:
        raise InvalidTokenError(f"Token is missing the {err.claim!r} claim") from err
    except jwt.InvalidAudienceError as err:
        raise InvalidTokenError("Token audience is not this API's (AUTH_JWT_AUDIENCE)") from err
    except jwt.InvalidIssuerError as err:
        raise InvalidTokenError("Token issuer is not trusted (AUTH_JWT_ISSUER)") from err
    except jwt.ImmatureSignatureError as err:
        raise InvalidTokenError("Token is not valid yet") from err
    except jwt.DecodeError as err:
        raise InvalidTokenError("Token is malformed") from err
    except jwt.InvalidTokenError as err:
        raise InvalidTokenError("Token is invalid") from err
    expires = timestamp_claim(payload.get("exp"), "exp")
    issued = timestamp_claim(payload.get("iat"), "iat")
    if issued > datetime.now(UTC) + CLOCK_SKEW:
        raise InvalidTokenError("Token claim 'iat' is in the future")
    if expires <= issued:
        raise InvalidTokenError("Token expires before it was issued")
    if expires - issued > rules.max_ttl:
        raise InvalidTokenError(
            f"Token lifetime exceeds the maximum of {int(rules.max_ttl.total_seconds())} s"
        )
    return Claims(
        user_id=positive_id(payload.get("sub"), "sub"),
        org_id=positive_id(payload.get("org_id"), "org_id"),
        expires_at=expires,
    )


# Tokens live minutes or hours; nothing expires after year 9999 (datetime's limit).
_LATEST_TIMESTAMP = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp())


def timestamp_claim(value: object, claim: str) -> datetime:
    """`exp`/`iat` as RFC 7519 NumericDate: an integer here (no strings, floats or booleans)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTokenError(f"Token claim {claim!r} is not an integer timestamp")
    if not 0 < value <= _LATEST_TIMESTAMP:
        raise InvalidTokenError(f"Token claim {claim!r} is out of range")
    return datetime.fromtimestamp(value, tz=UTC)


def key_matches(given: str, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys` (the service API keys): constant time per key,
    and every key is compared (no early exit), so timing tells nothing."""
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched
