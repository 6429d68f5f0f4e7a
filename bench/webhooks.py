"""Webhook ingest: signed events through `billing api` against raw signal-with-start.

One run, one Temporal dev server, N orgs provisioned through the real workflows:

(c) with the worker running on an idle stack: a real change made in Stripe (the
    emulator, over HTTP, with the stripe SDK: a new `cancel_at`) until the org
    row, read from the database, shows it (`subscription_end`). The path is the
    emulator's webhook → `billing api` → signal → workflow → Stripe re-read →
    DB activity.
(a) worker stopped: E signed `customer.subscription.updated` events at
    concurrency C over HTTP against a real `billing api` process (uvicorn, as
    the CLI runs it); each is answered only once Temporal accepted its signal.
(b) E `client.start_workflow(..., start_signal="stripe_event")` calls from a
    Python client, same concurrency, same server, same workflows.

Then checks that every acknowledged event is in its workflow's history and in
the `stripe_events` log. (c) runs first so that its stack is idle: (a) and (b)
leave thousands of signals waiting for a worker.

    .venv/bin/python bench/webhooks.py [--orgs 20] [--events 1500] [--concurrency 64]
        [--changes 30] [--rounds 1] [--api-workers 1] [--profile api.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg
from _stack import (
    Stack,
    console,
    machine,
    open_stack,
    provisioned_count,
    quiet_logging,
    report_table,
    running_workers,
    start_backfill,
    verdict,
    wait_with_progress,
)
from provisioning import create_orgs
from pydantic import SecretStr
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from billing.config import Settings
from billing.constants import ORG_BILLING_WORKFLOW, STRIPE_EVENT_SIGNAL, org_workflow_id
from billing.db.models import Org, StripeEventLog
from billing.domain import OrgBillingInput, StripeEventSignal
from billing.encryption import ENCODING, KEYS_VARIABLE, new_key_entry
from billing.orchestration import tuning_of
from billing.search_attributes import ORG_ID_KEY
from billing.stripe_gateway import make_stripe_client
from billing.temporal_client import connect_client
from stripe_emulator.webhooks import sign
from tooling.catalog import ensure_webhook_endpoint
from tooling.supervise import free_port

UPDATED = "customer.subscription.updated"
HOST = "127.0.0.1"
WEBHOOK_PATH = "/api/webhooks/stripe"
TARGET_RATIO = 0.75
TARGET_ACK_P99 = 0.5
TARGET_ROW_P99 = 1.0
REQUEST_TIMEOUT = 30.0  # one request or start call; a stuck one counts as an error
CHANGE_TIMEOUT = 30.0  # one Stripe change until the row shows it
ROW_POLL_SECONDS = 0.005
IDLE_BETWEEN_CHANGES = 0.25
API_START_TIMEOUT = 60.0
LOG_ROWS_TIMEOUT = 30.0


@dataclass(frozen=True)
class BenchOrg:
    id: int
    customer_id: str
    subscription_id: str
    subscription: dict[str, Any]


@dataclass
class Load:
    """What one phase of E calls gave: latencies of the accepted ones, and the rest."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


# The API process ------------------------------------------------------------------


def api_environment(settings: Settings, webhook_secret: str, home: Path) -> dict[str, str]:
    """The environment `billing api` reads; the caller's billing variables never leak in."""
    inherited = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    values = {
        "DATABASE_URL": settings.database_url,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TEMPORAL_NAMESPACE": settings.temporal_namespace,
        "TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "STRIPE_SECRET_KEY": settings.stripe_secret_key,
        "STRIPE_WEBHOOK_SECRET": webhook_secret,
        "STRIPE_API_BASE": settings.stripe_api_base or "",
        "STRIPE_PRICE_ID": settings.stripe_price_id,
        "STRIPE_USERS_PRICE_ID": settings.stripe_users_price_id,
        "STRIPE_REQUESTS_PRICE_ID": settings.stripe_requests_price_id,
        "AUTH_JWT_SECRET": settings.auth_jwt_secret,
        "BILLING_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
    }
    return {**inherited, **values}


