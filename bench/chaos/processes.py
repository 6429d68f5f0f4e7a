"""The stack as separate processes, each one restartable the way an outage restarts it.

Postgres (a fresh database on the machine's server, or an embedded one), the
Temporal dev server (its SQLite file survives restarts), the Stripe emulator
(`billing emulator serve` with a state file), the API (`billing api`) and two
workers (`billing worker`). Each is a `tooling.supervise.Child`: its own process
group, its settings in the environment, its output in `<workdir>/logs/`. Nothing
restarts them on its own here: the fault injector decides when they come back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import stripe
from sqlalchemy.engine import make_url

from billing.db.migrate import upgrade
from tooling.binaries import temporal_dev_server_argv
from tooling.catalog import ensure_catalog, ensure_webhook_endpoint
from tooling.supervise import (
    HOST,
    Child,
    EmbeddedPostgres,
    free_port,
    http_ok,
    tcp_open,
    wait_until,
)

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TASK_QUEUE = "billing"


def patient_stripe(api_key: str, base: str) -> stripe.StripeClient:
    """The harness's own Stripe client: it retries injected faults, so they hit only the product."""
    base = base.rstrip("/")
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=20,
    )


# Processes -------------------------------------------------------------------------


def billing_command(*args: str) -> list[str]:
    """`billing ...` with this interpreter, so children use the same environment."""
    return [sys.executable, "-m", "tooling.cli", *args]


# Postgres --------------------------------------------------------------------------


@dataclass
class Database:
    """A database made for one run, dropped at the end unless it is kept."""

    url: str
    admin_dsn: str
    name: str
    embedded: EmbeddedPostgres | None = None

    def drop(self) -> None:
        """Drop the database (and stop an embedded server)."""
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_dsn, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.embedded is not None:
            self.embedded.stop()


