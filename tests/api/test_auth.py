"""`billing.auth`: the token the CLI mints is the token the API accepts, and nothing else is."""

from __future__ import annotations

import time
from datetime import timedelta

import jwt
import pytest

from billing.auth import AuthNotConfiguredError, InvalidTokenError, decode_token, mint_token

SECRET = "unit-test-secret-unit-test-secret-0123"


def test_minted_token_decodes_to_its_claims() -> None:
    claims = decode_token(SECRET, mint_token(SECRET, 12, 34, ttl=timedelta(minutes=5)))
    assert (claims.user_id, claims.org_id) == (12, 34)
    assert 290 <= claims.expires_at.timestamp() - time.time() <= 300


def test_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(AuthNotConfiguredError):
        mint_token("", 1, 1)
    with pytest.raises(AuthNotConfiguredError):
        decode_token("", "a.b.c")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"sub": "1", "exp": 4102444800}, "Token is missing the 'org_id' claim"),
        ({"org_id": 1, "exp": 4102444800}, "Token is missing the 'sub' claim"),
        ({"sub": "1", "org_id": 1}, "Token is missing the 'exp' claim"),
        ({"sub": "me", "org_id": 1, "exp": 4102444800}, "Token claim 'sub' is not an id"),
        ({"sub": "1", "org_id": True, "exp": 4102444800}, "Token claim 'org_id' is not an id"),
        ({"sub": "1", "org_id": -3, "exp": 4102444800}, "Token claim 'org_id' is not an id"),
    ],
)
def test_tokens_with_bad_claims_are_refused(payload: dict[str, object], reason: str) -> None:
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    with pytest.raises(InvalidTokenError) as refused:
        decode_token(SECRET, token)
    assert refused.value.reason == reason


def test_other_hmac_algorithms_are_refused() -> None:
    token = jwt.encode({"sub": "1", "org_id": 1, "exp": 4102444800}, SECRET, algorithm="HS512")
    with pytest.raises(InvalidTokenError, match="algorithm"):
        decode_token(SECRET, token)