@contextlib.contextmanager
def api_process(
    settings: Settings,
    webhook_secret: str,
    port: int,
    workers: int,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`billing api` in its own process group, ready (GET /readyz is 200) or an error."""
    argv = [sys.executable, "-m", "tooling.cli", "api", "--host", HOST, "--port", str(port)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    log_path = workdir / f"api-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **api_environment(settings, webhook_secret, workdir / "home"),
                **(extra_env or {}),
            },
            cwd=workdir,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + API_START_TIMEOUT
            while not _ready(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"`billing api` did not become ready:\n{tail}")
                time.sleep(0.2)
            yield process
        finally:
            _stop(process)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)


@contextlib.contextmanager
def profiled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy records the API process (and its workers) while the block runs."""
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(output.suffix, "raw")
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "100"]
    # --gil: only the thread holding the GIL, i.e. where the process spends its CPU.
    argv += ["--format", fmt, "--output", str(output), "--gil"]
    recorder = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attached before the load starts
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, err = recorder.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            err = b""
        if recorder.returncode not in (0, -signal.SIGINT) and not output.exists():
            console.print(f"[yellow]py-spy failed: {err.decode(errors='replace')[-500:]}")


def profile_summary(path: Path, limit: int = 15) -> Table | None:
    """Own and total time per function from py-spy's raw (collapsed stack) output."""
    if path.suffix in (".svg", ".json") or not path.exists():
        return None
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " " + _where(f) for f in stack.split(";")[1:]]
        samples += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return None
    table = Table(title=f"API profile: {samples} samples (py-spy)", title_justify="left")
    table.add_column("own", justify="right")
    table.add_column("total", justify="right")
    table.add_column("function")
    for frame, n in own.most_common(limit):
        table.add_row(f"{n / samples:.1%}", f"{total[frame] / samples:.1%}", frame)
    return table


def _where(frame: str) -> str:
    inside = frame.partition(" (")[2].rstrip(")")
    return f"({inside.split('site-packages/')[-1]})" if inside else ""


class CpuMeter:
    """CPU seconds used by the API process(es), the Temporal server, Postgres and this process.

    Postgres is the server's backends connected to the run's database (their
    process titles name it). Summed per process between two snapshots, so
    processes that come and go in between are counted for what they used.
    """

    GROUPS = ("API", "Temporal", "Postgres", "bench")

    def __init__(self, api_pid: int, database: str) -> None:
        self.api_pid = api_pid
        self.database = database

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        me = psutil.Process()
        found = [("bench", me)]
        with contextlib.suppress(psutil.Error):
            api = psutil.Process(self.api_pid)
            found += [("API", p) for p in (api, *api.children(recursive=True))]
        api_pids = {p.pid for _, p in found}
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid not in api_pids and "temporal" in child.name().lower():
                    found.append(("Temporal", child))
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(process.info.get("cmdline") or [])
            if cmdline.startswith("postgres:") and f" {self.database} " in cmdline:
                found.append(("Postgres", process))
        return found

    def snapshot(self) -> dict[int, tuple[str, float]]:
        used: dict[int, tuple[str, float]] = {}
        for group, process in self._processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                used[process.pid] = (group, times.user + times.system)
        return used

    def between(
        self, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
    ) -> dict[str, float]:
        totals = dict.fromkeys(self.GROUPS, 0.0)
        for pid, (group, seconds) in after.items():
            totals[group] += seconds - before.get(pid, (group, 0.0))[1]
        return totals


# (a) signed events over HTTP ---------------------------------------------------------


def event_bodies(orgs: Sequence[BenchOrg], n: int, prefix: str) -> list[bytes]:
    """`customer.subscription.updated` as Stripe sends it: the org's whole subscription."""
    now = int(time.time())
    bodies = []
    for i in range(n):
        org = orgs[i % len(orgs)]
        event = {
            "id": f"{prefix}{i:06d}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": now,
            "data": {"object": org.subscription, "previous_attributes": {"metadata": {}}},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": UPDATED,
        }
        bodies.append(json.dumps(event, indent=2).encode())
    return bodies


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status and whether the server closes the connection (Content-Length bodies only)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before an answer")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value == "close":
            close = True
        elif name == "transfer-encoding":
            raise ValueError("chunked answers are not expected from this route")
    await reader.readexactly(length)
    return status, close


