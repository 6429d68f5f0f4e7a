"""Backfill throughput: how fast N new orgs get billing under Stripe's test-mode rate limit.

Runs the path production runs: the `ProvisionMissingOrgs` workflow starts every
org's `OrgBilling` workflow, whose Stripe activities run in the worker
processes (`python worker.py`, one or more), every HTTP request drawing a slot
from the environment's one request budget in Postgres, against the emulator,
which answers 429 above 25 requests/s like Stripe's test mode. Then checks that
nothing was created twice.

    .venv/bin/python bench/provisioning.py 500 [--requests-per-second 25] [--worker-processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from _stack import (
    DEFAULT_REQUESTS_PER_SECOND,
    STRIPE_RATE,
    TARGET_RATIO,
    TASK_QUEUE,
    MetricsDelta,
    Stack,
    Traffic,
    check_rate,
    console,
    fmt_rate,
    machine,
    open_stack,
    provisioned_count,
    quiet_logging,
    report_table,
    request_counts,
    route_table,
    running_workers,
    start_backfill,
    time_table,
    verdict,
    wait_with_progress,
    warnings_table,
)
from sqlalchemy import func, select

from billing.db import orgs
from billing.db.models import Org

# Each provisioning runs two Stripe activities: own_customer (search, create) and
# ensure_subscription (list, create): four requests when nothing has to be retried.
STRIPE_ACTIVITIES_PER_ORG = 2
STRIPE_REQUESTS_PER_ORG = 4


def create_orgs(stack: Stack, n: int) -> None:
    """N orgs with owners, as `billing orgs create` makes them (one transaction)."""
    run = uuid.uuid4().hex[:6]
    with stack.sessions.begin() as session:
        for i in range(n):
            orgs.create_org_with_owner(
                session,
                name=f"Bench org {i}",
                owner_email=f"owner-{run}-{i}@example.com",
                owner_first_name="Ada",
                owner_last_name=f"Owner{i}",
            )


def duplicates(stack: Stack, n: int) -> dict[str, int]:
    """What must be zero: second customers or subscriptions of an org, orgs left unbilled."""
    with stack.emulator.state.lock:
        customers = list(stack.emulator.state.collection("customer").values())
        subscriptions = list(stack.emulator.state.collection("subscription").values())
    per_org_customers = Counter(str((c.get("metadata") or {}).get("org_id")) for c in customers)
    per_org_subs = Counter(str((s.get("metadata") or {}).get("org_id")) for s in subscriptions)
    with stack.sessions() as session:
        org_ids = [str(i) for i in session.scalars(select(Org.id))]
        distinct_subs = session.scalar(
            select(func.count(func.distinct(Org.stripe_subscription_id)))
        )
    return {
        "customers sharing an org_id": sum(c - 1 for c in per_org_customers.values() if c > 1),
        "orgs with != 1 subscription": sum(1 for o in org_ids if per_org_subs[o] != 1),
        "orgs without a subscription id": n - int(distinct_subs or 0),
    }


async def run(n: int, requests_per_second: float, processes: int, timeout: float) -> int:
    quiet_logging()
    async with open_stack() as stack:
        console.print(
            f"Stack up in {stack.setup_seconds:.1f} s (Postgres: {stack.postgres}). "
            f"Creating {n} orgs with owners…"
        )
        t = time.monotonic()
        await asyncio.to_thread(create_orgs, stack, n)
        console.print(f"{n} orgs created in {time.monotonic() - t:.1f} s.")

        async with running_workers(stack, requests_per_second, processes=processes) as workers:
            metrics_before = await asyncio.to_thread(workers.snapshot)
            warned_before = workers.warnings()
            # Stripe's test-mode limit, from a full bucket, from here on.
            stack.emulator.set_faults(rate_limit_per_second=STRIPE_RATE)
            before = request_counts(stack.emulator)
            started = time.monotonic()
            backfill = await start_backfill(stack)
            await wait_with_progress(
                f"Provisioning, {processes} worker process(es) sharing "
                f"{requests_per_second:g} Stripe requests/s",
                n,
                lambda: provisioned_count(stack.sessions),
                timeout=timeout,
            )
            wall = time.monotonic() - started
            traffic = Traffic.between(before, request_counts(stack.emulator))
            stack.emulator.clear_faults()
            load = machine()
            rss = workers.rss()
            warnings = workers.warnings() - warned_before
            metrics = MetricsDelta.between(
                metrics_before, await asyncio.to_thread(workers.snapshot)
            )
            result = await backfill.result()
        dupes = duplicates(stack, n)

    ok = report(
        Run(n, requests_per_second, processes, wall, traffic, result.started, dupes, load, rss),
        metrics,
    )
    console.print(route_table(traffic, wall))
    console.print(time_table(metrics, TASK_QUEUE))
    table = warnings_table(warnings)
    if table is not None:
        console.print(table)
    return 0 if ok else 1


@dataclass(frozen=True)
class Run:
    n: int
    requests_per_second: float
    processes: int
    wall: float
    traffic: Traffic
    started: int
    dupes: dict[str, int]
    load: str
    rss: list[int]


def report(run: Run, metrics: MetricsDelta) -> bool:
    """Print the figures; True when nothing was duplicated or left out."""
    n, wall, traffic = run.n, run.wall, run.traffic
    served_rate = traffic.served / wall
    ratio = served_rate / STRIPE_RATE
    activities = STRIPE_ACTIVITIES_PER_ORG * n
    overhead = traffic.served / (STRIPE_REQUESTS_PER_ORG * n) - 1
    clean = all(v == 0 for v in run.dupes.values())
    failed = metrics.total("temporal_activity_execution_failed")
    rows = [
        ("orgs", str(n), f"backfill started {run.started} org workflows"),
        ("wall time", f"{wall:.1f} s", "backfill start → every org row has a subscription"),
        ("orgs/s", fmt_rate(n / wall), ""),
        (
            "Stripe requests/s (served)",
            fmt_rate(served_rate),
            f"{traffic.served} requests; budget {run.requests_per_second:g}/s shared by "
            f"{run.processes} worker process(es)",
        ),
        (
            "served rate / Stripe limit",
            f"{ratio:.2f}",
            f"limit {STRIPE_RATE:g}/s; target ≥ {TARGET_RATIO} " + verdict(ratio >= TARGET_RATIO),
        ),
        (
            "429s",
            str(traffic.rate_limited),
            f"{traffic.rate_limited / max(traffic.total, 1):.1%} of {traffic.total} requests; "
            "target 0 " + verdict(traffic.rate_limited == 0),
        ),
        (
            "requests per org",
            f"{traffic.served / n:.2f}",
            f"{STRIPE_REQUESTS_PER_ORG} without retries; {overhead:+.0%} re-done",
        ),
        (
            "Stripe activities/s",
            fmt_rate(activities / wall),
            f"{activities} completed ({STRIPE_ACTIVITIES_PER_ORG}/org); "
            f"{failed:.0f} attempts failed",
        ),
        (
            "worker RSS",
            " + ".join(f"{b / 2**20:.0f}" for b in run.rss) + " MB",
            "per process, at the end",
        ),
    ]
    rows += [(name, str(count), verdict(count == 0)) for name, count in run.dupes.items()]
    console.print(report_table(f"Provisioning {n} orgs ({run.load})", rows))
    if ratio < TARGET_RATIO and run.requests_per_second < STRIPE_RATE:
        console.print(
            f"[yellow]The budget ({run.requests_per_second:g} requests/s) is below Stripe's "
            f"{STRIPE_RATE:g}/s, so it sets the pace.[/yellow]"
        )
    elif ratio < TARGET_RATIO:
        console.print(
            f"[yellow]Below {TARGET_RATIO:.0%} of Stripe's limit although the budget allows "
            "it: the first and last seconds, 429 pauses or the worker's CPU set the pace; "
            "see where the time goes below.[/yellow]"
        )
    return clean and run.started == n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("orgs", nargs="?", type=int, default=500, help="orgs to provision")
    parser.add_argument(
        "--requests-per-second",
        type=check_rate,
        default=DEFAULT_REQUESTS_PER_SECOND,
        help="STRIPE_REQUESTS_PER_SECOND of the worker processes (one shared budget); "
        f"default {DEFAULT_REQUESTS_PER_SECOND:g}",
    )
    parser.add_argument(
        "--worker-processes", type=int, default=1, help="worker processes (default 1)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for provisioning"
    )
    args = parser.parse_args()
    if not 1 <= args.worker_processes <= 8:
        parser.error("--worker-processes must be between 1 and 8")
    return asyncio.run(
        run(args.orgs, args.requests_per_second, args.worker_processes, args.timeout)
    )


if __name__ == "__main__":
    raise SystemExit(main())
