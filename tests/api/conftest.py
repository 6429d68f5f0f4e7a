"""The API wired to the real things: Postgres, the Temporal dev server, the Stripe emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
import stripe
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from billing.db.session import make_engine, make_session_factory
from billing.search_attributes import SEARCH_ATTRIBUTE_KEYS
from stripe_emulator.server import EmulatorServer
from tests.api.support import free_port, make_api_settings, serve
from tooling.binaries import temporal_cli_path


@dataclass
class Api:
    """A running app and the real components behind it."""

    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings
    temporal: Client
    session_factory: sessionmaker[Session]
    emulator: EmulatorServer
    stripe: stripe.StripeClient


@pytest.fixture
def api_settings(database_url: str, emulator: EmulatorServer, task_queue: str) -> Settings:
    return make_api_settings(
        database_url=database_url,
        stripe_api_base=emulator.url,
        temporal_task_queue=task_queue,
    )


@pytest_asyncio.fixture
async def api(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
) -> AsyncIterator[Api]:
    """The API over the session's dev server, a fresh database and the emulator."""
    app = create_app(
        api_settings,
        temporal_client=temporal_dev_env.client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    async with serve(app) as http:
        yield Api(
            app=app,
            http=http,
            settings=api_settings,
            temporal=temporal_dev_env.client,
            session_factory=session_factory,
            emulator=emulator,
            stripe=stripe_client,
        )


async def start_dev_server(port: int | None = None) -> WorkflowEnvironment:
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli_path(),
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        port=port,
        ui=False,
    )


@pytest_asyncio.fixture
async def stopped_temporal_client() -> Client:
    """A client whose server has been shut down: every call finds no server."""
    env = await start_dev_server()
    client = env.client
    await env.shutdown()
    return client


@pytest.fixture
def dead_session_factory() -> sessionmaker[Session]:
    """Sessions over an engine whose server does not exist."""
    engine = make_engine(f"postgresql+psycopg://billing@127.0.0.1:{free_port()}/billing")
    return make_session_factory(engine)