async def post_events(port: int, bodies: Sequence[bytes], secret: str, concurrency: int) -> Load:
    """Deliver every body, signed, on `concurrency` kept-alive connections.

    A deliberately small HTTP/1.1 client: the load generator shares the
    machine's cores with the API and Temporal, so it should cost little.
    """
    load = Load()
    pending = iter(bodies)

    async def connection() -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        for body in pending:
            head = (
                f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Content-Type: application/json\r\n"
                f"Stripe-Signature: {sign(body.decode(), secret)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            close = True
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(head + body)
                status, close = await asyncio.wait_for(_read_answer(reader), REQUEST_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as err:
                load.refused[type(err).__name__] += 1
            else:
                if 200 <= status < 300:
                    load.latencies.append(time.perf_counter() - started)
                else:
                    load.refused[f"HTTP {status}"] += 1
            if close and writer is not None:
                writer.close()
                writer, reader = None, None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - started
    return load


# (b) raw signal-with-start ----------------------------------------------------------


def event_signals(
    orgs: Sequence[BenchOrg], n: int, prefix: str
) -> list[tuple[int, StripeEventSignal]]:
    """What the API would signal for the same events (`api.webhook_events.signal_of`)."""
    now = int(time.time())
    return [
        (
            org.id,
            StripeEventSignal(
                event_id=f"{prefix}{i:06d}",
                type=UPDATED,
                created=now,
                object_id=org.subscription_id,
                customer_id=org.customer_id,
                subscription_id=org.subscription_id,
            ),
        )
        for i, org in ((i, orgs[i % len(orgs)]) for i in range(n))
    ]


async def start_signals(
    client: Client,
    settings: Settings,
    signals: Sequence[tuple[int, StripeEventSignal]],
    concurrency: int,
) -> Load:
    """The API's own call (`billing.orchestration.start_org_workflow`), written out."""
    load = Load()
    pending = iter(signals)
    tuning = tuning_of(settings)

    async def lane() -> None:
        for org_id, event in pending:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(
                    client.start_workflow(
                        ORG_BILLING_WORKFLOW,
                        OrgBillingInput(org_id=org_id, tuning=tuning),
                        id=org_workflow_id(org_id),
                        task_queue=settings.temporal_task_queue,
                        start_signal=STRIPE_EVENT_SIGNAL,
                        start_signal_args=[event],
                        search_attributes=TypedSearchAttributes(
                            [SearchAttributePair(ORG_ID_KEY, str(org_id))]
                        ),
                    ),
                    REQUEST_TIMEOUT,
                )
            except (RPCError, RuntimeError, TimeoutError) as err:
                load.refused[type(err).__name__] += 1
            else:
                load.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - started
    return load


# (c) a change in Stripe until the org row shows it ----------------------------------


async def row_latencies(stack: Stack, orgs: Sequence[BenchOrg], changes: int) -> list[float]:
    """Seconds from a Stripe update call to the org row showing it; `inf` = never (timeout)."""
    stripe_client = make_stripe_client(
        stack.settings.stripe_secret_key, api_base=stack.emulator.url, blocking=True
    )
    dsn = make_url(stack.settings.database_url).set(drivername="postgresql")
    latencies: list[float] = []
    base = int(time.time()) + 10 * 86_400  # inside the 30-day trial: cancel_at wins
    async with await psycopg.AsyncConnection.connect(
        dsn.render_as_string(hide_password=False), autocommit=True
    ) as conn:
        for i in range(changes):
            org = orgs[i % len(orgs)]
            cancel_at = base + i * 3600
            expected = datetime.fromtimestamp(cancel_at, UTC)
            started = time.perf_counter()
            await asyncio.to_thread(
                stripe_client.v1.subscriptions.update,
                org.subscription_id,
                {"cancel_at": cancel_at},
            )
            while True:
                cursor = await conn.execute(
                    "SELECT subscription_end FROM orgs WHERE id = %s", (org.id,)
                )
                row = await cursor.fetchone()
                if row is not None and row[0] == expected:
                    latencies.append(time.perf_counter() - started)
                    break
                if time.perf_counter() - started > CHANGE_TIMEOUT:
                    latencies.append(math.inf)
                    break
                await asyncio.sleep(ROW_POLL_SECONDS)
            await asyncio.sleep(IDLE_BETWEEN_CHANGES)
    return latencies


# Checks -----------------------------------------------------------------------------


async def signals_in_histories(client: Client, orgs: Sequence[BenchOrg]) -> Counter[str]:
    """`stripe_event` signals per event-id prefix (`…api_`, `…raw_`), from every history."""
    found: Counter[str] = Counter()
    for org in orgs:
        handle = client.get_workflow_handle(org_workflow_id(org.id))
        async for event in handle.fetch_history_events():
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                continue
            attrs = event.workflow_execution_signaled_event_attributes
            if attrs.signal_name != STRIPE_EVENT_SIGNAL:
                continue
            if any(p.metadata.get("encoding") == ENCODING for p in attrs.input.payloads):
                continue  # counted by `encrypted_signals`
            [decoded] = await client.data_converter.decode(
                attrs.input.payloads, [StripeEventSignal]
            )
            found[decoded.event_id.rsplit("_", 1)[0] + "_"] += 1
    return found


async def encrypted_signals(
    client: Client, orgs: Sequence[BenchOrg], prefix: str
) -> tuple[int, int]:
    """Signals whose event id starts with `prefix` (read with the key), and how many of
    them the history holds encrypted (as a reader without the key sees them)."""
    found = sealed = 0
    for org in orgs:
        handle = client.get_workflow_handle(org_workflow_id(org.id))
        async for event in handle.fetch_history_events():
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                continue
            attrs = event.workflow_execution_signaled_event_attributes
            if attrs.signal_name != STRIPE_EVENT_SIGNAL:
                continue
            [decoded] = await client.data_converter.decode(
                attrs.input.payloads, [StripeEventSignal]
            )
            if decoded.event_id.startswith(prefix):
                found += 1
                sealed += all(p.metadata.get("encoding") == ENCODING for p in attrs.input.payloads)
    return found, sealed


def logged_signalled(stack: Stack, prefix: str) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(StripeEventLog)
                .where(StripeEventLog.id.startswith(prefix), StripeEventLog.outcome == "signalled")
            )
            or 0
        )


