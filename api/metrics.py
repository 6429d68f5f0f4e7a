"""Prometheus metrics shared by the API and the worker.

Each process (and each test app) owns its own `CollectorRegistry`, so two apps in
one test session never fight over the global default registry. Under
`billing api --workers N` the processes write their values to files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode) and `/metrics`,
whichever process answers it, adds them up.

Exposed names:
- `billing_http_requests_total{method,route,status}` (route is the template; status
  `client_closed` when the client left before the answer)
- `billing_http_request_duration_seconds{method,route}`
- `billing_webhook_events_total{type,outcome}`
- `billing_stripe_request_duration_seconds{operation}`
- `billing_stripe_errors_total{operation,error}`
- `billing_temporal_available` (1 when the last contact with Temporal worked)
"""

from __future__ import annotations

import os
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
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus_client's own variable: where the processes of one API share their values.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Every label value comes from a closed set: anything a caller can send (a
# method, a path, an event type) must never create a new series.
UNVERIFIED_EVENT_TYPE = "unverified"
OTHER = "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Answers of requests whose client went away before they were answered.
CLIENT_CLOSED_STATUS = "client_closed"


def method_label(method: str) -> str:
    """The HTTP method, or `other` for anything outside the standard set."""
    return method if method in HTTP_METHODS else OTHER


def event_type_label(event_type: str, known: frozenset[str]) -> str:
    """A verified event's type when it is one we know, else `other`.

    Signed events come from Stripe, but Stripe adds types over time and a
    leaked secret must not grow the page either.
    """
    return event_type if event_type in known else OTHER


def status_label(status_code: int) -> str:
    return str(status_code) if 100 <= status_code <= 599 else OTHER


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
            # Several processes: the latest contact of any of them.
            multiprocess_mode="mostrecent",
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
        if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
            every_process = CollectorRegistry()
            MultiProcessCollector(every_process)  # type: ignore[no-untyped-call]
            return generate_latest(every_process), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
