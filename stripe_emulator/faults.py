"""Switchable misbehaviour: error rates, latency, Stripe's rate limit, webhook chaos."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from stripe_emulator.errors import StripeError

STRIPE_TEST_MODE_RATE = 25.0


@dataclass
class Faults:
    """Every knob of the fault injector; all off by default."""

    error_rate_429: float = 0.0
    error_rate_500: float = 0.0
    latency_ms: float = 0.0
    rate_limit_per_second: float = 0.0
    rate_limit_burst: float = 0.0
    # Seconds sent as `Retry-After` with every 429 (0: no header, like most of Stripe's).
    retry_after_seconds: float = 0.0
    webhook_delay_ms: float = 0.0
    webhook_duplicate_rate: float = 0.0
    webhook_shuffle_window: int = 0
    webhook_drop_rate: float = 0.0
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, values: dict[str, Any]) -> None:
        """Apply known knobs; an unknown knob is a mistake worth a 400."""
        names = {f.name: f for f in fields(self)}
        for key, value in values.items():
            if key not in names:
                raise StripeError(f"Unknown fault setting: {key}", param=key)
            if key == "rate_limit_per_second" and value is True:
                value = STRIPE_TEST_MODE_RATE
            if value is None and key != "seed":
                value = 0
            current = getattr(self, key)
            if key == "seed":
                setattr(self, key, None if value is None else int(value))
            elif isinstance(current, int) and not isinstance(current, bool):
                setattr(self, key, int(value))
            else:
                setattr(self, key, float(value))


class FaultInjector:
    """Decides per request whether to fail it, delay it or rate-limit it."""

    def __init__(self) -> None:
        self.settings = Faults()
        self._lock = threading.Lock()
        self._random = random.Random()
        self._tokens = 0.0
        self._last_refill = time.monotonic()

    def configure(self, values: dict[str, Any]) -> Faults:
        with self._lock:
            self.settings.update(values)
            if "seed" in values:
                self._random.seed(self.settings.seed)
            if "rate_limit_per_second" in values or "rate_limit_burst" in values:
                self._tokens = self._burst()
                self._last_refill = time.monotonic()
            return self.settings

    def clear(self) -> None:
        with self._lock:
            self.settings = Faults()

    def _burst(self) -> float:
        return self.settings.rate_limit_burst or self.settings.rate_limit_per_second

    def chance(self, rate: float) -> bool:
        """True with probability `rate` (shared random source, so a seed replays a run)."""
        if rate <= 0:
            return False
        with self._lock:
            return self._random.random() < rate

    def shuffle(self, items: list[Any]) -> None:
        with self._lock:
            self._random.shuffle(items)

    def check_request(self) -> StripeError | None:
        """The error to answer instead of running the request, if any."""
        settings = self.settings
        if settings.rate_limit_per_second > 0:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(
                    self._burst(),
                    self._tokens + (now - self._last_refill) * settings.rate_limit_per_second,
                )
                self._last_refill = now
                if self._tokens < 1:
                    return rate_limited(settings.retry_after_seconds)
                self._tokens -= 1
        if self.chance(settings.error_rate_429):
            return rate_limited(settings.retry_after_seconds)
        if self.chance(settings.error_rate_500):
            return StripeError(
                "An unknown error occurred while processing your request; the emulator "
                "injected it on purpose.",
                type="api_error",
                status=500,
                headers={"Stripe-Should-Retry": "true"},
            )
        return None


def rate_limited(retry_after: float = 0.0) -> StripeError:
    """Stripe's 429: a `rate_limit` code on an `invalid_request_error`."""
    headers = {"Stripe-Should-Retry": "true"}
    if retry_after > 0:
        headers["Retry-After"] = f"{retry_after:g}"
    return StripeError(
        "Request rate limit exceeded. Learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
        code="rate_limit",
        status=429,
        headers=headers,
    )