async def wait_for_log_rows(stack: Stack, prefix: str, expected: int) -> int:
    """The log may be written just after the answer: wait (bounded) for every row."""
    deadline = time.monotonic() + LOG_ROWS_TIMEOUT
    while True:
        count = await asyncio.to_thread(logged_signalled, stack, prefix)
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


# The run ----------------------------------------------------------------------------


def bench_orgs(stack: Stack) -> list[BenchOrg]:
    with stack.sessions() as session:
        rows = session.execute(
            select(Org.id, Org.stripe_customer_id, Org.stripe_subscription_id).order_by(Org.id)
        ).all()
    with stack.emulator.state.lock:
        subscriptions = stack.emulator.state.collection("subscription")
        return [
            BenchOrg(
                id=org_id,
                customer_id=str(customer),
                subscription_id=str(sub),
                subscription=copy.deepcopy(subscriptions[str(sub)]),
            )
            for org_id, customer, sub in rows
        ]


def combined(loads: Sequence[Load]) -> Load:
    """Several rounds of one path as one: their calls and their wall time added up."""
    total = Load()
    for load in loads:
        total.seconds += load.seconds
        total.latencies += load.latencies
        total.refused.update(load.refused)
        for group, seconds in load.cpu.items():
            total.cpu[group] = total.cpu.get(group, 0.0) + seconds
    return total


@dataclass
class Results:
    rounds: list[tuple[Load, Load]]  # (API, raw) per round
    rows: list[float]
    in_histories: tuple[int, int]  # (API, raw) signals found
    log_rows: int
    load: str
    # With --encrypted: the same load through an API that encrypts its signals.
    encrypted: list[tuple[Load, Load]] = field(default_factory=list)  # (plain, encrypting)
    in_histories_encrypted: int = 0
    sealed: int = 0  # of those signals, how many a history holds encrypted

    @property
    def api(self) -> Load:
        return combined([api for api, _ in self.rounds])

    @property
    def raw(self) -> Load:
        return combined([raw for _, raw in self.rounds])


