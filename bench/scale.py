"""Scale: 10,000 orgs provisioned, one usage cycle for all of them, request_log at 10M rows.

Phases (all by default; `--phases` picks some):

- `provisioning`: N orgs with members, provisioned through the real workflows by
  the worker processes with the emulator's rate limit off (a high request
  budget): wall time, worker RSS with N running org workflows (sampled every
  2 s; the workflow cache size is `--cached`), Temporal history sizes (a sample).
- `request-log`: the database is at head; migration 0003's downgrade puts back
  the plain `(org_id, occurred_at)` index of 0001 in place of its covering and
  BRIN indexes. Then `--log-rows` request-log rows over the last 90 days in time
  order, skewed (a few orgs make most requests), then one org's 30-day sum
  (`orgs.request_total`) and a whole cycle's planning (the `db_plan_usage`
  activity for every org), first with the old index, then after migration
  0003's upgrade (how long building its indexes takes on that table; the
  indexes are checked to be exactly head's), and the retention delete
  (`billing requests prune`'s statement) of the rows past 66 days.
- `cycle`: the `report_usage` Update on `--cycle-orgs` orgs at the default budget
  (25 requests/s, Stripe's test-mode limit on): time, against the one-hour grace.
  With `--cycle-orgs` below `--orgs`, the cycle for all `--orgs` is computed
  from the measured per-org time (and printed as computed, not measured).

Every figure is printed with what it projects to at `--project` orgs, computed
from the measured per-org costs.

    .venv/bin/python bench/scale.py --orgs 10000 [--phases provisioning,request-log,cycle]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import random
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from _stack import (
    DEFAULT_REQUESTS_PER_SECOND,
    STRIPE_RATE,
    Stack,
    check_rate,
    console,
    machine,
    open_stack,
    provisioned_count,
    quiet_logging,
    report_table,
    running_workers,
    start_backfill,
    wait_with_progress,
)
from _workers import WorkerProcesses
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import text
from sqlalchemy.orm import Session
from usage_cycle import (
    GRACE_SECONDS,
    METER_EVENTS_PER_ORG,
    current_periods,
    report_cycle,
    seed_orgs,
    seed_requests,
)

from activities.db_activities import DbActivities
from activities.models import PlanUsageInput
from billing.constants import org_workflow_id
from billing.db import orgs

PHASES = ("provisioning", "request-log", "cycle")
# The migration that replaced request_log's plain (org_id, occurred_at) index by a
# covering one and a BRIN one: its downgrade is the "before", its upgrade the "after".
INDEX_MIGRATION = "billing.migrations.versions.0003_request_log_scale"
LOG_DAYS = 90
PERIOD_DAYS = 30
KEEP_DAYS = 66  # what `billing requests prune` must keep (orgs.REQUESTS_BILLABLE_FOR)
ZIPF = 0.7  # org i (from 1) makes requests in proportion to i ** -ZIPF
LOG_CHUNKS = 30
PRUNE_BATCH = 50_000
MB = 2**20


@dataclass
class Figures:
    """Everything measured, for the summary at the end."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, metric: str, value: str, note: str = "") -> None:
        self.rows.append((metric, value, note))
        console.print(f"  {metric}: [bold]{value}[/bold] {note}")


# Phase 1: provisioning ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def rss_sampling(workers: WorkerProcesses, every: float = 2.0) -> AsyncIterator[None]:
    """Sample the worker processes' RSS in the background (the peak is kept)."""

    async def loop() -> None:
        while True:
            await asyncio.to_thread(workers.sample_rss)
            await asyncio.sleep(every)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        workers.sample_rss()


def mb(values: list[int]) -> str:
    return " + ".join(f"{v / MB:.0f}" for v in values) + " MB"


