"""Prometheus metrics shared by the API and the worker.

Each process (and each test app) owns its own `CollectorRegistry`, so two apps in
one test session never fight over the global default registry.

Exposed names:
- `billing_http_requests_total{method,route,status}` (route is the template)
- `billing_http_request_duration_seconds{method,route}`
- `billing_webhook_events_total{type,outcome}`
- `billing_stripe_request_duration_seconds{operation}`
- `billing_stripe_errors_total{operation,error}`
- `billing_temporal_available` (1 when the last contact with Temporal worked)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Event type label for requests rejected before their signature was checked:
# unverified input must not create label values.
UNVERIFIED_EVENT_TYPE = "unverified"

_STRIPE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BillingMetrics:
    """Every metric the service exposes, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.http_requests = Counter(
            "billing_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "billing_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "billing_webhook_events",
            "Stripe webhook deliveries, by event type and what became of them.",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.stripe_request_duration = Histogram(
            "billing_stripe_request_duration_seconds",
            "Latency of calls to the Stripe API, by operation.",
            ["operation"],
            buckets=_STRIPE_BUCKETS,
            registry=self.registry,
        )
        self.stripe_errors = Counter(
            "billing_stripe_errors",
            "Failed calls to the Stripe API, by operation and error class.",
            ["operation", "error"],
            registry=self.registry,
        )
        self.temporal_available = Gauge(
            "billing_temporal_available",
            "1 when the last contact with the Temporal server succeeded, else 0.",
            registry=self.registry,
        )

    @asynccontextmanager
    async def stripe_call(self, operation: str) -> AsyncIterator[None]:
        """Time one Stripe call and count it as an error if it raises."""
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            self.stripe_errors.labels(operation=operation, error=type(err).__name__).inc()
            raise
        finally:
            self.stripe_request_duration.labels(operation=operation).observe(
                time.perf_counter() - started
            )

    def set_temporal_available(self, available: bool) -> None:
        self.temporal_available.set(1 if available else 0)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for a `/metrics` answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