async def measure(args: argparse.Namespace, stack: Stack, workdir: Path, run_id: str) -> Results:
    """Provision, then (c) with the worker, then (a) and (b) without it."""
    await asyncio.to_thread(create_orgs, stack, args.orgs)
    with contextlib.ExitStack() as processes:
        async with running_workers(stack, stack.settings.stripe_requests_per_second):
            await start_backfill(stack)
            await wait_with_progress(
                "Provisioning", args.orgs, lambda: provisioned_count(stack.sessions), timeout=300
            )
            orgs = bench_orgs(stack)
            port = free_port()
            setup_stripe = make_stripe_client(
                stack.settings.stripe_secret_key, api_base=stack.emulator.url, blocking=True
            )
            secret = ensure_webhook_endpoint(
                setup_stripe, f"http://{HOST}:{port}{WEBHOOK_PATH}"
            ).secret
            api = processes.enter_context(
                api_process(stack.settings, secret, port, args.api_workers, workdir)
            )
            console.print(
                f"`billing api` ready on port {port} ({args.api_workers} process(es)). "
                f"(c) {args.changes} changes in Stripe, worker running, idle stack…"
            )
            rows = await row_latencies(stack, orgs, args.changes)
        load = machine()
        console.print(
            f"Worker stopped. {args.rounds} round(s) of (a) {args.events} signed events over "
            f"HTTP and (b) {args.events} raw signal-with-start calls, concurrency "
            f"{args.concurrency} ({load})…"
        )
        meter = CpuMeter(api.pid, make_url(stack.settings.database_url).database or "")
        rounds: list[tuple[Load, Load]] = []
        for r in range(args.rounds):
            bodies = event_bodies(orgs, args.events, f"evt_{run_id}_api{r}_")
            signals = event_signals(orgs, args.events, f"evt_{run_id}_raw{r}_")

            async def through_api(bodies: list[bytes] = bodies) -> Load:
                return await post_events(port, bodies, secret, args.concurrency)

            async def raw(signals: list[tuple[int, StripeEventSignal]] = signals) -> Load:
                return await start_signals(stack.client, stack.settings, signals, args.concurrency)

            # Alternate which path goes first, so neither always meets the longer histories.
            first_api = r % 2 == 0
            with profiled(api.pid, args.profile if r == 0 else None):
                api_load = await timed(meter, through_api) if first_api else None
            raw_load = await timed(meter, raw)
            if api_load is None:
                api_load = await timed(meter, through_api)
            rounds.append((api_load, raw_load))
            console.print(
                f"round {r + 1}: API {api_load.rate:.0f}/s, raw {raw_load.rate:.0f}/s ({machine()})"
            )
        encrypted: list[tuple[Load, Load]] = []
        if args.encrypted:
            keys = new_key_entry("bench")
            enc_port = free_port()
            enc_api = processes.enter_context(
                api_process(
                    stack.settings,
                    secret,
                    enc_port,
                    args.api_workers,
                    workdir,
                    extra_env={KEYS_VARIABLE: keys},
                )
            )
            enc_meter = CpuMeter(enc_api.pid, make_url(stack.settings.database_url).database or "")
            for r in range(args.rounds):
                bodies = event_bodies(orgs, args.events, f"evt_{run_id}_enc{r}_")

                async def sealed_api(bodies: list[bytes] = bodies) -> Load:
                    return await post_events(enc_port, bodies, secret, args.concurrency)

                # Plain again right before, so the pair meets the same histories.
                plain_bodies = event_bodies(orgs, args.events, f"evt_{run_id}_api{r}b_")

                async def plain_api(bodies: list[bytes] = plain_bodies) -> Load:
                    return await post_events(port, bodies, secret, args.concurrency)

                plain_load = await timed(meter, plain_api)
                enc_load = await timed(enc_meter, sealed_api)
                encrypted.append((plain_load, enc_load))
                console.print(
                    f"encrypted round {r + 1}: API {plain_load.rate:.0f}/s, "
                    f"API encrypting {enc_load.rate:.0f}/s ({machine()})"
                )
            reader = await connect_client(
                stack.settings.model_copy(update={"billing_encryption_keys": SecretStr(keys)})
            )
            found_enc, sealed = await encrypted_signals(reader, orgs, f"evt_{run_id}_enc")
        else:
            found_enc, sealed = 0, 0
        found = await signals_in_histories(stack.client, orgs)
        in_histories = (
            sum(n for prefix, n in found.items() if prefix.startswith(f"evt_{run_id}_api")),
            sum(n for prefix, n in found.items() if prefix.startswith(f"evt_{run_id}_raw")),
        )
        accepted = sum(api_load.accepted for api_load, _ in rounds) + sum(
            plain.accepted for plain, _ in encrypted
        )
        log_rows = await wait_for_log_rows(stack, f"evt_{run_id}_api", accepted)
    return Results(
        rounds=rounds,
        rows=rows,
        in_histories=in_histories,
        log_rows=log_rows,
        load=f"{load} → {machine()}",
        encrypted=encrypted,
        in_histories_encrypted=found_enc,
        sealed=sealed,
    )


