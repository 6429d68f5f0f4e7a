"""The live stack (API on a port, worker, emulator webhooks) for workflow tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from stripe_emulator.server import EmulatorServer
from tests.factories.live import LiveStack, live_stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stripe_activities(factory): the live stack's worker uses factory(settings) "
        "as its Stripe activities (to inject a crash)",
    )


@pytest_asyncio.fixture
async def stack(
    request: pytest.FixtureRequest,
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[LiveStack]:
    marker = request.node.get_closest_marker("stripe_activities")
    async with live_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
        stripe_activities=marker.args[0] if marker else None,
    ) as live:
        yield live