async def provisioning(
    stack: Stack, args: argparse.Namespace, org_ids: list[int], figures: Figures
) -> None:
    n = len(org_ids)
    async with running_workers(
        stack, args.setup_requests_per_second, processes=args.worker_processes, cached=args.cached
    ) as workers:
        idle = workers.rss()
        async with rss_sampling(workers):
            started = time.monotonic()
            backfill = await start_backfill(stack)
            wall = await wait_with_progress(
                f"Provisioning {n} orgs (Stripe limit off)",
                n,
                lambda: provisioned_count(stack.sessions),
                timeout=args.timeout,
            )
            await backfill.result()
            wall = time.monotonic() - started
            # Every org workflow is running now, waiting on its timers.
            await asyncio.sleep(5)
        after = workers.rss()
        metrics = await asyncio.to_thread(workers.snapshot)
        died = workers.died()
    cache = sum(v for (name, _), v in metrics.items() if name == "temporal_sticky_cache_size")
    figures.add(
        "provisioning wall time",
        f"{wall:.0f} s",
        f"{n} orgs, {n / wall:.1f} orgs/s, budget {args.setup_requests_per_second:g}/s, "
        f"Stripe limit off, {args.worker_processes} worker process(es) ({machine()})",
    )
    figures.add(
        f"worker RSS with {n} running org workflows",
        mb(after),
        f"peak {mb(workers.peak_rss)}, idle at start {mb(idle)}; workflow cache "
        f"{args.cached if args.cached is not None else 'default'} "
        f"({cache:.0f} cached at the end)",
    )
    if died:
        raise RuntimeError("; ".join(died))


async def history_sizes(
    stack: Stack, org_ids: list[int], sample: int, rng: random.Random, figures: Figures
) -> None:
    picked = rng.sample(org_ids, min(sample, len(org_ids)))
    events: list[int] = []
    sizes: list[int] = []
    for org_id in picked:
        history = await stack.client.get_workflow_handle(org_workflow_id(org_id)).fetch_history()
        events.append(len(history.events))
        sizes.append(sum(e.ByteSize() for e in history.events))
    figures.add(
        "org workflow history (provisioned, running)",
        f"{statistics.mean(events):.0f} events, {statistics.mean(sizes) / 1024:.1f} KB",
        f"mean of {len(picked)} sampled; max {max(events)} events, {max(sizes) / 1024:.1f} KB; "
        f"{len(org_ids)} orgs ≈ {statistics.mean(sizes) * len(org_ids) / MB:.0f} MB of history",
    )


# Phase 2: request_log at scale ---------------------------------------------------------


def rows_per_org(org_ids: list[int], total: int) -> dict[int, int]:
    """A skewed split of `total` rows: org i (by rank) gets a share ∝ i ** -ZIPF."""
    weights = [(rank + 1) ** -ZIPF for rank in range(len(org_ids))]
    scale = total / sum(weights)
    return {org_id: max(1, round(w * scale)) for org_id, w in zip(org_ids, weights, strict=True)}


def seed_request_log(stack: Stack, counts: dict[int, int]) -> float:
    """The rows, server-side, in time order (as a live table fills), chunk by chunk."""
    started = time.monotonic()
    with stack.engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench_weights (org_id integer, n integer)"))
        conn.execute(
            text(
                "INSERT INTO bench_weights"
                " SELECT * FROM unnest(CAST(:o AS int[]), CAST(:n AS int[]))"
            ),
            {"o": list(counts), "n": list(counts.values())},
        )
    chunk_days = LOG_DAYS / LOG_CHUNKS
    with console.status("Writing request-log rows…") as status:
        for chunk in range(LOG_CHUNKS):
            status.update(f"Writing request-log rows: chunk {chunk + 1}/{LOG_CHUNKS}")
            # Oldest chunk first; each org's rows spread evenly over the 90 days.
            with stack.engine.begin() as conn:
                conn.execute(
                    text(
                        """
                        INSERT INTO request_log (org_id, occurred_at, count)
                        SELECT w.org_id,
                               now() - :lo * interval '1 day'
                                     + random() * :span * interval '1 day',
                               1 + floor(random() * 100)::int
                        FROM bench_weights w,
                             generate_series(1, floor(w.n * :share)::int
                                 + (random() < w.n * :share - floor(w.n * :share))::int)
                        ORDER BY 2
                        """
                    ),
                    {
                        "lo": LOG_DAYS - chunk * chunk_days,
                        "span": chunk_days,
                        "share": 1 / LOG_CHUNKS,
                    },
                )
    with stack.engine.begin() as conn:
        conn.execute(text("DROP TABLE bench_weights"))
    return time.monotonic() - started


