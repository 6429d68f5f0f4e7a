"""One usage-reporting cycle for N orgs: is Stripe's rate limit the only bottleneck?

Setup (not measured): N orgs with 1 to 5 members and request-log rows inside their
current period, provisioned through the real workflows with the emulator's rate
limit off and a high request budget. Then:

(a) the DB aggregation `plan_usage` does (members count, request sum in the
    period), timed alone, as one grouped query per dimension and as per-org
    queries, without writing ledger rows;
(b) the `report_usage` Update on every org's `OrgBilling` workflow, bounded
    concurrency, run by one or more worker processes (`python worker.py`)
    sharing the request budget, with Stripe's test-mode limit on: meter
    events/s against 25/s, no duplicates, a consistent ledger, and what that
    rate means for 10,000 orgs.

    .venv/bin/python bench/usage_cycle.py 2000 [--requests-per-second 25] [--worker-processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

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
    progress_bar,
    provisioned_count,
    quiet_logging,
    report_table,
    request_counts,
    route_table,
    running_workers,
    start_backfill,
    stat_counts,
    time_table,
    verdict,
    wait_with_progress,
    warnings_table,
)
from _workers import WorkerProcesses
from pydantic import SecretStr
from rich.table import Table
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session
from temporalio.client import Client, WorkflowUpdateRPCTimeoutOrCancelledError

from billing.constants import REPORT_USAGE_UPDATE, org_workflow_id
from billing.db.models import Membership, Org, RequestLog, UsageLedger, User
from billing.domain import LedgerStatus, MembershipRole, UsageReportResult
from billing.encryption import new_key_entry
from billing.stripe_gateway import snapshot_of
from billing.temporal_client import connect_client

T = TypeVar("T")

METER_EVENTS_PER_ORG = 2  # users (a level) and requests (a count)
PROJECTED_ORGS = 10_000
# Stripe keeps a renewal invoice as a draft for an hour before finalizing it.
GRACE_SECONDS = 3600
MAX_MEMBERS = 5
MAX_REQUEST_COUNT = 500
AGGREGATION_REPEATS = 3

# How long one org's Update may take, its server-side waits retried, before the run fails.
UPDATE_GIVE_UP_SECONDS = 600.0


@dataclass(frozen=True)
class Period:
    org_id: int
    start: datetime
    end: datetime


# Setup --------------------------------------------------------------------------------


def seed_orgs(stack: Stack, n: int, rng: random.Random) -> list[int]:
    """N orgs, each with an owner and 0 to 4 more members, in bulk (setup, not the product)."""
    run = uuid.uuid4().hex[:6]
    with stack.sessions.begin() as session:
        org_ids = list(
            session.scalars(
                insert(Org).returning(Org.id, sort_by_parameter_order=True),
                [{"uid": str(uuid.uuid4()), "name": f"Usage org {i}"} for i in range(n)],
            )
        )
        sizes = [rng.randint(1, MAX_MEMBERS) for _ in org_ids]
        users = [
            {"email": f"u-{run}-{org}-{k}@example.com", "first_name": "U", "last_name": str(k)}
            for org, size in zip(org_ids, sizes, strict=True)
            for k in range(size)
        ]
        user_ids = iter(
            session.scalars(insert(User).returning(User.id, sort_by_parameter_order=True), users)
        )
        memberships = [
            {
                "org_id": org,
                "user_id": next(user_ids),
                "role": MembershipRole.OWNER if k == 0 else MembershipRole.MEMBER,
            }
            for org, size in zip(org_ids, sizes, strict=True)
            for k in range(size)
        ]
        session.execute(insert(Membership), memberships)
    return org_ids


async def gather_bounded(
    label: str, items: list[int], limit: int, call: Callable[[int], Awaitable[T]]
) -> list[T]:
    """`call` for every item, at most `limit` at a time, with a progress bar."""
    gate = asyncio.Semaphore(limit)
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(items))

        async def one(item: int) -> T:
            async with gate:
                result = await call(item)
            progress.advance(task)
            return result

        return await asyncio.gather(*(one(i) for i in items))


def current_periods(stack: Stack, org_ids: list[int]) -> list[Period]:
    """Each org's billing period, from the emulator's subscriptions (in-process, no requests).

    Reduced with the product's own `snapshot_of`, so it is the period the workflow
    holds; the cycle's answers are checked against it afterwards.
    """
    with stack.emulator.state.lock:
        subs = [snapshot_of(s) for s in stack.emulator.state.collection("subscription").values()]
    by_org = {int(s.org_id): s for s in subs if s.org_id}
    periods: list[Period] = []
    for org_id in org_ids:
        sub = by_org.get(org_id)
        if sub is None or sub.current_period_start is None or sub.current_period_end is None:
            raise RuntimeError(f"org {org_id} has no billing period after setup")
        periods.append(Period(org_id, sub.current_period_start, sub.current_period_end))
    return periods


def seed_requests(stack: Stack, periods: list[Period], per_org: int, rng: random.Random) -> int:
    """`per_org` request-log rows per org, spread between its period start and now."""
    now = datetime.now(UTC) - timedelta(seconds=1)
    rows = []
    for p in periods:
        span = max((now - p.start).total_seconds(), 0.0)
        for _ in range(per_org):
            rows.append(
                {
                    "org_id": p.org_id,
                    "count": rng.randint(1, MAX_REQUEST_COUNT),
                    "occurred_at": p.start + timedelta(seconds=rng.uniform(0, span)),
                }
            )
    with stack.sessions.begin() as session:
        session.execute(insert(RequestLog), rows)
    return len(rows)


# (a) The aggregation alone ---------------------------------------------------------------

GROUPED_REQUESTS = text(
    """
    SELECT p.org_id, COALESCE(SUM(r.count), 0)
    FROM unnest(
        CAST(:org_ids AS integer[]),
        CAST(:starts AS timestamptz[]),
        CAST(:ends AS timestamptz[])
    ) AS p(org_id, period_start, period_end)
    LEFT JOIN request_log r
      ON r.org_id = p.org_id AND r.occurred_at >= p.period_start AND r.occurred_at < p.period_end
    GROUP BY p.org_id
    """
)

Usage = dict[int, tuple[int, int]]


def grouped_usage(session: Session, periods: list[Period]) -> Usage:
    """Both aggregations for every org: one statement per dimension."""
    ids = [p.org_id for p in periods]
    members: dict[int, int] = {
        org_id: count
        for org_id, count in session.execute(
            select(Membership.org_id, func.count())
            .where(Membership.org_id.in_(ids))
            .group_by(Membership.org_id)
        )
    }
    requests: dict[int, int] = {
        org_id: total
        for org_id, total in session.execute(
            GROUPED_REQUESTS,
            {
                "org_ids": ids,
                "starts": [p.start for p in periods],
                "ends": [p.end for p in periods],
            },
        )
    }
    return {i: (int(members.get(i, 0)), int(requests.get(i, 0))) for i in ids}


def per_org_usage(session: Session, periods: list[Period]) -> Usage:
    """The two statements `DbActivities.plan_usage` runs, once per org (no ledger writes)."""
    usage: Usage = {}
    for p in periods:
        users = session.scalar(
            select(func.count()).select_from(Membership).where(Membership.org_id == p.org_id)
        )
        requests = session.scalar(
            select(func.coalesce(func.sum(RequestLog.count), 0)).where(
                RequestLog.org_id == p.org_id,
                RequestLog.occurred_at >= p.start,
                RequestLog.occurred_at < p.end,
            )
        )
        usage[p.org_id] = (int(users or 0), int(requests or 0))
    return usage


def best_time(
    stack: Stack, fn: Callable[[Session, list[Period]], Usage], periods: list[Period]
) -> tuple[float, Usage]:
    """Best of a few runs on a warm connection: the query cost, not connection setup."""
    times: list[float] = []
    result: Usage = {}
    with stack.sessions() as session:
        session.execute(text("SELECT 1"))
        for _ in range(AGGREGATION_REPEATS):
            started = time.perf_counter()
            result = fn(session, periods)
            times.append(time.perf_counter() - started)
    return min(times), result


# (b) The reporting cycle -------------------------------------------------------------------


@dataclass
class Cycle:
    load: str
    metrics: MetricsDelta
    wall: float
    results: list[UsageReportResult]
    latencies: list[float]
    traffic: Traffic
    accepted: int
    duplicates: int
    worker_cpu: float = 0.0  # seconds of the worker processes' CPU over the cycle

    def merged(self, other: Cycle) -> Cycle:
        """Two cycles run one after the other, as one."""
        return Cycle(
            load=f"{self.load}; {other.load}",
            metrics=MetricsDelta(
                {
                    k: self.metrics.samples.get(k, 0.0) + other.metrics.samples.get(k, 0.0)
                    for k in {*self.metrics.samples, *other.metrics.samples}
                }
            ),
            wall=self.wall + other.wall,
            results=self.results + other.results,
            latencies=self.latencies + other.latencies,
            traffic=Traffic(self.traffic.requests + other.traffic.requests),
            accepted=self.accepted + other.accepted,
            duplicates=max(self.duplicates, other.duplicates),
            worker_cpu=self.worker_cpu + other.worker_cpu,
        )


async def report_cycle(
    stack: Stack,
    workers: WorkerProcesses,
    org_ids: list[int],
    concurrency: int,
    client: Client | None = None,
) -> Cycle:
    """`report_usage` on every org's workflow, `concurrency` in flight, Stripe's limit on."""
    latencies: list[float] = []
    client = client or stack.client

    cycle_id = uuid.uuid4().hex[:8]

    async def report(org_id: int) -> UsageReportResult:
        handle = client.get_workflow_handle(org_workflow_id(org_id))
        started = time.monotonic()
        while True:
            try:
                # One Update id per org and cycle: asking again after the server's
                # wait ran out joins the same Update, never a second report.
                result: UsageReportResult = await handle.execute_update(
                    REPORT_USAGE_UPDATE,
                    id=f"bench-report-{cycle_id}-{org_id}",
                    result_type=UsageReportResult,
                )
                break
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                if time.monotonic() - started > UPDATE_GIVE_UP_SECONDS:
                    raise
        latencies.append(time.monotonic() - started)
        return result

    metrics_before = await asyncio.to_thread(workers.snapshot)
    stack.emulator.set_faults(rate_limit_per_second=STRIPE_RATE)
    before, stats_before = request_counts(stack.emulator), stat_counts(stack.emulator)
    cpu_before = workers.cpu_seconds()
    started = time.monotonic()
    results = await gather_bounded("Reporting usage", org_ids, concurrency, report)
    wall = time.monotonic() - started
    cpu = workers.cpu_seconds() - cpu_before
    after, stats_after = request_counts(stack.emulator), stat_counts(stack.emulator)
    stack.emulator.clear_faults()
    load = machine()
    metrics_after = await asyncio.to_thread(workers.snapshot)
    return Cycle(
        load=load,
        metrics=MetricsDelta.between(metrics_before, metrics_after),
        wall=wall,
        results=results,
        latencies=latencies,
        traffic=Traffic.between(before, after),
        accepted=stats_after["meter_events_accepted"] - stats_before["meter_events_accepted"],
        duplicates=stats_after["meter_events_duplicate"],
        worker_cpu=cpu,
    )


def ledger_problems(stack: Stack, expected: Usage) -> dict[str, int]:
    """Ledger rows per (org, dimension, period): one each, sent, with the DB's values."""
    users_dim = stack.settings.stripe_users_dimension
    with stack.sessions() as session:
        groups = session.execute(
            select(
                UsageLedger.org_id,
                UsageLedger.dimension,
                UsageLedger.period_start,
                func.count(),
                func.sum(UsageLedger.value),
                func.bool_and(UsageLedger.status == LedgerStatus.SENT),
            ).group_by(UsageLedger.org_id, UsageLedger.dimension, UsageLedger.period_start)
        ).all()
        identifiers = list(session.scalars(select(UsageLedger.identifier)))
    with stack.emulator.state.lock:
        seen = set(stack.emulator.state.meter_identifiers)
    per_org: dict[int, int] = {}
    wrong_value = 0
    for org_id, dimension, _, rows, total, _ in groups:
        per_org[org_id] = per_org.get(org_id, 0) + 1
        users, requests = expected[org_id]
        want = users if dimension == users_dim else requests
        if rows != 1 or int(total) != want:
            wrong_value += 1
    return {
        "ledger groups with ≠ 1 row or a wrong value": wrong_value,
        "ledger rows not sent": sum(1 for g in groups if not g[5]),
        "orgs without both dimensions": sum(
            1 for o in expected if per_org.get(o, 0) != METER_EVENTS_PER_ORG
        ),
        "ledger identifiers Stripe never saw": sum(1 for i in identifiers if i not in seen),
    }


