"""The whole product running for real in one test: API on a port, worker, emulator.

The emulator delivers signed webhooks over HTTP to the API, which signals the
workflows that the worker runs: the same path as production.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from activities.stripe_activities import StripeActivities
from api.main import create_app
from billing.config import Settings
from billing.constants import HANDLED_EVENT_TYPES
from billing.db.models import Org, StripeEventLog
from billing.orchestration import query_state
from stripe_emulator.server import EmulatorServer
from tests.factories.stack import eventually, make_settings, running_worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WorkerControl:
    """The worker of a live stack, which a test may stop (an outage) and start again."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        session_factory: sessionmaker[Session],
        stripe_activities: StripeActivities | None,
    ) -> None:
        self._args = (client, settings, session_factory)
        self._stripe_activities = stripe_activities
        self._running: contextlib.AbstractAsyncContextManager[None] | None = None

    async def start(self) -> None:
        assert self._running is None
        self._running = running_worker(*self._args, stripe_activities=self._stripe_activities)
        await self._running.__aenter__()

    async def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            await running.__aexit__(None, None, None)


@dataclass
class LiveStack:
    settings: Settings
    client: Client
    stripe: stripe.StripeClient
    emulator: EmulatorServer
    session_factory: sessionmaker[Session]
    clock_id: str
    api_url: str
    worker: WorkerControl

    def clock_time(self) -> int:
        clock = self.stripe.v1.test_helpers.test_clocks.retrieve(self.clock_id)
        return int(clock.frozen_time)

    async def advance(self, to: int) -> None:
        """Move the test clock, wait until Stripe is done and its webhooks delivered.

        Runs off the event loop: the API that receives the webhooks shares it.
        """

        def advance_and_wait() -> None:
            clocks = self.stripe.v1.test_helpers.test_clocks
            clocks.advance(self.clock_id, {"frozen_time": to})
            deadline = time.monotonic() + 30
            while clocks.retrieve(self.clock_id).status != "ready":
                if time.monotonic() > deadline:
                    raise AssertionError("test clock did not finish advancing")
                time.sleep(0.05)
            assert self.emulator.wait_for_webhooks(timeout=30), "webhooks still pending"

        await asyncio.to_thread(advance_and_wait)

    async def settled(self, org_id: int) -> None:
        """Wait until every webhook Stripe sent so far was applied by the org's workflow."""
        assert await asyncio.to_thread(self.emulator.wait_for_webhooks, 30)

        def signalled() -> set[str]:
            with self.session_factory() as session:
                return set(
                    session.scalars(
                        select(StripeEventLog.id).where(
                            StripeEventLog.org_id == org_id, StripeEventLog.outcome == "signalled"
                        )
                    )
                )

        async def unapplied() -> set[str]:
            state = await query_state(self.client, org_id)
            return signalled() - set(state.seen_event_ids)

        await eventually(unapplied, lambda missing: not missing)

    def org(self, org_id: int) -> Org:
        with self.session_factory() as session:
            org = session.get(Org, org_id)
            assert org is not None
            return org

    def attach_card(self, customer_id: str, token: str) -> None:
        pm = self.stripe.v1.payment_methods.attach(token, {"customer": customer_id})
        self.stripe.v1.customers.update(
            customer_id, {"invoice_settings": {"default_payment_method": pm.id}}
        )

    def subscription(self, subscription_id: str) -> Any:
        return self.stripe.v1.subscriptions.retrieve(subscription_id)


@contextlib.asynccontextmanager
async def live_stack(
    client: Client,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    *,
    stripe_activities: Callable[[Settings], StripeActivities] | None = None,
    api_connects: bool = False,
    **overrides: object,
) -> AsyncIterator[LiveStack]:
    """`stripe_activities` builds the worker's Stripe activities from the stack's settings.

    With `api_connects` the API builds its own Temporal client from the settings,
    as in production, instead of sharing the test's.
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    clock = stripe_client.v1.test_helpers.test_clocks.create(
        {"frozen_time": int(datetime.now(UTC).timestamp()), "name": task_queue}
    )
    endpoint = stripe_client.v1.webhook_endpoints.create(
        {
            "url": f"{api_url}/api/webhooks/stripe",
            "enabled_events": sorted(HANDLED_EVENT_TYPES),  # type: ignore[arg-type]
        }
    )
    assert endpoint.secret
    settings = make_settings(
        database_url=database_url,
        emulator_url=emulator.url,
        task_queue=task_queue,
        catalog=catalog,
        stripe_webhook_secret=endpoint.secret,
        stripe_test_clock=clock.id,
        **overrides,
    )
    app = create_app(
        settings,
        temporal_client=None if api_connects else client,
        session_factory=session_factory,
    )
    worker = WorkerControl(
        client,
        settings,
        session_factory,
        stripe_activities(settings) if stripe_activities else None,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    # The test's own Stripe calls retry, so injected faults only hit the product.
    base = emulator.url.rstrip("/")
    patient = stripe.StripeClient(
        "sk_test_emulator",
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=20,
    )
    try:
        await worker.start()
        yield LiveStack(
            settings=settings,
            client=client,
            stripe=patient,
            emulator=emulator,
            session_factory=session_factory,
            clock_id=clock.id,
            api_url=api_url,
            worker=worker,
        )
    finally:
        await worker.stop()
        server.should_exit = True
        await serving
