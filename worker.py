"""The worker's composition root: builds the engine, the Stripe client and the
Temporal client, and runs every workflow and activity.

Two workers share one process: the main task queue (workflows, DB activities)
and `<queue>-stripe`, whose activities send every HTTP request through the
environment's shared Stripe request budget (`STRIPE_REQUESTS_PER_SECOND`,
billing/stripe_budget.py), so a backfill of thousands of orgs, run by any
number of worker processes, stays inside Stripe's limit.

The DB activities are synchronous: each runs on a thread of the activity
executor with a pooled connection. The main worker takes at most as many
activities as the executor has threads, and the pool has a connection per
thread, so an accepted activity starts at once instead of queueing behind the
others until its start-to-close timeout fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import stripe
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from activities.db_activities import DbActivities
from activities.stripe_activities import StripeActivities
from activities.temporal_activities import OrgStarterActivities
from billing.config import Settings, StripeNotConfiguredError, get_settings
from billing.constants import (
    BACKFILL_SCHEDULE_ID,
    BACKFILL_WORKFLOW_ID,
    PROVISION_MISSING_WORKFLOW,
    stripe_task_queue,
)
from billing.db.session import make_engine, make_session_factory
from billing.domain import BackfillInput
from billing.notify import NotificationDelivery, NotifyNotConfiguredError
from billing.orchestration import tuning_of
from billing.stripe_budget import PostgresRequestBudget, StripeRequestMetrics
from billing.stripe_gateway import StripeGateway, make_stripe_client
from billing.temporal_client import TemporalUnavailableError, connect_client
from workflows import ALL_WORKFLOWS

log = logging.getLogger("billing.worker")

# Threads for the synchronous DB activities, and database connections for them.
DB_ACTIVITY_THREADS = 16


def worker_engine(settings: Settings) -> Engine:
    """The worker's engine: one connection per activity thread, every call bounded.

    `make_engine` sets the connect, statement and lock timeouts on every
    connection, so each activity transaction has them.
    """
    return make_engine(settings.database_url, pool_size=DB_ACTIVITY_THREADS)


# Temporal's own dispatch limit on the Stripe queue: far enough above the request
# budget never to set the pace (the budget does; Temporal also splits this limit
# across the queue's partitions), and set explicitly so it replaces any limit an
# older worker left on the queue.
DISPATCH_HEADROOM = 4.0
STRIPE_NETWORK_RETRIES = 2


def stripe_worker_concurrency(requests_per_second: float) -> int:
    """Stripe activities one process runs at once: about two seconds of the budget.

    Each running activity has at most one request waiting for a slot, so this
    bounds how far ahead a process books the budget, while leaving enough in
    flight that the gaps between an org's activities never leave a slot unused.
    """
    return min(500, max(10, math.ceil(2 * requests_per_second)))


def worker_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime with the Prometheus endpoint, when `WORKER_METRICS_PORT` is set."""
    if settings.worker_metrics_port is None:
        return None
    address = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))


def request_budget(settings: Settings) -> PostgresRequestBudget:
    """The environment's one Stripe request budget, in the database every process shares."""
    return PostgresRequestBudget(
        settings.database_url,
        name=settings.billing_source,
        rate=settings.stripe_requests_per_second,
    )


def build_workers(
    client: Client,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
    executor: ThreadPoolExecutor,
    *,
    stripe_activities: StripeActivities | None = None,
) -> list[Worker]:
    """Both workers, wired to the given dependencies (tests pass their own).

    The main worker accepts no more activities than `executor` has threads.
    """
    db = DbActivities(session_factory, settings)
    stripe_activities = stripe_activities or StripeActivities(
        StripeGateway(stripe_client, settings), settings
    )
    starter = OrgStarterActivities(client, settings.temporal_task_queue, tuning_of(settings))
    main = Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=ALL_WORKFLOWS,
        activities=[
            db.load_org,
            db.save_customer,
            db.save_subscription,
            db.record_adoption_refusal,
            db.orgs_without_billing,
            db.plan_usage,
            db.mark_usage_sent,
            db.publish_billing,
            starter.start_org_workflows,
        ],
        activity_executor=executor,
        max_concurrent_activities=executor._max_workers,
        max_cached_workflows=settings.worker_max_cached_workflows,
    )
    rate = settings.stripe_requests_per_second
    stripe_worker = Worker(
        client,
        task_queue=stripe_task_queue(settings.temporal_task_queue),
        activities=[
            stripe_activities.ensure_customer,
            stripe_activities.own_customer,
            stripe_activities.ensure_subscription,
            stripe_activities.fetch_subscription,
            stripe_activities.checkout_completed,
            stripe_activities.cancel_at_period_end,
            stripe_activities.send_meter_event,
            stripe_activities.sync_customer,
            stripe_activities.cancel_subscription,
        ],
        max_concurrent_activities=stripe_worker_concurrency(rate),
        max_task_queue_activities_per_second=rate * DISPATCH_HEADROOM,
    )
    return [main, stripe_worker]


