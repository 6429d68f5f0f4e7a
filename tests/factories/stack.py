"""Building blocks for tests that run the real worker against the real services."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHistory

from activities.stripe_activities import StripeActivities
from billing.config import Settings
from billing.constants import org_workflow_id
from billing.db import orgs
from billing.domain import BillingStatus, OrgBillingState
from billing.orchestration import query_state
from billing.stripe_gateway import make_stripe_client
from worker import STRIPE_NETWORK_RETRIES, build_workers, notification_delivery, request_budget

T = TypeVar("T")


def make_settings(
    *,
    database_url: str,
    emulator_url: str,
    task_queue: str,
    catalog: dict[str, str],
    **overrides: object,
) -> Settings:
    """Settings for one test: explicit values, so the developer's environment never leaks in."""
    values: dict[str, object] = {
        "database_url": database_url,
        "temporal_task_queue": task_queue,
        "stripe_secret_key": "sk_test_billing",
        "stripe_webhook_secret": "whsec_test",
        "stripe_api_base": emulator_url,
        "auth_jwt_secret": "stack-tests-jwt-secret-0123456789abcdef",
        "stripe_requests_per_second": 500.0,
        **catalog,
        **overrides,
    }
    return Settings.model_validate(values)


@contextlib.asynccontextmanager
async def running_worker(
    client: Client,
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    stripe_activities: StripeActivities | None = None,
) -> AsyncIterator[None]:
    """The production worker wiring (`worker.build_workers`, the shared request budget),
    in this process."""
    budget = request_budget(settings)
    stripe_client = make_stripe_client(
        settings.stripe_secret_key,
        api_base=settings.stripe_api_base,
        max_network_retries=STRIPE_NETWORK_RETRIES,
        budget=budget,
    )
    with ThreadPoolExecutor(max_workers=8) as executor:
        workers = build_workers(
            client,
            settings,
            session_factory,
            stripe_client,
            executor,
            stripe_activities=stripe_activities,
        )
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(budget.close)
            for w in workers:
                await stack.enter_async_context(w)
            await stack.enter_async_context(notification_delivery(settings, session_factory))
            yield


def create_org(
    session_factory: sessionmaker[Session],
    *,
    name: str = "Acme",
    owner_email: str | None = None,
    first_name: str = "Ada",
    last_name: str = "Lovelace",
    aws_account_id: str | None = None,
    azure_subscription_id: str | None = None,
) -> int:
    """An org with its owner, the way `billing orgs create` makes it."""
    with session_factory.begin() as session:
        org = orgs.create_org_with_owner(
            session,
            name=name,
            owner_email=owner_email or f"owner-{uuid.uuid4().hex[:8]}@example.com",
            owner_first_name=first_name,
            owner_last_name=last_name,
            aws_account_id=aws_account_id,
            azure_subscription_id=azure_subscription_id,
        )
        return org.id


async def eventually(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
) -> T:
    """Poll until `ok(probe())`; fail with the last value seen."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: object = None
    while True:
        try:
            value = await probe()
            if ok(value):
                return value
            last = value
        except Exception as err:  # the thing polled may not exist yet
            last = err
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last seen: {last!r}")
        await asyncio.sleep(interval)


async def wait_for_status(
    client: Client, org_id: int, statuses: set[BillingStatus], timeout: float = 30.0
) -> OrgBillingState:
    return await eventually(
        lambda: query_state(client, org_id), lambda s: s.status in statuses, timeout=timeout
    )


def scheduled(activity_type: str) -> Callable[[WorkflowHistory], int]:
    """Scores a run by how many `activity_type` activities it scheduled."""

    def score(history: WorkflowHistory) -> int:
        return sum(
            1
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type
        )

    return score


def counted(event_type: EventType.ValueType) -> Callable[[WorkflowHistory], int]:
    """Scores a run by how many events of `event_type` it holds."""

    def score(history: WorkflowHistory) -> int:
        return sum(1 for e in history.events if e.event_type == event_type)

    return score


async def capture_history(
    client: Client,
    workflow_id: str,
    name: str,
    *,
    run_id: str | None = None,
    pick: Callable[[WorkflowHistory], int] | None = None,
) -> None:
    """Save a run's history for the replay test when BILLING_CAPTURE_HISTORIES=1.

    The latest run by default; `run_id` names another, and `pick` takes the run
    it scores highest (the one that did the work, before it continued as new).
    """
    import os
    from pathlib import Path

    if os.environ.get("BILLING_CAPTURE_HISTORIES") != "1":
        return
    if pick is not None:
        runs = [wf.run_id async for wf in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
        histories = [
            await client.get_workflow_handle(workflow_id, run_id=run).fetch_history()
            for run in runs
        ]
        history = max(histories, key=pick)
        assert pick(history) > 0, f"no run of {workflow_id} is worth saving as {name}"
    else:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    target = Path(__file__).resolve().parent.parent / "histories" / f"{name}.json"
    target.write_text(history.to_json())


async def current_details(client: Client, org_id: int) -> str:
    """What the Temporal UI shows as the org workflow's current details (a query)."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    metadata: WorkflowMetadata = await handle.query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return str(metadata.current_details)
