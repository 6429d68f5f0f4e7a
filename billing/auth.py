"""Bearer tokens for org members: HS256 JWTs signed with `AUTH_JWT_SECRET`.

The API verifies them and the CLI's `billing token` mints them, so both sides
share one definition of the claims (`sub` = user id, `org_id`, `exp`).
Only HS256 is accepted: a token that names another algorithm (or `none`) is
refused before its signature is even looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("sub", "org_id", "exp")
DEFAULT_TTL = timedelta(hours=1)


class AuthNotConfiguredError(RuntimeError):
    """`AUTH_JWT_SECRET` is empty: no token can be minted or trusted."""

    def __init__(self) -> None:
        super().__init__("AUTH_JWT_SECRET is not set: bearer tokens cannot be minted or verified.")


class InvalidTokenError(ValueError):
    """A token that must be refused; `reason` is one line, safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    """Who the token speaks for: one user, in one org, until `expires_at`."""

    user_id: int
    org_id: int
    expires_at: datetime


def _require_secret(secret: str) -> None:
    if not secret:
        raise AuthNotConfiguredError()


def mint_token(
    secret: str,
    user_id: int,
    org_id: int,
    ttl: timedelta = DEFAULT_TTL,
    *,
    now: datetime | None = None,
) -> str:
    """A token for `user_id` acting in `org_id`; membership is checked when it is used."""
    _require_secret(secret)
    issued = now or datetime.now(UTC)
    payload: dict[str, Any] = {
        # PyJWT requires `sub` to be a string.
        "sub": str(user_id),
        "org_id": org_id,
        "iat": int(issued.timestamp()),
        "exp": int((issued + ttl).timestamp()),
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def _positive_int(value: object, claim: str) -> int:
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


def decode_token(secret: str, token: str) -> Claims:
    """Verify signature, algorithm, expiry and claims; raise `InvalidTokenError` otherwise."""
    _require_secret(secret)
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError as err:
        raise InvalidTokenError("Token has expired") from err
    except jwt.InvalidAlgorithmError as err:
        raise InvalidTokenError("Token algorithm is not allowed (HS256 only)") from err
    except jwt.InvalidSignatureError as err:
        raise InvalidTokenError("Token signature is invalid") from err
    except jwt.MissingRequiredClaimError as err:
        raise InvalidTokenError(f"Token is missing the {err.claim!r} claim") from err
    except jwt.DecodeError as err:
        raise InvalidTokenError("Token is malformed") from err
    except jwt.InvalidTokenError as err:
        raise InvalidTokenError("Token is invalid") from err
    return Claims(
        user_id=_positive_int(payload.get("sub"), "sub"),
        org_id=_positive_int(payload.get("org_id"), "org_id"),
        expires_at=_expiry(payload.get("exp")),
    )


# Tokens live minutes or hours; nothing expires after year 9999 (datetime's limit).
_LATEST_EXPIRY = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp())


def _expiry(value: object) -> datetime:
    """`exp` as RFC 7519 NumericDate: an integer here (no strings, floats or booleans)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTokenError("Token claim 'exp' is not an integer timestamp")
    if not 0 < value <= _LATEST_EXPIRY:
        raise InvalidTokenError("Token claim 'exp' is out of range")
    return datetime.fromtimestamp(value, tz=UTC)
