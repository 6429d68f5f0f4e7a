"""Usage items through the service API: `POST /api/orgs/{org_id}/usage`, batches of 500.

A real `billing api` process (uvicorn, as the CLI runs it) over a fresh,
migrated database; the console's side is an HTTP client sending batches of
usage items `{id, count, at}` at a given concurrency, each batch to one of a
few orgs. Measured: items per second while every item is new (`recorded`), and
again when the same batches are sent a second time (all `duplicate`, nothing
added). Checked: every outcome, and the request log's total afterwards.

Temporal is not needed by this route; the API is pointed at a closed port.

    .venv/bin/python bench/usage_api.py [--batches 40] [--batch-size 500]
        [--concurrency 4] [--orgs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from _stack import fresh_database, machine, postgres_server
from sqlalchemy import func, select

from billing.db import orgs
from billing.db.models import RequestLog
from billing.db.session import make_engine, make_session_factory

HOST = "127.0.0.1"
KEY = "bench-service-key-" + "0123456789abcdef" * 2
TARGET = 2000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def api_process(database_url: str, port: int, workdir: Path) -> Iterator[None]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "STRIPE_"))}
    env = {
        **inherited,
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": f"{HOST}:{free_port()}",
        "BILLING_SERVICE_API_KEYS": KEY,
        # `billing api` wants Stripe configured; this route never calls it.
        "STRIPE_SECRET_KEY": "sk_test_bench",
        "STRIPE_WEBHOOK_SECRET": "whsec_bench",
        "BILLING_HOME": str(workdir / "home"),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "tooling.cli", "api", "--host", HOST, "--port", str(port)]
    log_path = workdir / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://{HOST}:{port}/healthz", timeout=2).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.2)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def batches(org_ids: list[int], count: int, size: int) -> list[tuple[int, dict[str, Any]]]:
    now = datetime.now(UTC)
    out = []
    for b in range(count):
        items = [
            {
                "id": f"bench-{b}-{n}",
                "count": 1 + n % 7,
                "at": (now - timedelta(seconds=n)).isoformat(),
            }
            for n in range(size)
        ]
        out.append((org_ids[b % len(org_ids)], {"items": items}))
    return out


async def send_all(
    base: str, work: list[tuple[int, dict[str, Any]]], concurrency: int
) -> tuple[float, dict[str, int]]:
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    outcomes: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def sender(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            org_id, body = queue.get_nowait()
            answer = await http.post(f"/api/orgs/{org_id}/usage", json=body)
            answer.raise_for_status()
            for item in answer.json()["items"]:
                outcomes[item["outcome"]] = outcomes.get(item["outcome"], 0) + 1

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(sender(http) for _ in range(concurrency)))
        return time.perf_counter() - started, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--orgs", type=int, default=8)
    args = parser.parse_args()
    with (
        postgres_server() as (admin_url, _),
        fresh_database(admin_url) as url,
        tempfile.TemporaryDirectory(prefix="bench-usage-") as folder,
    ):
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            org_ids = [
                orgs.create_org_with_owner(
                    session, name=f"Bench {n}", owner_email=f"owner{n}@bench.example"
                ).id
                for n in range(args.orgs)
            ]
        port = free_port()
        work = batches(org_ids, args.batches, args.batch_size)
        total_items = args.batches * args.batch_size
        with api_process(url, port, Path(folder)):
            base = f"http://{HOST}:{port}"
            # One small batch first: connections and caches warm, not measured.
            asyncio.run(send_all(base, [(org_ids[0], {"items": []})], 1))
            new_s, new = asyncio.run(send_all(base, work, args.concurrency))
            dup_s, dup = asyncio.run(send_all(base, work, args.concurrency))
        with sessions() as session:
            logged = session.scalar(select(func.coalesce(func.sum(RequestLog.count), 0)))
        engine.dispose()
    expected = sum(i["count"] for _, body in work for i in body["items"])
    ok = new == {"recorded": total_items} and dup == {"duplicate": total_items}
    ok = ok and logged == expected
    rate = total_items / new_s
    print(f"machine: {machine()}")
    print(
        f"batches: {args.batches} x {args.batch_size} items, concurrency {args.concurrency}, "
        f"{args.orgs} orgs"
    )
    print(f"new items:       {rate:,.0f} items/s ({new_s:.2f} s) outcomes {new}")
    print(f"repeated items:  {total_items / dup_s:,.0f} items/s ({dup_s:.2f} s) outcomes {dup}")
    print(f"request log total {logged} (expected {expected})")
    print(f"target >= {TARGET:,.0f} items/s: {'met' if rate >= TARGET else 'NOT met'}")
    print("checks: " + ("ok" if ok else "FAILED"))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
