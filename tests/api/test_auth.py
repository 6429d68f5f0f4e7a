"""`billing.auth`: the token the CLI mints is the token the API accepts, and nothing else is."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from billing.auth import (
    AuthNotConfiguredError,
    InvalidTokenError,
    TokenLifetimeError,
    TokenRules,
    WeakSecretError,
    check_settings,
    decode_token,
    mint_token,
)
from billing.config import Settings

SECRET = "unit-test-secret-unit-test-secret-0123"
RULES = TokenRules(
    secret=SECRET, audience="org-billing", issuer="org-billing", max_ttl=timedelta(hours=1)
)


def _claims(**overrides: object) -> dict[str, Any]:
    """A valid payload, with some claims changed (or removed, given None)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": "1",
        "org_id": 1,
        "iat": now,
        "exp": now + 600,
        "aud": "org-billing",
        "iss": "org-billing",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def _signed(payload: dict[str, Any]) -> str:
    """Signed as is: PyJWT's `encode` would refuse some of these payloads itself."""
    return jwt.api_jws.encode(json.dumps(payload).encode(), SECRET, algorithm="HS256")


def _refusal(payload: dict[str, Any], rules: TokenRules = RULES) -> str:
    token = _signed(payload)
    with pytest.raises(InvalidTokenError) as refused:
        decode_token(rules, token)
    return refused.value.reason


def test_minted_token_decodes_to_its_claims() -> None:
    claims = decode_token(RULES, mint_token(RULES, 12, 34, ttl=timedelta(minutes=5)))
    assert (claims.user_id, claims.org_id) == (12, 34)
    assert 290 <= claims.expires_at.timestamp() - time.time() <= 300


def test_minted_token_carries_audience_issuer_and_issue_time() -> None:
    rules = TokenRules(
        secret=SECRET, audience="console", issuer="accounts", max_ttl=timedelta(minutes=10)
    )
    token = mint_token(rules, 12, 34)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="console")

    assert (payload["aud"], payload["iss"]) == ("console", "accounts")
    assert isinstance(payload["iat"], int) and abs(payload["iat"] - time.time()) < 5
    # The default lifetime (an hour) is cut to the configured maximum.
    assert payload["exp"] - payload["iat"] == 600


def test_token_rules_come_from_the_settings_with_documented_defaults() -> None:
    rules = TokenRules.of(Settings.model_validate({"auth_jwt_secret": SECRET}))
    assert (rules.audience, rules.issuer, rules.max_ttl) == (
        "org-billing",
        "org-billing",
        timedelta(seconds=3600),
    )


def test_empty_secret_is_a_configuration_error() -> None:
    empty = TokenRules(secret="", audience="a", issuer="i", max_ttl=timedelta(hours=1))
    with pytest.raises(AuthNotConfiguredError):
        mint_token(empty, 1, 1)
    with pytest.raises(AuthNotConfiguredError):
        decode_token(empty, "a.b.c")


@pytest.mark.parametrize("secret", ["x", "short-secret", "s" * 31, "é" * 15])
def test_a_secret_shorter_than_32_bytes_is_refused_and_named(secret: str) -> None:
    weak = TokenRules(secret=secret, audience="a", issuer="i", max_ttl=timedelta(hours=1))
    for attempt in (
        lambda: mint_token(weak, 1, 1),
        lambda: decode_token(weak, "a.b.c"),
        lambda: check_settings(Settings.model_validate({"auth_jwt_secret": secret})),
    ):
        with pytest.raises(WeakSecretError, match="AUTH_JWT_SECRET") as refused:
            attempt()
        assert f"{len(secret.encode())} bytes" in str(refused.value)


def test_a_32_byte_secret_is_enough_and_an_empty_one_is_not_a_startup_error() -> None:
    check_settings(Settings.model_validate({"auth_jwt_secret": "s" * 32}))
    check_settings(Settings.model_validate({"auth_jwt_secret": ""}))


@pytest.mark.parametrize("claim", ["sub", "org_id", "exp", "iat", "aud", "iss"])
def test_every_claim_is_required(claim: str) -> None:
    assert _refusal(_claims(**{claim: None})) == f"Token is missing the {claim!r} claim"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"sub": "me"}, "Token claim 'sub' is not an id"),
        ({"org_id": True}, "Token claim 'org_id' is not an id"),
        ({"org_id": -3}, "Token claim 'org_id' is not an id"),
        ({"aud": "another-api"}, "Token audience is not this API's (AUTH_JWT_AUDIENCE)"),
        ({"aud": ["another-api"]}, "Token audience is not this API's (AUTH_JWT_AUDIENCE)"),
        ({"iss": "someone-else"}, "Token issuer is not trusted (AUTH_JWT_ISSUER)"),
        ({"iss": ["org-billing"]}, "Token issuer is not trusted (AUTH_JWT_ISSUER)"),
        ({"iat": "1700000000"}, "Token claim 'iat' is not an integer timestamp"),
        ({"iat": 1700000000.5}, "Token claim 'iat' is not an integer timestamp"),
        ({"iat": -1}, "Token claim 'iat' is out of range"),
    ],
)
def test_tokens_with_bad_claims_are_refused(overrides: dict[str, object], reason: str) -> None:
    assert _refusal(_claims(**overrides)) == reason


def test_a_token_living_longer_than_the_maximum_is_refused() -> None:
    now = int(time.time())
    at_the_limit = _claims(iat=now, exp=now + 3600)
    beyond = _claims(iat=now, exp=now + 3601)
    year = _claims(iat=now - 60, exp=now + 365 * 86400)

    decode_token(RULES, _signed(at_the_limit))
    assert _refusal(beyond) == "Token lifetime exceeds the maximum of 3600 s"
    assert _refusal(year) == "Token lifetime exceeds the maximum of 3600 s"


def test_a_token_issued_in_the_future_is_refused() -> None:
    later = int(time.time()) + 600
    assert _refusal(_claims(iat=later, exp=later + 60)) == "Token claim 'iat' is in the future"


def test_a_token_that_expires_before_it_was_issued_is_refused() -> None:
    now = int(time.time())
    # Issued within the allowed clock skew, expiring before that.
    assert _refusal(_claims(iat=now + 30, exp=now + 20)) == "Token expires before it was issued"


def test_minting_refuses_a_lifetime_beyond_the_maximum_or_not_positive() -> None:
    with pytest.raises(TokenLifetimeError, match="AUTH_JWT_MAX_TTL_SECONDS"):
        mint_token(RULES, 1, 1, ttl=timedelta(hours=1, seconds=1))
    with pytest.raises(TokenLifetimeError):
        mint_token(RULES, 1, 1, ttl=timedelta(0))


def test_an_expired_token_is_refused() -> None:
    issued = datetime.now(UTC) - timedelta(minutes=2)
    token = mint_token(RULES, 1, 1, ttl=timedelta(minutes=1), now=issued)
    with pytest.raises(InvalidTokenError, match="Token has expired"):
        decode_token(RULES, token)


def test_other_hmac_algorithms_are_refused() -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS512")
    with pytest.raises(InvalidTokenError, match="algorithm"):
        decode_token(RULES, token)
