"""Liveness, readiness and metrics, with the dependencies up, down and coming back."""

from __future__ import annotations

import asyncio
import re

import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from api.temporal import RECONNECT_INTERVAL_SECONDS
from billing.config import Settings
from tests.api.conftest import Api, start_dev_server
from tests.api.support import free_port, post_event, serve
from tests.factories.orgs import make_org
from tests.factories.stripe_events import stripe_event, subscription_object


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus exposition `text`, or None if absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


async def test_healthz(api: Api) -> None:
    response = await api.http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_ready_when_database_and_temporal_answer(api: Api) -> None:
    response = await api.http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "temporal": "ok"},
        "unavailable": [],
    }
    metrics = (await api.http.get("/metrics")).text
    assert metric_value(metrics, "billing_temporal_available") == 1.0


async def test_stopped_temporal_shows_in_readyz_gauge_and_webhook_metrics(
    api_settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
    stopped_temporal_client: Client,
) -> None:
    app = create_app(
        api_settings,
        temporal_client=stopped_temporal_client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    org = make_org(session_factory)
    event = stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))
    async with serve(app) as http:
        ready = await http.get("/readyz")
        webhook = await post_event(http, event)
        metrics = (await http.get("/metrics")).text

    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert ready.json()["unavailable"] == ["temporal"]
    assert ready.json()["checks"]["database"] == "ok"
    assert webhook.status_code == 503
    assert metric_value(metrics, "billing_temporal_available") == 0.0
    assert (
        metric_value(
            metrics,
            "billing_webhook_events_total",
            type="customer.subscription.updated",
            outcome="unavailable",
        )
        == 1.0
    )
    assert (
        metric_value(
            metrics,
            "billing_http_requests_total",
            method="POST",
            route="/api/webhooks/stripe",
            status="503",
        )
        == 1.0
    )
    assert metric_value(metrics, "billing_http_requests_total", route="/readyz", status="503")


async def test_database_down_shows_in_readyz(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    dead_session_factory: sessionmaker[Session],
) -> None:
    app = create_app(
        api_settings,
        temporal_client=temporal_dev_env.client,
        session_factory=dead_session_factory,
    )
    async with serve(app) as http:
        ready = await http.get("/readyz")
        assert (await http.get("/healthz")).status_code == 200

    assert ready.status_code == 503
    assert ready.json()["unavailable"] == ["database"]
    assert ready.json()["checks"]["temporal"] == "ok"


async def test_api_starts_without_temporal_and_connects_once_it_is_up(
    api_settings: Settings, database_url: str, session_factory: sessionmaker[Session]
) -> None:
    port = free_port()
    settings = api_settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
    org = make_org(session_factory)
    event = stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))
    # Nothing injected: the lifespan builds the engine, the Stripe client and the Temporal client.
    app = create_app(settings)
    async with serve(app) as http:
        down = await http.get("/readyz")
        refused = await post_event(http, event)
        env = await start_dev_server(port=port)
        try:
            await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)
            up = await http.get("/readyz")
            accepted = await post_event(http, event)
            metrics = (await http.get("/metrics")).text
        finally:
            await env.shutdown()

    assert (down.status_code, down.json()["unavailable"]) == (503, ["temporal"])
    assert refused.status_code == 503
    assert up.status_code == 200, up.text
    assert accepted.status_code == 200, accepted.text
    assert metric_value(metrics, "billing_temporal_available") == 1.0


async def test_metrics_count_requests_by_route_template(api: Api) -> None:
    for org_id in (1, 2, 3):
        await api.http.get(f"/api/orgs/{org_id}/billing")
    await api.http.get("/no/such/path")

    metrics = (await api.http.get("/metrics")).text

    assert (
        metric_value(
            metrics,
            "billing_http_requests_total",
            method="GET",
            route="/api/orgs/{org_id}/billing",
            status="401",
        )
        == 3.0
    )
    assert metric_value(metrics, "billing_http_requests_total", route="<unmatched>", status="404")
    assert "/api/orgs/1/billing" not in metrics


async def test_each_app_has_its_own_registry(api: Api, api_settings: Settings) -> None:
    await api.http.get("/healthz")
    other = create_app(api_settings)
    assert other.state.metrics.registry is not api.app.state.metrics.registry