def _psycopg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(_psycopg_dsn(url), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def create_database(workdir: Path, base_url: str | None = None) -> Database:
    """A fresh, migrated database on the machine's Postgres, else on an embedded one."""
    base = (base_url or os.environ.get("DATABASE_URL") or LOCAL_POSTGRES).replace(
        "postgresql://", "postgresql+psycopg://", 1
    )
    embedded = None
    if not _reachable(base):
        # Stopped by `drop`, or when this process exits if the run keeps its database.
        embedded = EmbeddedPostgres(workdir / "pgdata", workdir / "logs" / "postgres.log")
        embedded.start()
        base = embedded.url()
    name = f"billing_chaos_{uuid.uuid4().hex[:10]}"
    admin = _psycopg_dsn(base)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return Database(url=url, admin_dsn=admin, name=name, embedded=embedded)


# The stack -------------------------------------------------------------------------


WEBHOOK_RETRY_DELAYS = "0.5,1,2,4,8,15,30,60"


class Stack:
    """Every process of the product, with the settings they share."""

    def __init__(self, workdir: Path, database: Database, workers: int = 2) -> None:
        self.workdir = workdir
        self.database = database
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.temporal_port = free_port()
        self.emulator_port = free_port()
        self.api_port = free_port()
        self.temporal_address = f"{HOST}:{self.temporal_port}"
        self.emulator_url = f"http://{HOST}:{self.emulator_port}"
        self.api_url = f"http://{HOST}:{self.api_port}"
        self.state_file = workdir / "emulator.json"
        self.api_key = f"sk_test_chaos{secrets.token_hex(8)}"
        self.values: dict[str, str] = {}
        self.clock_id = ""
        self.clock_start = 0
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "BILLING_HOME": str(workdir)}
        temporal_argv = temporal_dev_server_argv(
            host=HOST,
            port=self.temporal_port,
            db_filename=workdir / "temporal.db",
            namespace="default",
            log_level="error",
        )
        self.temporal = self._service("temporal", temporal_argv, base_env)
        self.emulator = self._service(
            "emulator",
            billing_command(
                "emulator",
                "serve",
                "--host",
                HOST,
                "--port",
                str(self.emulator_port),
                "--state-file",
                str(self.state_file),
                # Stripe retries a failed delivery for days; the emulator's default
                # gives up after 15 s, shorter than an API restart and a Temporal
                # outage together on a slow machine. About two minutes here.
                "--webhook-retry-delays",
                WEBHOOK_RETRY_DELAYS,
            ),
            base_env,
        )
        self._base_env = base_env
        self.api = self._service(
            "api", billing_command("api", "--host", HOST, "--port", str(self.api_port)), base_env
        )
        self.workers = [
            self._service(f"worker-{i + 1}", billing_command("worker"), base_env)
            for i in range(workers)
        ]

    def _service(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        return Child(name, argv, self.logs / f"{name}.log", env=dict(env), cwd=self.workdir)

    @property
    def services(self) -> list[Child]:
        return [self.temporal, self.emulator, self.api, *self.workers]

    def stripe(self) -> stripe.StripeClient:
        """A client of the emulator for the harness itself."""
        return patient_stripe(self.api_key, self.emulator_url)

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        """Servers first, then the Stripe catalog, then the API and the workers."""
        self.temporal.start()
        self.emulator.start()
        self.wait_temporal()
        wait_until(
            lambda: http_ok(f"{self.emulator_url}/_emulator/health", timeout=2),
            "the Stripe emulator",
            timeout=60,
        )
        self.values = self._stripe_setup()
        self.values.update(
            {
                "DATABASE_URL": self.database.url,
                "TEMPORAL_ADDRESS": self.temporal_address,
                "TEMPORAL_NAMESPACE": "default",
                "TEMPORAL_TASK_QUEUE": TASK_QUEUE,
                "AUTH_JWT_SECRET": secrets.token_urlsafe(24),
            }
        )
        for service in (self.api, *self.workers):
            service.env.update(self.values)
        for worker in self.workers:
            worker.start()
        self.start_api()

    def stop(self) -> None:
        with self.lock:
            for service in reversed(self.services):
                service.stop()

    def _stripe_setup(self) -> dict[str, str]:
        client = self.stripe()
        catalog = ensure_catalog(client, "additional_users", "additional_requests")
        endpoint = ensure_webhook_endpoint(client, f"{self.api_url}/api/webhooks/stripe")
        self.clock_start = int(time.time())
        clock = client.v1.test_helpers.test_clocks.create(
            {"frozen_time": self.clock_start, "name": "chaos month"}
        )
        self.clock_id = clock.id
        return {
            "STRIPE_API_BASE": self.emulator_url,
            "STRIPE_SECRET_KEY": self.api_key,
            "STRIPE_WEBHOOK_SECRET": endpoint.secret,
            "STRIPE_PRICE_ID": catalog.base_price_id,
            "STRIPE_USERS_PRICE_ID": catalog.users_price_id,
            "STRIPE_REQUESTS_PRICE_ID": catalog.requests_price_id,
            "STRIPE_TEST_CLOCK": clock.id,
            # The run's environment; the scenario plants another one's look-alikes.
            "BILLING_SOURCE": "chaos",
        }

    # -- pieces the fault injector restarts --------------------------------------------

    def wait_temporal(self, timeout: float = 60) -> None:
        """The dev server accepts connections again (after a start or an outage)."""
        wait_until(lambda: tcp_open(self.temporal_port), "the Temporal dev server", timeout=timeout)

    def start_api(self, timeout: float = 60) -> None:
        """Start the API and wait until it answers."""
        with self.lock:
            self.api.start()
        wait_until(
            lambda: http_ok(f"{self.api_url}/healthz", timeout=2), "the API", timeout=timeout
        )

    def api_metrics(self) -> str | None:
        """The API's Prometheus text, or None while it is down."""
        try:
            response = httpx.get(f"{self.api_url}/metrics", timeout=5)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    def ensure_running(self) -> None:
        """Bring back anything that is down (the end of the fault phase, or a crash)."""
        with self.lock:
            if not self.temporal.alive():
                self.temporal.start()
            for worker in self.workers:
                if not worker.alive():
                    worker.start()
        self.wait_temporal()
        if not self.api.alive():
            self.start_api()
