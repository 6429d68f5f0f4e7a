"""Error answers: their models (for OpenAPI) and the exceptions that produce them.

Client errors carry a one-line string `detail`; server-side problems (not
configured, Stripe failing, a dependency down) carry `{title, description}` so
an operator sees what to fix and a caller sees whether to retry.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status
from pydantic import BaseModel


class ErrorPublic(BaseModel):
    """A refused request and the reason, in one line."""

    detail: str


class ProblemBase(BaseModel):
    title: str
    description: str


class ProblemPublic(BaseModel):
    """A server-side problem: what is wrong and what to do about it."""

    detail: ProblemBase


def problem(status_code: int, title: str, description: str, **headers: str) -> HTTPException:
    return HTTPException(
        status_code=status_code,
        detail={"title": title, "description": description},
        headers=headers or None,
    )


def stripe_not_configured(missing: list[str]) -> HTTPException:
    names = " and ".join(missing)
    return problem(
        status.HTTP_500_INTERNAL_SERVER_ERROR,
        "Stripe not configured",
        f"Set {names} in the API's environment.",
    )


def auth_not_configured() -> HTTPException:
    return problem(
        status.HTTP_500_INTERNAL_SERVER_ERROR,
        "Authentication not configured",
        "Set AUTH_JWT_SECRET (or AUTH_JWKS_URL) in the API's environment.",
    )


def jwks_unavailable(reason: str) -> HTTPException:
    return problem(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Identity provider unavailable",
        f"{reason}; retry later.",
        **{"Retry-After": "5"},
    )


def temporal_unavailable(reason: str) -> HTTPException:
    return problem(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Temporal unavailable",
        f"The Temporal server did not accept the request ({reason}); retry later.",
        **{"Retry-After": "5"},
    )


def database_unavailable() -> HTTPException:
    return problem(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Database unavailable",
        "The database did not answer; retry later.",
        **{"Retry-After": "5"},
    )


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=reason,
        headers={"WWW-Authenticate": "Bearer"},
    )


def forbidden(reason: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=reason)


def answer_example(code: int, summary: str, value: Any) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI responses entry showing one JSON body of answer `code`."""
    examples = {"example": {"summary": summary, "value": value}}
    return {code: {"content": {"application/json": {"examples": examples}}}}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give."""
    return {code: _RESPONSES[code] for code in codes}


_RESPONSES: dict[int, dict[str, Any]] = {
    400: {"model": ErrorPublic, "description": "Malformed, unsigned or wrongly signed request"},
    401: {
        "model": ErrorPublic,
        "description": "Missing, malformed, expired or wrongly signed bearer token",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: {"model": ErrorPublic, "description": "The token's user may not act on this org"},
    404: {"model": ErrorPublic, "description": "Not found"},
    409: {
        "model": ProblemPublic,
        "description": "Not possible in the org's billing state (the description says why)",
    },
    413: {"model": ErrorPublic, "description": "Body larger than 1 MiB"},
    500: {"model": ProblemPublic, "description": "The API is not configured (names the setting)"},
    502: {"model": ProblemPublic, "description": "Stripe refused or failed the request"},
    503: {
        "model": ProblemPublic,
        "description": "A dependency (Temporal, database, Stripe) is unavailable; retry",
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}
        },
    },
}
