"""Service API keys: how a console's backend authenticates (`BILLING_SERVICE_API_KEYS`).

`Authorization: Bearer <key>`, compared in constant time with every configured
key (several at once, so a key is rotated by adding the new one first). The key
is never logged: the request log names the route template and status only.
Member tokens are never accepted here, and service keys are never accepted on
member routes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SettingsDep
from api.errors import problem, unauthorized
from billing.auth import key_matches
from billing.config import Settings

# Shorter keys are guessable; `openssl rand -hex 32` makes a good one.
MIN_KEY_LENGTH = 32


class ServiceKeyConfigError(ValueError):
    """A configured service API key is too short to trust."""


def check_service_keys(settings: Settings) -> None:
    """At startup: every configured key has at least `MIN_KEY_LENGTH` characters."""
    for n, key in enumerate(settings.service_api_keys(), start=1):
        if len(key) < MIN_KEY_LENGTH:
            raise ServiceKeyConfigError(
                f"BILLING_SERVICE_API_KEYS: key {n} has {len(key)} characters; "
                f"use at least {MIN_KEY_LENGTH} (e.g. `openssl rand -hex 32`)."
            )


service_key_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ServiceApiKey",
    description=(
        "A service API key from BILLING_SERVICE_API_KEYS (comma-separated, so keys rotate). "
        "For the console's backend only; member tokens are refused here."
    ),
)


def _looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2 and value.startswith("eyJ")


async def require_service_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(service_key_scheme)],
) -> None:
    """401 unless the request carries one of the service API keys; 503 when none is set."""
    keys = settings.service_api_keys()
    if not keys:
        raise problem(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Service API not configured",
            "Set BILLING_SERVICE_API_KEYS in the API's environment to use the service API.",
        )
    if credentials is None:
        raise unauthorized("Missing service API key: send Authorization: Bearer <key>")
    if not key_matches(credentials.credentials, keys):
        if _looks_like_jwt(credentials.credentials):
            raise unauthorized("Member tokens are not accepted here: use a service API key")
        raise unauthorized("Invalid service API key")
