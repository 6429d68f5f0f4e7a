"""A database that stops answering: the API says 503 within seconds, then recovers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import stripe
from sqlalchemy.engine import make_url
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from billing.db.session import make_engine, make_session_factory
from tests.api.support import bearer, post_event, serve
from tests.factories.freezable_proxy import FreezableProxy
from tests.factories.orgs import make_org_with_member
from tests.factories.stripe_events import stripe_event, subscription_object


@pytest_asyncio.fixture
async def proxy(database_url: str) -> AsyncIterator[FreezableProxy]:
    url = make_url(database_url)
    socket_dir = url.query.get("host")
    # The embedded server listens on a Unix socket only: proxy TCP to that socket.
    unix_socket = (
        f"{socket_dir}/.s.PGSQL.{url.port or 5432}" if isinstance(socket_dir, str) else None
    )
    running = FreezableProxy(url.host or "127.0.0.1", url.port or 5432, unix_socket=unix_socket)
    await running.start()
    yield running
    await running.close()


async def test_frozen_database_means_a_prompt_503_then_recovery(
    api_settings: Settings,
    database_url: str,
    proxy: FreezableProxy,
    temporal_dev_env: WorkflowEnvironment,
    stripe_client: stripe.StripeClient,
) -> None:
    through_proxy = (
        make_url(database_url)
        .difference_update_query(["host"])
        .set(host="127.0.0.1", port=proxy.port)
    )
    engine = make_engine(
        through_proxy.render_as_string(hide_password=False), connect_timeout=2, pool_timeout=2
    )
    factory = make_session_factory(engine)
    # The proxy runs on this event loop: blocking calls go to a thread.
    org, user = await asyncio.to_thread(make_org_with_member, factory)
    app = create_app(
        api_settings,
        temporal_client=temporal_dev_env.client,
        session_factory=factory,
        stripe_client=stripe_client,
    )
    event = stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))
    async with serve(app) as http:
        assert (await post_event(http, event)).status_code == 200

        proxy.freeze()
        for call in (
            post_event(http, event),
            http.get(f"/api/orgs/{org.id}/billing", headers=bearer(user.id, org.id)),
            http.get("/readyz"),
        ):
            started = time.monotonic()
            response = await call
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert elapsed < 5, elapsed

        proxy.thaw()
        assert (await post_event(http, event)).status_code == 200
    engine.dispose()
