"""Stripe's error answers, raised anywhere in a handler and rendered once by the app."""

from __future__ import annotations

from typing import Any

STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "idempotency_error": 400,
    "card_error": 402,
    "api_error": 500,
    "rate_limit_error": 429,
}


class StripeError(Exception):
    """An error the way Stripe reports it: a status code and the `error` object."""

    def __init__(
        self,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.status = status if status is not None else STATUS_BY_TYPE.get(type, 400)
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON document Stripe answers with; absent fields are left out like Stripe does."""
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        if request_id is not None:
            error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        error.update(self.extra)
        return {"error": error}


def missing(kind: str, object_id: str, param: str | None = "id") -> StripeError:
    """Stripe's 404 for an id that names nothing: `No such customer: 'cus_x'`."""
    return StripeError(
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
        status=404,
    )


def invalid(message: str, param: str | None = None, code: str | None = None) -> StripeError:
    """A 400 `invalid_request_error` about one parameter."""
    return StripeError(message, param=param, code=code)