async def timed(meter: CpuMeter, phase: Callable[[], Awaitable[Load]]) -> Load:
    before = meter.snapshot()
    load = await phase()
    load.cpu = meter.between(before, meter.snapshot())
    return load


def load_row(name: str, load: Load) -> list[str]:
    return [
        name,
        str(load.accepted),
        f"{load.seconds:.1f} s",
        f"{load.rate:.1f}",
        ms(percentile(load.latencies, 0.5)),
        ms(percentile(load.latencies, 0.99)),
        ms(max(load.latencies, default=math.nan)),
        ", ".join(f"{k}: {v}" for k, v in load.refused.items()) or "0",
        " / ".join(f"{load.cpu.get(k, 0.0) / load.seconds:.2f}" for k in CpuMeter.GROUPS),
        " / ".join(
            f"{load.cpu.get(k, 0.0) / max(load.accepted, 1) * 1000:.2f}"
            for k in ("API", "Temporal", "bench")
        ),
    ]


def report(args: argparse.Namespace, results: Results) -> bool:
    """Print the figures; True when every target is met and every check holds."""
    api, raw = results.api, results.raw
    table = Table(
        title=f"Webhook ingest: {args.events} events per path and round, concurrency "
        f"{args.concurrency}, {args.orgs} orgs, {args.api_workers} API process(es) "
        f"({results.load})",
        title_justify="left",
    )
    columns = ("path", "accepted", "wall", "events/s", "ack p50", "ack p99", "max", "refused")
    cores = "CPU cores: " + " / ".join(CpuMeter.GROUPS)
    for column in (*columns, cores, "CPU ms/event: API / Temporal / bench"):
        table.add_column(column, justify="left" if column == "path" else "right")
    several = len(results.rounds) > 1
    for r, (api_load, raw_load) in enumerate(results.rounds):
        suffix = f" (round {r + 1})" if several else ""
        table.add_row(*load_row("API over HTTP" + suffix, api_load))
        table.add_row(*load_row("raw start" + suffix, raw_load))
    for r, (plain_load, enc_load) in enumerate(results.encrypted):
        suffix = f" (round {r + 1})" if several else ""
        table.add_row(*load_row("API over HTTP, again" + suffix, plain_load))
        table.add_row(*load_row("API encrypting" + suffix, enc_load))
    if several:
        table.add_row(*load_row("API over HTTP (all)", api))
        table.add_row(*load_row("raw start (all)", raw))
    console.print(table)

    ratio = api.rate / raw.rate if raw.rate else 0.0
    ratios = sorted(a.rate / b.rate for a, b in results.rounds if b.rate)
    api_p99 = percentile(api.latencies, 0.99)
    finished = [x for x in results.rows if math.isfinite(x)]
    row_p99 = percentile(results.rows, 0.99)
    in_api, in_raw = results.in_histories
    # Every plain API event of the run (the back-to-back ones of --encrypted too).
    api_all = combined([a for a, _ in results.rounds] + [p for p, _ in results.encrypted])
    spread = f"rounds {ratios[0]:.2f} to {ratios[-1]:.2f}; " if several and ratios else ""
    checks = [
        (
            "API rate / raw rate",
            f"{ratio:.2f}",
            f"{spread}target ≥ {TARGET_RATIO} " + verdict(ratio >= TARGET_RATIO),
        ),
        (
            "API ack p99",
            ms(api_p99),
            f"target < {ms(TARGET_ACK_P99)} " + verdict(api_p99 < TARGET_ACK_P99),
        ),
        (
            "row shows a Stripe change p50",
            ms(percentile(results.rows, 0.5)),
            f"{len(finished)} of {len(results.rows)} changes seen in time (worker running)",
        ),
        (
            "row shows a Stripe change p99",
            ms(row_p99),
            f"max {ms(max(results.rows, default=math.nan))}; target < {ms(TARGET_ROW_P99)} "
            + verdict(row_p99 < TARGET_ROW_P99),
        ),
        (
            "acknowledged events in histories (API)",
            f"{in_api} / {api_all.accepted}",
            verdict(in_api == api_all.accepted),
        ),
        (
            "acknowledged starts in histories (raw)",
            f"{in_raw} / {raw.accepted}",
            verdict(in_raw == raw.accepted),
        ),
        (
            "acknowledged events in stripe_events",
            f"{results.log_rows} / {api_all.accepted}",
            verdict(results.log_rows == api_all.accepted),
        ),
        (
            "refused or failed",
            f"{sum(api.refused.values())} + {sum(raw.refused.values())}",
            "API + raw; " + verdict(not api.refused and not raw.refused),
        ),
    ]
    encrypted_ok = True
    if results.encrypted:
        plain = combined([p for p, _ in results.encrypted])
        enc = combined([e for _, e in results.encrypted])
        enc_ratio = enc.rate / plain.rate if plain.rate else 0.0
        checks += [
            (
                "encrypting API rate / plain API rate",
                f"{enc_ratio:.2f}",
                f"ack p99 {ms(percentile(enc.latencies, 0.99))} vs "
                f"{ms(percentile(plain.latencies, 0.99))} (measured back to back)",
            ),
            (
                "acknowledged encrypted events in histories",
                f"{results.in_histories_encrypted} / {enc.accepted}, "
                f"{results.sealed} held encrypted",
                verdict(results.in_histories_encrypted == results.sealed == enc.accepted),
            ),
        ]
        encrypted_ok = (
            results.in_histories_encrypted == results.sealed == enc.accepted and not enc.refused
        )
    console.print(report_table("Targets and checks", checks))
    return all(
        (
            ratio >= TARGET_RATIO,
            api_p99 < TARGET_ACK_P99,
            row_p99 < TARGET_ROW_P99,
            in_api == api_all.accepted,
            in_raw == raw.accepted,
            results.log_rows == api_all.accepted,
            not api.refused,
            not raw.refused,
            encrypted_ok,
        )
    )


