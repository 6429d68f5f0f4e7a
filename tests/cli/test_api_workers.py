"""`billing api --workers 2`: a real process whose two workers both answer, configured alike.

The workers are separate processes started by uvicorn: they get the settings
the command resolved, the JSON logging and the header deadline through their
environment and uvicorn's configuration, not through anything in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.config import Settings
from stripe_emulator.server import EmulatorServer
from tests.api.support import STRIPE_KEY, WEBHOOK_SECRET, free_port
from tests.factories.orgs import make_org
from tests.factories.stripe_events import (
    event_body,
    sign_stripe_payload,
    stripe_event,
    subscription_object,
)

HOST = "127.0.0.1"
HEADER_TIMEOUT = 1.0


@pytest.fixture
def two_workers(
    tmp_path: Path,
    database_url: str,
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    task_queue: str,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        {
            "BILLING_HOME": str(tmp_path / "home"),
            "DATABASE_URL": database_url,
            "TEMPORAL_ADDRESS": temporal_dev_env.client.service_client.config.target_host,
            "TEMPORAL_TASK_QUEUE": task_queue,
            "STRIPE_SECRET_KEY": STRIPE_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_API_BASE": emulator.url,
            "API_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        }
    )
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tooling.cli", "api", "--port", str(port), "--workers", "2"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            _wait_ready(process, port, log_path)
            yield process, port, log_path
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"not ready in time:\n{log_path.read_text()}")


def _workers(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The worker processes (multiprocessing also starts a resource tracker)."""
    return [
        child
        for child in psutil.Process(process.pid).children()
        if "spawn_main" in " ".join(child.cmdline())
    ]


def _worker_serving(process: subprocess.Popen[bytes], port: int) -> int:
    """Open a connection, get an answer on it, and say which worker process holds it."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        mine = sock.getsockname()[1]
        for child in _workers(process):
            for conn in child.net_connections(kind="tcp"):
                if conn.laddr.port == port and conn.raddr and conn.raddr.port == mine:
                    return int(child.pid)
    raise AssertionError("no worker holds the connection")


def test_two_workers_both_answer_with_the_same_settings(
    two_workers: tuple[subprocess.Popen[bytes], int, Path],
    session_factory: sessionmaker[Session],
) -> None:
    process, port, log_path = two_workers
    workers = {child.pid for child in _workers(process)}
    assert len(workers) == 2

    serving: set[int] = set()
    for _ in range(200):
        serving.add(_worker_serving(process, port))
        if serving == workers:
            break
    assert serving == workers

    # Each worker has the webhook secret, the database and Temporal: events are signalled.
    org = make_org(session_factory)
    for _ in range(6):
        body = event_body(
            stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))
        )
        response = httpx.post(
            f"http://{HOST}:{port}/api/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": sign_stripe_payload(body, WEBHOOK_SECRET)},
            timeout=10,
        )
        assert (response.status_code, response.json()["outcome"]) == (200, "signalled")

    # Whichever worker answers /metrics counts the events of both.
    for _ in range(4):
        page = httpx.get(f"http://{HOST}:{port}/metrics", timeout=5).text
        signalled = [
            line
            for line in page.splitlines()
            if line.startswith("billing_webhook_events_total{")
            and 'outcome="signalled"' in line
            and 'type="customer.subscription.updated"' in line
        ]
        assert [float(line.rsplit(" ", 1)[1]) for line in signalled] == [6.0]

    # The header deadline of the environment holds in the workers.
    with socket.create_connection((HOST, port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(4096) == b""  # closed without an answer
        assert time.monotonic() - started < HEADER_TIMEOUT + 2

    # Both workers log JSON lines.
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    connected = [r for r in records if r["message"] == "Connected to Temporal"]
    assert len(connected) >= 2

    # Ctrl-C (or a container's SIGTERM) stops the workers and then the parent, cleanly.
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(20) == 0
    assert "Traceback" not in log_path.read_text()