# Run and report ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    quiet_logging()
    rng = random.Random(args.seed)
    n: int = args.orgs
    async with open_stack() as stack:
        console.print(f"Stack up in {stack.setup_seconds:.1f} s (Postgres: {stack.postgres}).")
        t = time.monotonic()
        org_ids = await asyncio.to_thread(seed_orgs, stack, n, rng)
        console.print(f"{n} orgs with members written in {time.monotonic() - t:.1f} s.")

        async with running_workers(
            stack, args.setup_requests_per_second, processes=args.worker_processes
        ):
            handle = await start_backfill(stack)
            setup = await wait_with_progress(
                "Setup: provisioning (Stripe limit off)",
                n,
                lambda: provisioned_count(stack.sessions),
                timeout=args.timeout,
            )
            await handle.result()
        periods = current_periods(stack, org_ids)
        console.print(f"Setup provisioning took {setup:.1f} s ({n / setup:.1f} orgs/s).")
        rows = await asyncio.to_thread(seed_requests, stack, periods, args.requests_per_org, rng)
        console.print(f"{rows} request-log rows written.")

        with console.status("Timing the aggregation alone…"):
            grouped_s, grouped = await asyncio.to_thread(best_time, stack, grouped_usage, periods)
            per_org_s, per_org = await asyncio.to_thread(best_time, stack, per_org_usage, periods)

        # With --compare-encryption: half the orgs with plain payloads, then the
        # other half by workers (and a client) that encrypt them, back to back.
        half = len(org_ids) // 2 if args.compare_encryption else len(org_ids)
        async with running_workers(
            stack, args.requests_per_second, processes=args.worker_processes
        ) as workers:
            cycle = await asyncio.wait_for(
                report_cycle(stack, workers, org_ids[:half], args.concurrency),
                timeout=args.timeout,
            )
            warnings = workers.warnings()
            rss = workers.rss()
        sealed: Cycle | None = None
        if args.compare_encryption:
            keys = SecretStr(new_key_entry("bench"))
            enc_settings = stack.settings.model_copy(update={"billing_encryption_keys": keys})
            enc_client = await connect_client(enc_settings)
            async with running_workers(
                stack,
                args.requests_per_second,
                processes=args.worker_processes,
                settings=enc_settings,
            ) as workers:
                sealed = await asyncio.wait_for(
                    report_cycle(
                        stack, workers, org_ids[half:], args.concurrency, client=enc_client
                    ),
                    timeout=args.timeout,
                )
                warnings += workers.warnings()
        problems = ledger_problems(stack, grouped)
    start_of = {p.org_id: p.start for p in periods}
    problems["Updates that reported another period"] = sum(
        1 for r in cycle.results if not r.periods or r.periods[0].period_start != start_of[r.org_id]
    )

    plain = cycle
    if sealed is not None:
        cycle = plain.merged(sealed)
    ok = report(args, grouped_s, per_org_s, grouped == per_org, cycle, problems, grouped, rss)
    if sealed is not None:
        console.print(encryption_table(plain, sealed))
    console.print(route_table(cycle.traffic, cycle.wall))
    console.print(time_table(cycle.metrics, TASK_QUEUE))
    table = warnings_table(warnings)
    if table is not None:
        console.print(table)
    return 0 if ok else 1