def vacuum(stack: Stack) -> float:
    """VACUUM ANALYZE (what autovacuum does; index-only scans need the visibility map)."""
    started = time.monotonic()
    with stack.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE request_log")
        )
    return time.monotonic() - started


def table_size(stack: Stack) -> str:
    with stack.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT count(*), pg_size_pretty(pg_table_size('request_log')),"
                " pg_size_pretty(pg_indexes_size('request_log')) FROM request_log"
            )
        ).one()
    return f"{rows[0]:,} rows, table {rows[1]}, indexes {rows[2]}"


@dataclass(frozen=True)
class OrgTiming:
    label: str
    org_id: int
    rows_in_period: int
    best_ms: float
    first_ms: float
    buffers: int


def time_one_org(
    session: Session, label: str, org_id: int, since: datetime, until: datetime
) -> OrgTiming:
    """The product's own statement (`orgs.request_total`), first run and best of 5."""
    times = []
    for _ in range(6):
        started = time.perf_counter()
        orgs.request_total(session, org_id, since=since, until=until)
        times.append((time.perf_counter() - started) * 1000)
    plan = session.execute(
        text(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT coalesce(sum(count), 0) "
            "FROM request_log WHERE org_id = :o AND occurred_at >= :s AND occurred_at < :u"
        ),
        {"o": org_id, "s": since, "u": until},
    ).scalar_one()
    top = plan[0]["Plan"]
    buffers = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    rows = session.execute(
        text(
            "SELECT count(*) FROM request_log "
            "WHERE org_id = :o AND occurred_at >= :s AND occurred_at < :u"
        ),
        {"o": org_id, "s": since, "u": until},
    ).scalar_one()
    return OrgTiming(label, org_id, int(rows), min(times[1:]), times[0], buffers)


def time_sums(session: Session, org_ids: list[int], since: datetime, until: datetime) -> float:
    """Every org's period sum (`orgs.request_total`), one at a time, one connection."""
    started = time.perf_counter()
    for org_id in org_ids:
        orgs.request_total(session, org_id, since=since, until=until, through=until)
    return time.perf_counter() - started


def time_planning(stack: Stack, org_ids: list[int], since: datetime, until: datetime) -> float:
    """A whole cycle's planning: the `db_plan_usage` activity for every org, one at a time.

    Its pending ledger rows (period starting at `since`, which no real period
    shares) are deleted afterwards, so the cycle phase finds none of them.
    """
    plan = DbActivities(stack.sessions, stack.settings)
    started = time.perf_counter()
    with console.status("Planning…") as status:
        for i, org_id in enumerate(org_ids):
            if i % 500 == 0:
                status.update(f"Planning (db_plan_usage): org {i + 1}/{len(org_ids)}")
            plan.plan_usage(
                PlanUsageInput(
                    org_id=org_id,
                    customer_id=f"cus_bench_{org_id}",
                    period_start=since,
                    period_end=until,
                    report_time=until,
                )
            )
    seconds = time.perf_counter() - started
    with stack.engine.begin() as conn:
        conn.execute(text("DELETE FROM usage_ledger WHERE period_start = :s"), {"s": since})
    return seconds


