"""Which Stripe errors retrying can fix, and which it cannot.

Transient ones (429, 5xx, connection) are re-raised for Temporal's retry with
backoff; the rest become non-retryable `ApplicationError`s carrying Stripe's
message, so the workflow can show them to an operator instead of retrying forever.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import stripe
from temporalio.exceptions import ApplicationError

P = ParamSpec("P")
R = TypeVar("R")

NON_RETRYABLE_STRIPE_ERRORS: tuple[type[stripe.StripeError], ...] = (
    stripe.InvalidRequestError,
    stripe.AuthenticationError,
    stripe.PermissionError,
    stripe.IdempotencyError,
    stripe.CardError,
    stripe.SignatureVerificationError,
)


def describe(err: stripe.StripeError) -> str:
    message = getattr(err, "user_message", None) or str(err) or type(err).__name__
    code = getattr(err, "code", None)
    status = getattr(err, "http_status", None)
    parts = [type(err).__name__]
    if status:
        parts.append(str(status))
    if code:
        parts.append(str(code))
    return f"{' '.join(parts)}: {message}"


def stripe_errors_classified(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (KeyError, ValueError) as err:
            # An answer we cannot read (e.g. a status this code does not know).
            raise ApplicationError(
                f"unexpected Stripe answer: {type(err).__name__}: {err}",
                type="StripeUnexpectedAnswer",
                non_retryable=True,
            ) from err
        except NON_RETRYABLE_STRIPE_ERRORS as err:
            if getattr(err, "http_status", None) == 409:
                raise  # lock_timeout: another request holds the object; retry
            raise ApplicationError(
                describe(err), type=f"Stripe{type(err).__name__}", non_retryable=True
            ) from err

    return wrapper
