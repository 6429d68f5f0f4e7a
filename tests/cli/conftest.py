"""Run `billing` in-process with CliRunner, against the suite's real Postgres.

Each invocation gets an explicit environment: the test database, a home folder
of its own, and every other setting the developer may have exported removed,
so nothing outside the test decides which stack the CLI talks to.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from billing.config import Settings
from tooling.cli.main import app

Invoke = Callable[..., Result]

JWT_SECRET = "cli-test-secret-of-at-least-32-bytes"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "devstack: starts `billing dev` as a subprocess (select with -m devstack)"
    )


def closed_port() -> int:
    """A port nothing listens on: Temporal "unreachable" without waiting for a timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings_variables() -> list[str]:
    return [name.upper() for name in Settings.model_fields]


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home, and a working directory without a `.env`."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return tmp_path / "home"


@pytest.fixture
def cli_env(database_url: str, cli_home: Path) -> dict[str, str | None]:
    env: dict[str, str | None] = dict.fromkeys(_settings_variables())
    env.update(
        {
            "BILLING_HOME": str(cli_home),
            "DATABASE_URL": database_url,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}",
            "AUTH_JWT_SECRET": JWT_SECRET,
            "COLUMNS": "200",
        }
    )
    return env


@pytest.fixture
def fresh_org_ids(session_factory: sessionmaker[Session]) -> None:
    """Org ids no other test used: workflows `org-billing-{id}` outlive the TRUNCATE."""
    start = random.randrange(10_000_000, 1_000_000_000)
    with session_factory.begin() as session:
        session.execute(text(f"ALTER SEQUENCE orgs_id_seq RESTART WITH {start}"))


@pytest.fixture
def invoke(
    cli_env: dict[str, str | None], session_factory: sessionmaker[Session]
) -> Iterator[Invoke]:
    """`invoke("orgs", "list", env={...})`: the app in-process, stdout and stderr apart."""
    runner = CliRunner()

    def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
        merged = {**cli_env, **(env or {})}
        return runner.invoke(app, list(args), env=merged, catch_exceptions=False)

    yield run


def assert_clean_error(result: Result, *fragments: str) -> None:
    """An expected error: non-zero exit, one sentence on stderr, no traceback."""
    assert result.exit_code != 0, result.stdout
    message = result.stderr.strip()
    assert message.startswith("Error: "), message
    assert "Traceback" not in result.output
    assert len(message.splitlines()) == 1, message
    assert message.endswith((".", "?")), message
    for fragment in fragments:
        assert fragment in message, message