def aggregation_figures(
    stack: Stack, org_ids: list[int], counts: dict[int, int], label: str, figures: Figures
) -> None:
    until = datetime.now(UTC).replace(microsecond=0)
    since = until - timedelta(days=PERIOD_DAYS)
    by_size = sorted(org_ids, key=lambda o: counts[o])
    picks = [
        ("median org", by_size[len(by_size) // 2]),
        ("p99 org", by_size[int(len(by_size) * 0.99)]),
        ("largest org", by_size[-1]),
    ]
    with stack.sessions() as session:
        session.execute(text("SELECT 1"))
        timings = [time_one_org(session, name, o, since, until) for name, o in picks]
        with console.status(f"{label}: every org's period sum…"):
            sums = time_sums(session, org_ids, since, until)
    planning = time_planning(stack, org_ids, since, until)
    for t in timings:
        figures.add(
            f"{label}: one org's {PERIOD_DAYS}-day sum, {t.label}",
            f"{t.best_ms:.2f} ms",
            f"{t.rows_in_period:,} rows in the period; first run {t.first_ms:.2f} ms; "
            f"{t.buffers:,} buffers (8 KB pages) touched",
        )
    figures.add(
        f"{label}: every org's {PERIOD_DAYS}-day sum, {len(org_ids)} orgs",
        f"{sums:.1f} s",
        f"{sums / len(org_ids) * 1000:.2f} ms per org (orgs.request_total, one connection)",
    )
    figures.add(
        f"{label}: a cycle's planning, {len(org_ids)} orgs",
        f"{planning:.1f} s",
        f"{planning / len(org_ids) * 1000:.2f} ms per org (the db_plan_usage activity: "
        "members, request sum, ledger rows written; one at a time)",
    )


def run_index_migration(stack: Stack, direction: str) -> float:
    """Migration 0003's `upgrade` or `downgrade`, as alembic runs it; returns seconds."""
    migration = importlib.import_module(INDEX_MIGRATION)
    started = time.monotonic()
    with stack.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        with Operations.context(context), context.begin_transaction():
            getattr(migration, direction)()
        conn.commit()
    return time.monotonic() - started


def request_log_indexes(stack: Stack) -> list[str]:
    """request_log's index definitions and storage options, to compare with head's."""
    with stack.engine.connect() as conn:
        defs = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE tablename = 'request_log' ORDER BY 1")
        ).scalars()
        options = conn.execute(
            text("SELECT reloptions FROM pg_class WHERE relname = 'request_log'")
        ).scalar_one()
        return [*defs, f"reloptions {options}"]


def request_log_phase(
    stack: Stack, args: argparse.Namespace, org_ids: list[int], figures: Figures
) -> None:
    head = request_log_indexes(stack)
    run_index_migration(stack, "downgrade")
    old = request_log_indexes(stack)
    console.print("request_log indexes before: " + "; ".join(old))
    counts = rows_per_org(org_ids, args.log_rows)
    seconds = seed_request_log(stack, counts)
    figures.add("request_log written", table_size(stack), f"in {seconds:.0f} s (setup)")
    figures.add("VACUUM ANALYZE request_log", f"{vacuum(stack):.1f} s", "")
    aggregation_figures(stack, org_ids, counts, "index (org_id, occurred_at)", figures)

    with console.status("Migration 0003 on request_log (building its indexes)…"):
        build = run_index_migration(stack, "upgrade")
    if (now := request_log_indexes(stack)) != head:
        raise RuntimeError(f"request_log indexes after 0003 {now} are not head's {head}")
    figures.add(
        "migration 0003 on that table",
        f"{build:.0f} s",
        "CREATE INDEX CONCURRENTLY (covering) + BRIN, old index dropped; inserts continue",
    )
    figures.add("request_log after 0003", table_size(stack), "indexes exactly head's")
    aggregation_figures(stack, org_ids, counts, "covering index", figures)


def prune_phase(stack: Stack, figures: Figures) -> None:
    """`billing requests prune --older-than-days 66`: what retention costs."""
    now = datetime.now(UTC)
    before = now - timedelta(days=KEEP_DAYS)
    deleted, batches = 0, 0
    started = time.monotonic()
    for _ in range(100_000):
        with stack.sessions.begin() as session:
            batch = orgs.prune_requests(session, before=before, now=now, limit=PRUNE_BATCH)
        deleted += batch
        batches += 1
        if batch < PRUNE_BATCH:
            break
    seconds = time.monotonic() - started
    figures.add(
        f"retention: rows older than {KEEP_DAYS} days deleted",
        f"{seconds:.0f} s",
        f"{deleted:,} rows in {batches} batches of {PRUNE_BATCH:,} "
        f"({deleted / max(seconds, 1e-9):,.0f} rows/s); then {table_size(stack)}",
    )


# Phase 3: the usage cycle ------------------------------------------------------------------


async def cycle_phase(
    stack: Stack, args: argparse.Namespace, org_ids: list[int], figures: Figures
) -> None:
    rng = random.Random(args.seed + 1)
    cycle_ids = org_ids[: args.cycle_orgs]
    periods = current_periods(stack, cycle_ids)
    await asyncio.to_thread(seed_requests, stack, periods, 5, rng)
    async with running_workers(
        stack, args.requests_per_second, processes=args.cycle_worker_processes, cached=args.cached
    ) as workers:
        async with rss_sampling(workers):
            cycle = await asyncio.wait_for(
                report_cycle(stack, workers, cycle_ids, args.concurrency), timeout=args.timeout
            )
        rss = workers.rss()
    n = len(cycle_ids)
    sent = sum(r.meter_events_sent for r in cycle.results)
    rate = cycle.accepted / cycle.wall
    figures.add(
        f"usage cycle, {n} orgs",
        f"{cycle.wall:.0f} s",
        f"{cycle.accepted} meter events at {rate:.2f}/s = {rate / STRIPE_RATE:.2f} of the "
        f"{STRIPE_RATE:g}/s limit; {cycle.traffic.rate_limited} 429s; sent {sent} "
        f"(expected {METER_EVENTS_PER_ORG * n}), {cycle.duplicates} duplicates; "
        f"{args.cycle_worker_processes} worker process(es) ({cycle.load})",
    )
    margin = GRACE_SECONDS - cycle.wall
    figures.add(
        "margin against the one-hour finalization grace",
        f"{margin / 60:.1f} min",
        f"the cycle takes {cycle.wall / GRACE_SECONDS:.0%} of the hour",
    )
    figures.add("worker RSS after the cycle", mb(rss), f"peak during it {mb(workers.peak_rss)}")
    per_org = cycle.wall / n
    if n < len(org_ids):
        computed = per_org * len(org_ids)
        figures.add(
            f"computed, not measured: a cycle for all {len(org_ids):,} orgs at "
            f"{args.requests_per_second:g} requests/s",
            f"{computed / 60:.0f} min",
            f"{len(org_ids):,} times the measured {per_org * 1000:.0f} ms per org ({n} orgs "
            f"reported); margin against the hour {(GRACE_SECONDS - computed) / 60:.1f} min",
        )
    for orgs_count, rps in ((args.project, STRIPE_RATE), (args.project, 100.0)):
        projected = orgs_count * METER_EVENTS_PER_ORG / rps
        figures.add(
            f"projected: a cycle for {orgs_count:,} orgs at {rps:g} requests/s",
            f"{projected / 60:.0f} min",
            f"{METER_EVENTS_PER_ORG} events per org at the full budget (measured here: "
            f"{per_org * 1000:.0f} ms per org at {args.requests_per_second:g}/s); "
            + ("inside" if projected < GRACE_SECONDS else "OUTSIDE")
            + " the hour",
        )
    if sent != METER_EVENTS_PER_ORG * n or cycle.duplicates:
        raise RuntimeError("the cycle did not send exactly two meter events per org")


# Run -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    console.rule(name)
    started = time.monotonic()
    yield
    console.print(f"[dim]{name}: {time.monotonic() - started:.0f} s[/dim]")


def projections(args: argparse.Namespace, figures: Figures) -> None:
    """Figures the machine cannot hold, from the measured per-org costs."""
    for rps in (STRIPE_RATE, 100.0):
        seconds = args.project * 4 / rps
        figures.add(
            f"projected: provisioning {args.project:,} orgs at {rps:g} requests/s",
            f"{seconds / 3600:.1f} h",
            "4 requests per org at the full budget, assuming no 429s "
            "(provisioning here ran with the limit off)",
        )


async def run(args: argparse.Namespace) -> int:
    quiet_logging()
    rng = random.Random(args.seed)
    figures = Figures()
    wanted = set(args.phases)
    needs_temporal = bool(wanted & {"provisioning", "cycle"})
    async with open_stack("head") as stack:
        console.print(f"Stack up in {stack.setup_seconds:.1f} s (Postgres: {stack.postgres}).")
        org_ids = await asyncio.to_thread(seed_orgs, stack, args.orgs, rng)
        console.print(f"{args.orgs} orgs with members written.")
        if needs_temporal:
            with phase("Provisioning"):
                await provisioning(stack, args, org_ids, figures)
                await history_sizes(stack, org_ids, args.history_sample, rng, figures)
        if "request-log" in wanted:
            with phase("request_log"):
                await asyncio.to_thread(request_log_phase, stack, args, org_ids, figures)
        if "cycle" in wanted:
            with phase("Usage cycle"):
                await cycle_phase(stack, args, org_ids, figures)
        if "request-log" in wanted:
            with phase("Retention"):
                await asyncio.to_thread(prune_phase, stack, figures)
        projections(args, figures)
    console.print(report_table(f"Scale ({machine()})", figures.rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orgs", type=int, default=10_000, help="orgs (default 10000)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, of {', '.join(PHASES)} (default all)",
    )
    parser.add_argument("--worker-processes", type=int, default=1, help="while provisioning")
    parser.add_argument(
        "--cycle-worker-processes", type=int, default=None, help="in the cycle (as provisioning)"
    )
    parser.add_argument(
        "--cached", type=int, default=None, help="WORKER_MAX_CACHED_WORKFLOWS (product default)"
    )
    parser.add_argument(
        "--setup-requests-per-second",
        type=check_rate,
        default=50.0,
        help="the budget while provisioning, emulator limit off (the emulator's customer "
        "search scans every customer: more in flight only queues there)",
    )
    parser.add_argument(
        "--requests-per-second", type=check_rate, default=DEFAULT_REQUESTS_PER_SECOND
    )
    parser.add_argument("--cycle-orgs", type=int, default=None, help="orgs in the cycle (all)")
    parser.add_argument("--concurrency", type=int, default=200, help="Updates in flight")
    parser.add_argument("--log-rows", type=int, default=10_000_000)
    parser.add_argument("--history-sample", type=int, default=200)
    parser.add_argument("--project", type=int, default=100_000, help="orgs to project to")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per phase")
    args = parser.parse_args()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if "cycle" in args.phases and "provisioning" not in args.phases:
        parser.error("the cycle needs the provisioning phase")
    if not 1 <= args.orgs <= 200_000 or not 1 <= args.worker_processes <= 8:
        parser.error("--orgs must be 1..200000 and --worker-processes 1..8")
    if not 0 <= args.log_rows <= 50_000_000:
        parser.error("--log-rows must be 0..50000000")
    args.cycle_orgs = min(args.cycle_orgs or args.orgs, args.orgs)
    args.cycle_worker_processes = args.cycle_worker_processes or args.worker_processes
    if not 1 <= args.cycle_worker_processes <= 8:
        parser.error("--cycle-worker-processes must be 1..8")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
