"""The worker as production runs it: N separate `python worker.py` processes.

Each process gets its settings through the environment (the stack's, plus the
benchmark's request budget, metrics port and cache size), writes its JSON log
to a file, and serves its own Prometheus endpoint (`WORKER_METRICS_PORT`),
which the benchmarks read before and after the measured phase and sum over
the processes. They share one Stripe request budget through the database,
exactly as deployed workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil  # type: ignore[import-untyped]
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from billing.config import Settings
from billing.constants import stripe_task_queue

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The backfill schedule the worker creates on start: far enough out never to fire
# during a benchmark, which starts the backfill itself.
NO_SCHEDULED_BACKFILL = 7 * 86400

Sample = tuple[str, frozenset[tuple[str, str]]]


def worker_env(
    settings: Settings, *, requests_per_second: float, metrics_port: int, cached: int | None
) -> dict[str, str]:
    """The process environment: ours, with the stack's settings on top."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.database_url,
            "TEMPORAL_ADDRESS": settings.temporal_address,
            "TEMPORAL_NAMESPACE": settings.temporal_namespace,
            "TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
            "STRIPE_SECRET_KEY": settings.stripe_secret_key,
            "STRIPE_WEBHOOK_SECRET": settings.stripe_webhook_secret,
            "STRIPE_API_BASE": settings.stripe_api_base or "",
            "STRIPE_PRICE_ID": settings.stripe_price_id,
            "STRIPE_USERS_PRICE_ID": settings.stripe_users_price_id,
            "STRIPE_REQUESTS_PRICE_ID": settings.stripe_requests_price_id,
            "AUTH_JWT_SECRET": settings.auth_jwt_secret,
            "BILLING_SOURCE": settings.billing_source,
            "STRIPE_REQUESTS_PER_SECOND": f"{requests_per_second:g}",
            "WORKER_METRICS_PORT": str(metrics_port),
            "WORKER_METRICS_HOST": "127.0.0.1",
            "BACKFILL_INTERVAL_SECONDS": str(NO_SCHEDULED_BACKFILL),
        }
    )
    env.pop("STRIPE_ACTIVITIES_PER_SECOND", None)
    # Payload encryption as the settings say (never inherited from the caller).
    if settings.billing_encryption_keys is not None:
        env["BILLING_ENCRYPTION_KEYS"] = settings.billing_encryption_keys.get_secret_value()
    else:
        env.pop("BILLING_ENCRYPTION_KEYS", None)
    if cached is not None:
        env["WORKER_MAX_CACHED_WORKFLOWS"] = str(cached)
    return env


@dataclass
class WorkerProcess:
    index: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    _log: IO[bytes] = field(repr=False)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        try:
            return int(psutil.Process(self.process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            return 0


@dataclass
class WorkerProcesses:
    """The running worker processes of one phase."""

    processes: list[WorkerProcess]
    requests_per_second: float
    peak_rss: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.processes)

    def snapshot(self) -> dict[Sample, float]:
        """Every process's metrics, summed by (name, labels)."""
        samples: dict[Sample, float] = {}
        for worker in self.processes:
            for line in httpx.get(worker.metrics_url, timeout=10).text.splitlines():
                parsed = _parse(line)
                if parsed is not None and not parsed[0][0].endswith("_bucket"):
                    samples[parsed[0]] = samples.get(parsed[0], 0.0) + parsed[1]
        return samples

    def rss(self) -> list[int]:
        return [w.rss_bytes() for w in self.processes]

    def cpu_seconds(self) -> float:
        """User + system CPU time the processes used so far (children included)."""
        total = 0.0
        for worker in self.processes:
            try:
                times = psutil.Process(worker.process.pid).cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def sample_rss(self) -> list[int]:
        """Current RSS of each process, keeping the peak seen so far."""
        now = self.rss()
        if not self.peak_rss:
            self.peak_rss = [0] * len(now)
        self.peak_rss = [max(a, b) for a, b in zip(self.peak_rss, now, strict=True)]
        return now

    def warnings(self) -> Counter[str]:
        """Warnings and errors the processes logged, by logger and message."""
        counts: Counter[str] = Counter()
        for worker in self.processes:
            for line in worker.log_path.read_text(errors="replace").splitlines():
                counts.update(_warning_of(line))
        return counts

    def died(self) -> list[str]:
        return [
            f"worker {w.index} exited with {w.process.returncode}; log: {w.log_path}"
            for w in self.processes
            if not w.alive()
        ]


def _parse(line: str) -> tuple[Sample, float] | None:
    if not line or line.startswith("#"):
        return None
    head, _, value = line.rpartition(" ")
    name, brace, labels = head.partition("{")
    pairs: list[tuple[str, str]] = []
    if brace:
        for part in labels.rstrip("}").split('",'):
            key, _, val = part.partition("=")
            if key:
                pairs.append((key.strip(","), val.strip('"')))
    try:
        return (name, frozenset(pairs)), float(value)
    except ValueError:
        return None


def _warning_of(line: str) -> list[str]:
    try:
        record = json.loads(line)
    except ValueError:
        # Temporal core writes its own lines; count its warnings too.
        if " WARN " in line or " ERROR " in line:
            return [f"temporal core: {line.split(' WARN ', 1)[-1][:100]}"]
        return []
    if not isinstance(record, dict) or record.get("level") not in ("WARNING", "ERROR"):
        return []
    message = str(record.get("message", ""))[:90]
    details = record.get("temporal_activity")
    kind = record.get("activity_type") or (
        details.get("activity_type") if isinstance(details, dict) else None
    )
    suffix = f" [{kind}]" if isinstance(kind, str) and kind else ""
    return [f"{record.get('logger')}: {message}{suffix}"]


async def _pollers(client: Client, queue: str, kind: TaskQueueType.ValueType) -> set[int]:
    """Process ids polling `queue` (identities are `pid@host`)."""
    answer = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=kind,
        )
    )
    pids: set[int] = set()
    for poller in answer.pollers:
        head = poller.identity.split("@", 1)[0]
        if head.isdigit():
            pids.add(int(head))
    return pids


async def _wait_until_polling(client: Client, settings: Settings, pids: set[int]) -> None:
    queues = [
        (settings.temporal_task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        (stripe_task_queue(settings.temporal_task_queue), TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    ]
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        found = [await _pollers(client, q, k) for q, k in queues]
        if all(pids <= f for f in found):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(pids)} not polling after {START_TIMEOUT:.0f} s")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def worker_processes(
    client: Client,
    settings: Settings,
    *,
    count: int,
    requests_per_second: float,
    metrics_ports: list[int],
    cached: int | None = None,
) -> AsyncIterator[WorkerProcesses]:
    """`count` worker processes sharing one request budget; stopped (SIGTERM) on exit."""
    if count < 1 or len(metrics_ports) < count:
        raise ValueError("one metrics port per worker process")
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    started: list[WorkerProcess] = []
    try:
        for i in range(count):
            log_path = workdir / f"worker-{i + 1}.log"
            log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is stopped
            env = worker_env(
                settings,
                requests_per_second=requests_per_second,
                metrics_port=metrics_ports[i],
                cached=cached,
            )
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "worker.py")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,  # no stray .env is read
                start_new_session=True,
            )
            started.append(WorkerProcess(i + 1, metrics_ports[i], log_path, process, log))
        group = WorkerProcesses(started, requests_per_second)
        await _wait_until_polling(client, settings, {w.process.pid for w in started})
        yield group
    finally:
        for worker in started:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in started:
            try:
                worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=10)
            worker._log.close()
