"""The worker's wiring: DB activities never wait for a thread or a connection, and
every activity transaction is bounded (statement, lock and connect timeouts)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from billing.config import Settings
from billing.constants import stripe_task_queue
from billing.db.session import (
    CONNECT_TIMEOUT_SECONDS,
    LOCK_TIMEOUT_MS,
    STATEMENT_TIMEOUT_MS,
    make_session_factory,
)
from billing.stripe_gateway import make_stripe_client
from worker import DB_ACTIVITY_THREADS, build_workers, worker_engine

pytestmark = pytest.mark.asyncio


async def test_the_db_worker_takes_no_more_activities_than_it_has_threads(
    temporal_dev_env: WorkflowEnvironment, database_url: str, task_queue: str
) -> None:
    settings = Settings.model_validate(
        {"database_url": database_url, "temporal_task_queue": task_queue}
    )
    engine = worker_engine(settings)
    try:
        with ThreadPoolExecutor(max_workers=3) as executor:
            main, stripe_worker = build_workers(
                temporal_dev_env.client,
                settings,
                make_session_factory(engine),
                make_stripe_client("sk_test_x", api_base="http://127.0.0.1:9"),
                executor,
            )
            assert main.config()["max_concurrent_activities"] == 3
            assert main.task_queue == task_queue
            assert stripe_worker.task_queue == stripe_task_queue(task_queue)
    finally:
        engine.dispose()


async def test_each_activity_thread_has_a_bounded_connection(database_url: str) -> None:
    settings = Settings.model_validate({"database_url": database_url})
    engine = worker_engine(settings)
    try:
        assert engine.pool.size() == DB_ACTIVITY_THREADS  # type: ignore[attr-defined]
        with engine.begin() as conn:
            statement = conn.execute(text("SHOW statement_timeout")).scalar_one()
            lock = conn.execute(text("SHOW lock_timeout")).scalar_one()
            info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
            connect = info.get_parameters().get("connect_timeout")
        assert statement == f"{STATEMENT_TIMEOUT_MS // 1000}s"
        assert lock == f"{LOCK_TIMEOUT_MS // 1000}s"
        assert connect == str(CONNECT_TIMEOUT_SECONDS)
    finally:
        engine.dispose()