@contextlib.asynccontextmanager
async def notification_delivery(
    settings: Settings, session_factory: sessionmaker[Session]
) -> AsyncIterator[None]:
    """The notifications delivery loop (billing/notify.py) while the block runs.

    Only with `BILLING_NOTIFY_URL` set; it runs beside the Temporal workers and
    never holds up their work.
    """
    if not settings.billing_notify_url:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(NotificationDelivery(settings, session_factory).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def ensure_backfill_schedule(client: Client, settings: Settings) -> None:
    """Create `billing-backfill` once; on later starts only bring its interval in line."""
    interval = timedelta(seconds=settings.backfill_interval_seconds)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PROVISION_MISSING_WORKFLOW,
            BackfillInput(),
            id=BACKFILL_WORKFLOW_ID,
            task_queue=settings.temporal_task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=interval)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(BACKFILL_SCHEDULE_ID, schedule)
        log.info("backfill schedule created", extra={"interval_seconds": interval.seconds})
    except ScheduleAlreadyRunningError:

        def update(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(BACKFILL_SCHEDULE_ID).update(update)


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGINT/SIGTERM when run as a process)."""
    settings.require_stripe()
    settings.require_notify()
    if settings.stripe_activities_per_second is not None:
        log.warning(
            "STRIPE_ACTIVITIES_PER_SECOND is deprecated and ignored: the worker limits "
            "Stripe requests, not activities; set STRIPE_REQUESTS_PER_SECOND instead",
            extra={"stripe_requests_per_second": settings.stripe_requests_per_second},
        )
    runtime = worker_runtime(settings)
    client = await connect_client(settings, runtime=runtime)
    engine = worker_engine(settings)
    budget = request_budget(settings)
    stripe_client = make_stripe_client(
        settings.stripe_secret_key,
        api_base=settings.stripe_api_base,
        # A dropped connection or a 5xx is retried at once (every POST carries an
        # idempotency key), each try with its own slot of the budget.
        max_network_retries=STRIPE_NETWORK_RETRIES,
        budget=budget,
        metrics=StripeRequestMetrics(runtime.metric_meter if runtime else None),
    )
    stop = stop or asyncio.Event()
    await ensure_backfill_schedule(client, settings)
    session_factory = make_session_factory(engine)
    with ThreadPoolExecutor(max_workers=DB_ACTIVITY_THREADS) as executor:
        workers = build_workers(client, settings, session_factory, stripe_client, executor)
        log.info(
            "worker started",
            extra={
                "task_queue": settings.temporal_task_queue,
                "temporal_address": client.service_client.config.target_host,
                "temporal_namespace": client.namespace,
                "stripe_requests_per_second": settings.stripe_requests_per_second,
                "metrics_port": settings.worker_metrics_port,
            },
        )
        try:
            async with notification_delivery(settings, session_factory):
                await asyncio.gather(*(w.run() for w in workers), _shutdown_on(stop, workers))
        finally:
            await budget.close()
            engine.dispose()


async def _shutdown_on(stop: asyncio.Event, workers: list[Worker]) -> None:
    await stop.wait()
    await asyncio.gather(*(w.shutdown() for w in workers))


async def run_until_signalled(settings: Settings) -> None:
    """Run the workers until SIGINT or SIGTERM, then shut them down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_worker(settings, stop=stop)


def main() -> None:
    from billing.logging import configure_logging

    configure_logging("INFO")
    settings = get_settings()
    try:
        settings.require_stripe()
        settings.require_notify()
    except (StripeNotConfiguredError, NotifyNotConfiguredError) as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        asyncio.run(run_until_signalled(settings))
    except TemporalUnavailableError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