def encryption_table(plain: Cycle, sealed: Cycle) -> Table:
    """The cost of payload encryption: the two halves of the orgs, back to back."""

    def figures(cycle: Cycle) -> tuple[float, float, float, float]:
        lat = sorted(cycle.latencies)
        n = max(len(cycle.results), 1)
        return (
            cycle.accepted / cycle.wall,
            statistics.median(lat),
            lat[int(0.95 * (len(lat) - 1))],
            cycle.worker_cpu / n * 1000,
        )

    a, b = figures(plain), figures(sealed)
    rows = [
        ("meter events/s", fmt_rate(a[0]), fmt_rate(b[0]), f"{b[0] / a[0]:.2f}"),
        ("Update latency p50", f"{a[1]:.1f} s", f"{b[1]:.1f} s", f"{b[1] / a[1]:.2f}"),
        ("Update latency p95", f"{a[2]:.1f} s", f"{b[2]:.1f} s", f"{b[2] / a[2]:.2f}"),
        ("worker CPU per Update", f"{a[3]:.1f} ms", f"{b[3]:.1f} ms", f"{b[3] / a[3]:.2f}"),
    ]
    table = Table(
        title=f"Payload encryption: {len(plain.results)} orgs plain, then "
        f"{len(sealed.results)} encrypted (AES-256-GCM), same run",
        title_justify="left",
    )
    for column in ("figure", "plain", "encrypted", "encrypted / plain"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def report(
    args: argparse.Namespace,
    grouped_s: float,
    per_org_s: float,
    same: bool,
    cycle: Cycle,
    problems: dict[str, int],
    expected: Usage,
    rss: list[int],
) -> bool:
    n: int = len(cycle.results)
    rps: float = args.requests_per_second
    console.print(
        report_table(
            f"(a) Usage aggregation alone, {n} orgs, "
            f"{args.requests_per_org} request rows each (best of {AGGREGATION_REPEATS})",
            [
                ("grouped (2 statements)", f"{grouped_s * 1000:.1f} ms", "members, requests"),
                (
                    f"per org ({2 * n} statements)",
                    f"{per_org_s * 1000:.0f} ms",
                    f"{per_org_s / n * 1e6:.0f} µs per org, what plan_usage runs",
                ),
                ("results agree", "yes" if same else "no", verdict(same)),
            ],
        )
    )
    sent = sum(r.meter_events_sent for r in cycle.results)
    skipped = sum(1 for r in cycle.results if r.skipped_reason)
    rate = cycle.accepted / cycle.wall
    # The budget is spent on every request (the period's confirming read too), so
    # how fully the cycle uses Stripe's limit is the served request rate.
    served_rate = cycle.traffic.served / cycle.wall
    ratio = served_rate / STRIPE_RATE
    projected = PROJECTED_ORGS * METER_EVENTS_PER_ORG / rate
    fits = projected < GRACE_SECONDS
    lat = sorted(cycle.latencies)
    want_events = METER_EVENTS_PER_ORG * n
    rows = [
        ("orgs", str(n), f"{args.concurrency} Updates in flight"),
        ("wall time", f"{cycle.wall:.1f} s", "first Update sent → last one answered"),
        ("orgs/s", fmt_rate(n / cycle.wall), ""),
        (
            "meter events/s",
            fmt_rate(rate),
            f"{cycle.accepted} accepted; budget {rps:g} requests/s shared by "
            f"{args.worker_processes} worker process(es)",
        ),
        (
            "Stripe requests/s (served)",
            fmt_rate(served_rate),
            f"{cycle.traffic.served} requests: meter events and each period's confirming read",
        ),
        (
            "served rate / Stripe limit",
            f"{ratio:.2f}",
            f"limit {STRIPE_RATE:g}/s; target ≥ {TARGET_RATIO} " + verdict(ratio >= TARGET_RATIO),
        ),
        (
            "429s",
            str(cycle.traffic.rate_limited),
            "each one pauses the budget and is retried in the client",
        ),
        (
            "Update latency p50 / p95 / max",
            f"{statistics.median(lat):.1f} / {lat[int(0.95 * (len(lat) - 1))]:.1f} "
            f"/ {lat[-1]:.1f} s",
            "mostly waiting for budget slots",
        ),
        (
            "worker RSS",
            " + ".join(f"{b / 2**20:.0f}" for b in rss) + " MB",
            "per process, after the cycle",
        ),
        (
            "meter events sent (Updates)",
            str(sent),
            f"expected {want_events}; {skipped} skipped " + verdict(sent == want_events),
        ),
        (
            "duplicate meter events",
            str(cycle.duplicates),
            "emulator saw an identifier twice " + verdict(cycle.duplicates == 0),
        ),
    ]
    rows += [(name, str(count), verdict(count == 0)) for name, count in problems.items()]
    rows.append(
        (
            f"{PROJECTED_ORGS:,} orgs ({METER_EVENTS_PER_ORG} events each)",
            f"{projected / 60:.1f} min",
            f"at {rate:.1f} events/s: "
            + ("inside" if fits else "[red]outside[/red]")
            + f" Stripe's {GRACE_SECONDS // 60}-minute finalization grace "
            f"({projected / GRACE_SECONDS:.0%} of it)",
        )
    )
    console.print(report_table(f"(b) One reporting cycle, {n} orgs ({cycle.load})", rows))
    if ratio < TARGET_RATIO and rps < STRIPE_RATE:
        console.print(
            f"[yellow]Below {TARGET_RATIO:.0%} of Stripe's limit: the budget of {rps:g} "
            "requests/s sets the pace, not Stripe.[/yellow]"
        )
    elif ratio < TARGET_RATIO:
        console.print(
            f"[yellow]Below {TARGET_RATIO:.0%} of Stripe's limit although the budget "
            "allows more: the first and last seconds (few orgs in flight), 429 pauses or "
            "the worker's CPU set the pace; see where the time goes below.[/yellow]"
        )
    clean = all(v == 0 for v in problems.values())
    return (
        clean
        and cycle.duplicates == 0
        and sent == want_events
        and cycle.accepted == want_events
        and len(expected) == n
        and same
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("n", nargs="?", type=int, default=2000, help="orgs (default 2000)")
    parser.add_argument("--orgs", type=int, help="orgs; overrides the positional N")
    parser.add_argument(
        "--requests-per-second",
        type=check_rate,
        default=DEFAULT_REQUESTS_PER_SECOND,
        help="STRIPE_REQUESTS_PER_SECOND during the measured cycle; "
        f"default {DEFAULT_REQUESTS_PER_SECOND:g}",
    )
    parser.add_argument(
        "--setup-requests-per-second",
        type=check_rate,
        default=100.0,
        help="the request budget while setting up (the emulator's limit is off then)",
    )
    parser.add_argument(
        "--worker-processes", type=int, default=1, help="worker processes (default 1)"
    )
    parser.add_argument("--concurrency", type=int, default=200, help="Updates in flight")
    parser.add_argument(
        "--compare-encryption",
        action="store_true",
        help="report half the orgs with plain payloads, then half with workers that "
        "encrypt them (BILLING_ENCRYPTION_KEYS), and print the cost",
    )
    parser.add_argument("--requests-per-org", type=int, default=20, help="request-log rows")
    parser.add_argument("--seed", type=int, default=7, help="random seed for the data")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    args = parser.parse_args()
    args.orgs = args.orgs if args.orgs is not None else args.n
    if not 1 <= args.worker_processes <= 8:
        parser.error("--worker-processes must be between 1 and 8")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
