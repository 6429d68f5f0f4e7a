"""Engine and session factory. Built only by the composition roots.

Every connection is bounded: connecting, waiting for a pooled connection,
each statement and each lock wait have a limit, so a database that hangs turns
into an error (a 503 in the API, a retried activity in the worker) instead of
a request or an activity that waits forever.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

CONNECT_TIMEOUT_SECONDS = 5
POOL_TIMEOUT_SECONDS = 10.0
STATEMENT_TIMEOUT_MS = 30_000
LOCK_TIMEOUT_MS = 10_000


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    connect_timeout: int = CONNECT_TIMEOUT_SECONDS,
    pool_timeout: float = POOL_TIMEOUT_SECONDS,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> Engine:
    options = f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms}"
    return create_engine(
        database_url,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout, "options": options},
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
