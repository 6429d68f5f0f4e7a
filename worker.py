"""The worker's composition root: builds the engine, the Stripe client and the
Temporal client, and runs every workflow and activity.

Two workers share one process: the main task queue (workflows, DB activities)
and `<queue>-stripe`, whose activities are rate-limited worker-side so a backfill
of thousands of orgs stays under Stripe's limits.

The DB activities are synchronous: each runs on a thread of the activity
executor with a pooled connection. The main worker takes at most as many
activities as the executor has threads, and the pool has a connection per
thread, so an accepted activity starts at once instead of queueing behind the
others until its start-to-close timeout fires.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
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
from billing.orchestration import tuning_of
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
            starter.start_org_workflows,
        ],
        activity_executor=executor,
        max_concurrent_activities=executor._max_workers,
    )
    stripe_worker = Worker(
        client,
        task_queue=stripe_task_queue(settings.temporal_task_queue),
        activities=[
            stripe_activities.ensure_customer,
            stripe_activities.own_customer,
            stripe_activities.ensure_subscription,
            stripe_activities.fetch_subscription,
            stripe_activities.cancel_at_period_end,
            stripe_activities.send_meter_event,
        ],
        max_task_queue_activities_per_second=settings.stripe_activities_per_second,
    )
    return [main, stripe_worker]


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
    client = await connect_client(settings)
    engine = worker_engine(settings)
    stripe_client = make_stripe_client(
        settings.stripe_secret_key, api_base=settings.stripe_api_base
    )
    stop = stop or asyncio.Event()
    await ensure_backfill_schedule(client, settings)
    with ThreadPoolExecutor(max_workers=DB_ACTIVITY_THREADS) as executor:
        workers = build_workers(
            client, settings, make_session_factory(engine), stripe_client, executor
        )
        log.info(
            "worker started",
            extra={
                "task_queue": settings.temporal_task_queue,
                "temporal_address": client.service_client.config.target_host,
                "temporal_namespace": client.namespace,
            },
        )
        try:
            await asyncio.gather(*(w.run() for w in workers), _shutdown_on(stop, workers))
        finally:
            engine.dispose()


async def _shutdown_on(stop: asyncio.Event, workers: list[Worker]) -> None:
    await stop.wait()
    await asyncio.gather(*(w.shutdown() for w in workers))


def main() -> None:
    from billing.logging import configure_logging

    configure_logging("INFO")
    settings = get_settings()
    try:
        settings.require_stripe()
    except StripeNotConfiguredError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop=stop)

    try:
        asyncio.run(_run())
    except TemporalUnavailableError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