async def run(args: argparse.Namespace) -> int:
    quiet_logging()
    run_id = uuid.uuid4().hex[:6]
    async with open_stack() as stack:
        console.print(
            f"Stack up in {stack.setup_seconds:.1f} s (Postgres: {stack.postgres}). "
            f"Provisioning {args.orgs} orgs…"
        )
        with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
            results = await measure(args, stack, Path(tmp), run_id)
    ok = report(args, results)
    if args.profile is not None:
        summary = profile_summary(args.profile)
        if summary is not None:
            console.print(summary)
        console.print(f"Profile of the API during (a): {args.profile}")
    return 0 if ok else 1


def positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orgs", type=positive, default=20, help="provisioned orgs (20)")
    parser.add_argument("--events", type=positive, default=1500, help="events per path (1500)")
    parser.add_argument("--concurrency", type=positive, default=64, help="in flight (64)")
    parser.add_argument(
        "--changes", type=positive, default=30, help="Stripe changes timed to the row (30)"
    )
    parser.add_argument(
        "--rounds",
        type=positive,
        default=1,
        help="repeat (a) and (b), alternating which goes first (1); for a noisy machine",
    )
    parser.add_argument(
        "--api-workers", type=positive, default=1, help="`billing api --workers N` (1)"
    )
    parser.add_argument(
        "--encrypted",
        action="store_true",
        help="also send the load through a second API process that encrypts its signals "
        "(BILLING_ENCRYPTION_KEYS), back to back with the plain one",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the API with py-spy during (a): .svg flame graph, .json speedscope, "
        "anything else raw stacks (summarized)",
    )
    args = parser.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
