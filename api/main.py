"""The API's composition root: the only place that builds its clients.

`uvicorn api.main:app` (what `billing api` runs) imports this module; nothing
connects at import. The lifespan builds one Temporal client, the engine and the
Stripe gateway, unless the caller passed them in (tests pass real ones pointed
at their own servers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import stripe
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from api import store
from api.deps import ApiServices
from api.docs_pages import add_offline_docs
from api.errors import database_unavailable
from api.log_limits import BoundedLog
from api.metrics import CLIENT_CLOSED_STATUS, BillingMetrics, method_label, status_label
from api.routes import checkout, entitlement, health, orgs, payments, service, webhooks
from api.server import BodyTimeoutMiddleware
from api.service_auth import check_service_keys
from api.temporal import TemporalLink
from api.webhook_store import WebhookStore
from billing.auth import AuthConfigError, check_settings
from billing.config import Settings, get_settings
from billing.db.session import make_engine, make_session_factory
from billing.jwks import JwksKeys, JwksRules
from billing.logging import log_context
from billing.stripe_gateway import StripeGateway, make_stripe_client

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"


class RequestMetricsMiddleware:
    """Counts and times every request by route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: BillingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500
        client_left = False

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        with log_context():
            try:
                await self.app(scope, receive, send_with_status)
            except ClientDisconnect:
                # The client's doing, not ours: no traceback, no 500; nobody is left to answer.
                client_left = True
            finally:
                status = CLIENT_CLOSED_STATUS if client_left else status_label(status_code)
                route = scope.get("route")
                template = getattr(route, "path", None) or UNMATCHED_ROUTE
                method = method_label(str(scope.get("method", "")))
                elapsed = time.perf_counter() - started
                self.metrics.http_requests.labels(
                    method=method, route=template, status=status
                ).inc()
                self.metrics.http_request_duration.labels(method=method, route=template).observe(
                    elapsed
                )
                if not scope.get("state", {}).get("quiet"):
                    log.info(
                        "%s %s %s",
                        method,
                        template,
                        status,
                        extra={
                            "status": status if client_left else status_code,
                            "duration_ms": round(elapsed * 1000, 1),
                        },
                    )


def _stripe_gateway(
    settings: Settings, stripe_client: stripe.StripeClient | None
) -> StripeGateway | None:
    if stripe_client is not None:
        return StripeGateway(stripe_client, settings)
    missing = settings.missing_stripe_settings()
    if missing:
        log.warning(
            "Stripe is not configured (%s): webhooks and the portal will answer 500",
            " and ".join(missing),
        )
        return None
    # Bounded retries of transient Stripe failures (connection errors, 429, 5xx).
    client = make_stripe_client(
        settings.stripe_secret_key, api_base=settings.stripe_api_base, max_network_retries=2
    )
    return StripeGateway(client, settings)


def _check_auth(settings: Settings) -> None:
    """Refuse to start with a secret too weak to trust; say so when there is none."""
    try:
        check_settings(settings)
    except AuthConfigError as err:
        log.error("The API cannot start: %s", err)
        raise
    check_service_keys(settings)
    if not settings.auth_jwt_secret and not settings.auth_jwks_url:
        log.warning("AUTH_JWT_SECRET is not set: the portal and billing routes will answer 500")


def create_app(
    settings: Settings | None = None,
    *,
    temporal_client: Client | None = None,
    session_factory: store.SessionFactory | None = None,
    stripe_client: stripe.StripeClient | None = None,
) -> FastAPI:
    """Build the API. What is not passed in is built by the lifespan from `settings`."""
    resolved = settings or get_settings()
    metrics = BillingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _check_auth(resolved)
        engine: Engine | None = None
        factory = session_factory
        if factory is None:
            # Short limits: an API call waits seconds at most, never minutes.
            engine = make_engine(
                resolved.database_url,
                connect_timeout=3,
                pool_timeout=3.0,
                statement_timeout_ms=5_000,
                lock_timeout_ms=2_000,
            )
            factory = make_session_factory(engine)
        temporal = TemporalLink(resolved, metrics, temporal_client)
        await temporal.startup()
        app.state.services = ApiServices(
            settings=resolved,
            metrics=metrics,
            session_factory=factory,
            temporal=temporal,
            stripe=_stripe_gateway(resolved, stripe_client),
            webhook_store=WebhookStore(factory),
            jwks=JwksKeys.of(JwksRules.of(resolved)) if resolved.auth_jwks_url else None,
        )
        try:
            yield
        finally:
            if engine is not None:
                engine.dispose()

    app = FastAPI(
        title="Org billing API",
        version="0.1.0",
        summary="Stripe webhooks in, billing portal links and billing state out.",
        lifespan=lifespan,
        # The API's metrics are its own (Prometheus, `/metrics`); FastAPI's OpenTelemetry
        # hooks would look for a provider in the environment on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # Served by add_offline_docs from this process, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    add_offline_docs(app)
    app.state.metrics = metrics
    app.state.webhook_refusals = BoundedLog(
        logging.getLogger("api.routes.webhooks"), "Stripe webhook refused"
    )
    # Added first, so innermost: the metrics, access log and body timeout wrap it.
    app.add_middleware(webhooks.WebhookFastPath)
    app.add_middleware(BodyTimeoutMiddleware, timeout=resolved.api_body_timeout_seconds)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.exception_handler(SQLAlchemyError)
    async def database_failed(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.warning("Database error answering %s: %s", request.url.path, type(exc).__name__)
        http = database_unavailable()
        return JSONResponse(
            {"detail": http.detail}, status_code=http.status_code, headers=http.headers
        )

    app.include_router(webhooks.router)
    app.include_router(payments.router)
    app.include_router(checkout.router)
    app.include_router(orgs.router)
    app.include_router(entitlement.router)
    app.include_router(service.router)
    app.include_router(health.router)
    return app


app = create_app()
