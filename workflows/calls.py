"""Typed activity calls with the options every workflow uses, and refusals made values.

The activity reference (`DbActivities.load_org`) fixes the argument and result
types, so mypy checks each call; the options (timeouts, retries, task queue) are
stated here once. Changing them changes the commands a run produces, which the
saved histories in tests/histories/ would catch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.db_activities import DbActivities
    from activities.models import MarkSentInput, MeterEventToSend
    from activities.stripe_activities import StripeActivities
    from billing.constants import stripe_task_queue

A = TypeVar("A")
R = TypeVar("R")

DB_TIMEOUT = timedelta(seconds=30)
STRIPE_TIMEOUT = timedelta(seconds=30)
# Transient failures (Stripe 429/5xx, connection, DB down) retry with backoff for
# as long as it takes; errors retrying cannot fix are raised non-retryable.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)


async def db_activity(activity: Callable[[DbActivities, A], R], arg: A) -> R:
    """Run a DB activity on the workflow's own task queue."""
    return await workflow.execute_activity_method(
        activity, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=RETRY
    )


async def stripe_activity(activity: Callable[[StripeActivities, A], Awaitable[R]], arg: A) -> R:
    """Run a Stripe activity on the rate-limited Stripe task queue."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        task_queue=stripe_task_queue(workflow.info().task_queue),
        start_to_close_timeout=STRIPE_TIMEOUT,
        retry_policy=RETRY,
    )


async def send_meter_events(events: list[MeterEventToSend]) -> int:
    """Send usage to Stripe in order; returns how many events went through.

    What went through is marked sent even when a later event fails, so it is
    never sent again after Stripe's identifier dedupe window has passed.
    """
    sent: list[str] = []
    try:
        for event in events:
            await stripe_activity(StripeActivities.send_meter_event, event)
            sent.append(event.identifier)
    finally:
        if sent:
            await db_activity(DbActivities.mark_usage_sent, MarkSentInput(identifiers=sent))
    return len(sent)


@dataclass(frozen=True)
class Refused:
    """An activity failed with an error retrying cannot fix (Stripe said no, bad config).

    `kind` is the error's type (`StripeAuthenticationError`, `Conflict`, ...), so
    the workflow can tell a revoked key from a refused request.
    """

    message: str
    kind: str | None = None


async def unless_refused(work: Awaitable[R]) -> R | Refused:
    """Await `work`; a non-retryable failure comes back as `Refused`, anything else is raised.

    Since activities retry transient errors forever, `Refused` is the one
    failure a workflow handles: it keeps the message in its state instead of
    failing, and the org stays with its one writer.
    """
    try:
        return await work
    except ActivityError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.non_retryable:
            return Refused(cause.message, cause.type)
        raise
