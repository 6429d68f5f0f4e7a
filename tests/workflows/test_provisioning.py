"""Provisioning against the real dev server, Postgres and the emulator over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.models import EnsureSubscriptionInput, OwnCustomer
from activities.stripe_activities import StripeActivities
from billing.config import Settings
from billing.constants import PROVISION_MISSING_WORKFLOW, org_workflow_id
from billing.db import orgs
from billing.db.models import Org
from billing.domain import (
    BackfillInput,
    BackfillResult,
    BillingStatus,
    OrgProfile,
    SubscriptionSnapshot,
)
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from billing.search_attributes import BILLING_STATUS_KEY, ORG_ID_KEY, STRIPE_CUSTOMER_ID_KEY
from billing.stripe_gateway import StripeGateway, make_stripe_client
from stripe_emulator.server import EmulatorServer
from tests.factories.stack import (
    capture_history,
    create_org,
    eventually,
    make_settings,
    running_worker,
    wait_for_status,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture
def settings(
    database_url: str, emulator: EmulatorServer, task_queue: str, catalog: dict[str, str]
) -> Settings:
    return make_settings(
        database_url=database_url, emulator_url=emulator.url, task_queue=task_queue, catalog=catalog
    )


def customers_of(stripe_client: stripe.StripeClient, org_id: int) -> list[Any]:
    found = stripe_client.v1.customers.search({"query": f"metadata['org_id']:'{org_id}'"})
    return list(found.data)


def subscriptions_of(stripe_client: stripe.StripeClient, customer_id: str) -> list[Any]:
    subs = stripe_client.v1.subscriptions.list({"customer": customer_id, "status": "all"})
    return list(subs.data)


def org_row(session_factory: sessionmaker[Session], org_id: int) -> Org:
    with session_factory() as session:
        org = session.get(Org, org_id)
        assert org is not None
        return org


async def test_new_org_gets_one_customer_and_one_trialing_subscription(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    client = temporal_dev_env.client
    org_id = create_org(session_factory, name="Acme", owner_email="ada@acme.test")
    async with running_worker(client, settings, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(client, org_id, {BillingStatus.TRIALING})

    [customer] = customers_of(stripe_client, org_id)
    assert customer.email == "ada@acme.test"
    assert customer.name == "Ada Lovelace (Acme)"
    assert customer.metadata["org_id"] == str(org_id)
    assert customer.metadata["source"] == settings.billing_source
    assert customer.metadata["org_uid"] == org_row(session_factory, org_id).uid
    [sub] = subscriptions_of(stripe_client, customer.id)
    prices = sorted(item.price.id for item in sub["items"].data)
    assert prices == sorted(
        [
            settings.stripe_price_id,
            settings.stripe_users_price_id,
            settings.stripe_requests_price_id,
        ]
    )
    base = next(i for i in sub["items"].data if i.price.id == settings.stripe_price_id)
    assert base.quantity == 1
    assert sub.status == "trialing"
    assert sub.trial_end - sub.trial_start == settings.stripe_trial_days * 86400
    assert sub.metadata["org_id"] == str(org_id)

    row = org_row(session_factory, org_id)
    assert row.stripe_customer_id == customer.id
    assert row.stripe_subscription_id == sub.id
    assert row.subscription_status == "trialing"
    assert row.subscription_end is not None
    assert int(row.subscription_end.timestamp()) == sub.trial_end
    assert state.stripe_subscription_id == sub.id

    await capture_history(client, org_workflow_id(org_id), "provisioned_trialing")
    description = await client.get_workflow_handle(org_workflow_id(org_id)).describe()
    attrs = description.typed_search_attributes
    assert attrs.get(ORG_ID_KEY) == str(org_id)
    assert attrs.get(BILLING_STATUS_KEY) == "trialing"
    assert attrs.get(STRIPE_CUSTOMER_ID_KEY) == customer.id


async def test_crash_after_stripe_created_objects_leaves_exactly_one_of_each(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    """An attempt that created the customer and the subscription, then died, is replayed."""
    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    gateway = StripeGateway(
        make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base), settings
    )
    with session_factory() as session:
        profile = orgs.org_profile(session, org_id)
    # The lost attempt: the requests (and idempotency keys) the workflow makes,
    # nothing written to the DB.
    customer_id = await gateway.create_customer(profile)
    await gateway.create_subscription(customer_id, profile)
    assert org_row(session_factory, org_id).stripe_customer_id is None

    async with running_worker(client, settings, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        await wait_for_status(client, org_id, {BillingStatus.TRIALING})

    assert [c.id for c in customers_of(stripe_client, org_id)] == [customer_id]
    assert len(subscriptions_of(stripe_client, customer_id)) == 1
    assert org_row(session_factory, org_id).stripe_customer_id == customer_id


class CrashAfterStripe(StripeActivities):
    """Stripe did the work, then the activity died before reporting back (once each)."""

    crashes: ClassVar[list[str]] = []

    @activity.defn(name="stripe_own_customer")
    async def own_customer(self, org: OrgProfile) -> OwnCustomer:
        result = await super().own_customer(org)
        if "customer" not in self.crashes:
            self.crashes.append("customer")
            raise RuntimeError("worker lost after creating the customer")
        return result

    @activity.defn(name="stripe_ensure_subscription")
    async def ensure_subscription(self, data: EnsureSubscriptionInput) -> SubscriptionSnapshot:
        result = await super().ensure_subscription(data)
        if "subscription" not in self.crashes:
            self.crashes.append("subscription")
            raise RuntimeError("worker lost after creating the subscription")
        return result


async def test_activity_retry_after_stripe_created_objects_does_not_duplicate(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    CrashAfterStripe.crashes.clear()
    crashing = CrashAfterStripe(
        StripeGateway(
            make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base),
            settings,
        ),
        settings,
    )
    async with running_worker(client, settings, session_factory, stripe_activities=crashing):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        await wait_for_status(client, org_id, {BillingStatus.TRIALING})

    assert CrashAfterStripe.crashes == ["customer", "subscription"]
    [customer] = customers_of(stripe_client, org_id)
    assert len(subscriptions_of(stripe_client, customer.id)) == 1


async def test_stripe_faults_still_converge_without_duplicates(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
    emulator: EmulatorServer,
) -> None:
    client = temporal_dev_env.client
    org_ids = [create_org(session_factory, name=f"Org {i}") for i in range(5)]
    emulator.set_faults(error_rate_429=0.3, error_rate_500=0.2)
    async with running_worker(client, settings, session_factory):
        for org_id in org_ids:
            await start_org_workflow(
                client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
            )
        await asyncio.sleep(3)
        emulator.clear_faults()
        for org_id in org_ids:
            await wait_for_status(client, org_id, {BillingStatus.TRIALING}, timeout=90)
    for org_id in org_ids:
        [customer] = customers_of(stripe_client, org_id)
        assert len(subscriptions_of(stripe_client, customer.id)) == 1


async def test_bad_price_fails_visibly_and_a_fixed_setting_plus_signal_recovers(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    broken = settings.model_copy(update={"stripe_price_id": "price_does_not_exist"})
    async with running_worker(client, broken, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
    assert state.last_error is not None
    assert "price_does_not_exist" in state.last_error
    row = org_row(session_factory, org_id)
    assert row.stripe_subscription_id is None
    description = await client.get_workflow_handle(org_workflow_id(org_id)).describe()
    assert description.typed_search_attributes.get(BILLING_STATUS_KEY) == "provisioning_failed"

    async with running_worker(client, settings, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(client, org_id, {BillingStatus.TRIALING})
    assert state.last_error is None
    [customer] = customers_of(stripe_client, org_id)
    assert len(subscriptions_of(stripe_client, customer.id)) == 1
    assert org_row(session_factory, org_id).stripe_subscription_id is not None


async def test_a_fixed_price_after_a_failed_provisioning_provisions_under_a_new_key(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
    emulator: EmulatorServer,
) -> None:
    """Stripe may keep the failed request's answer under its key: the fix is a new intent."""
    emulator.state.settings.idempotency_saves_missing_resources = True
    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    broken = settings.model_copy(update={"stripe_price_id": "price_does_not_exist"})
    async with running_worker(client, broken, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
    assert state.last_error is not None and "price_does_not_exist" in state.last_error

    async with running_worker(client, settings, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await eventually(
            lambda: query_state(client, org_id),
            lambda s: s.status is BillingStatus.TRIALING or "Idempotency" in (s.last_error or ""),
        )
    assert state.status is BillingStatus.TRIALING, state.last_error
    [customer] = customers_of(stripe_client, org_id)
    [sub] = subscriptions_of(stripe_client, customer.id)
    assert settings.stripe_price_id in {item.price.id for item in sub["items"].data}


async def test_marketplace_orgs_are_never_billed_through_stripe(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    client = temporal_dev_env.client
    aws = create_org(session_factory, aws_account_id="123456789012")
    azure = create_org(session_factory, azure_subscription_id="sub-azure-1")
    async with running_worker(client, settings, session_factory):
        for org_id in (aws, azure):
            await start_org_workflow(
                client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
            )
            await wait_for_status(client, org_id, {BillingStatus.NOT_BILLED})
    for org_id in (aws, azure):
        assert customers_of(stripe_client, org_id) == []
        assert org_row(session_factory, org_id).stripe_subscription_id is None


async def test_backfill_provisions_each_org_once_and_a_second_run_changes_nothing(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    client = temporal_dev_env.client
    billed = [create_org(session_factory, name=f"Org {i}") for i in range(200)]
    marketplace = [create_org(session_factory, aws_account_id=f"aws-{i}") for i in range(5)] + [
        create_org(session_factory, azure_subscription_id=f"az-{i}") for i in range(5)
    ]

    async def run_backfill(client: Client) -> BackfillResult:
        result: BackfillResult = await client.execute_workflow(
            PROVISION_MISSING_WORKFLOW,
            BackfillInput(page_size=50),
            id=f"backfill-{settings.temporal_task_queue}",
            task_queue=settings.temporal_task_queue,
            result_type=BackfillResult,
        )
        return result

    async with running_worker(client, settings, session_factory):
        first = await run_backfill(client)
        assert first.started == 200

        def provisioned() -> int:
            with session_factory() as session:
                rows = session.scalars(
                    select(Org.id).where(
                        Org.id.in_(billed), Org.stripe_subscription_id.is_not(None)
                    )
                ).all()
                return len(rows)

        async def count() -> int:
            return provisioned()

        await eventually(count, lambda n: n == 200, timeout=180, interval=1)
        second = await run_backfill(client)
        assert second.started == 0
        await capture_history(client, f"backfill-{settings.temporal_task_queue}", "backfill")
        state = await query_state(client, billed[0])
        assert state.status == BillingStatus.TRIALING

    customers = list(stripe_client.v1.customers.list({"limit": 100}).auto_paging_iter())
    assert len(customers) == 200
    assert sorted(int(c.to_dict()["metadata"]["org_id"]) for c in customers) == sorted(billed)
    subs = list(
        stripe_client.v1.subscriptions.list({"status": "all", "limit": 100}).auto_paging_iter()
    )
    assert len(subs) == 200
    for org_id in marketplace:
        assert customers_of(stripe_client, org_id) == []


async def test_the_backfill_schedule_is_created_once_and_provisions_missing_orgs(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    from temporalio.client import ScheduleActionStartWorkflow

    from billing.constants import BACKFILL_SCHEDULE_ID
    from worker import ensure_backfill_schedule

    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    await ensure_backfill_schedule(client, settings)
    slower = settings.model_copy(update={"backfill_interval_seconds": 600})
    await ensure_backfill_schedule(client, slower)  # a restart with a new interval

    handle = client.get_schedule_handle(BACKFILL_SCHEDULE_ID)
    description = await handle.describe()
    action = description.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert action.workflow == PROVISION_MISSING_WORKFLOW
    assert action.task_queue == settings.temporal_task_queue
    assert [i.every.total_seconds() for i in description.schedule.spec.intervals] == [600]

    async with running_worker(client, settings, session_factory):
        await handle.trigger()
        await wait_for_status(client, org_id, {BillingStatus.TRIALING})
    [customer] = customers_of(stripe_client, org_id)
    assert len(subscriptions_of(stripe_client, customer.id)) == 1
    await handle.delete()


async def test_failed_provisioning_under_a_flood_of_events_continues_as_new(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    """Events keep coming while provisioning cannot succeed: the history stays bounded."""
    from temporalio.api.enums.v1 import EventType

    from billing.constants import ORG_BILLING_WORKFLOW
    from billing.domain import OrgBillingInput, OrgBillingTuning, StripeEventSignal
    from billing.orchestration import StartSignal

    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    broken = settings.model_copy(update={"stripe_price_id": "price_does_not_exist"})
    await client.start_workflow(
        ORG_BILLING_WORKFLOW,
        OrgBillingInput(org_id=org_id, tuning=OrgBillingTuning(max_history_events=60)),
        id=org_workflow_id(org_id),
        task_queue=settings.temporal_task_queue,
    )
    async with running_worker(client, broken, session_factory):
        await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
        for i in range(40):
            event = StripeEventSignal(
                event_id=f"evt_flood_{i}",
                type="customer.subscription.updated",
                created=1_800_000_000 + i,
                object_id="sub_unknown",
            )
            await start_org_workflow(
                client,
                settings.temporal_task_queue,
                org_id,
                signal=StartSignal.stripe_event(event),
            )
        await asyncio.sleep(3)
        state = await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
        runs = [
            wf.run_id
            async for wf in client.list_workflows(f"WorkflowId = '{org_workflow_id(org_id)}'")
        ]
        histories = [
            await client.get_workflow_handle(org_workflow_id(org_id), run_id=r).fetch_history()
            for r in runs
        ]
    assert len(histories) >= 2
    assert max(len(h.events) for h in histories) < 200
    attempts = sum(
        1
        for h in histories
        for e in h.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "db_load_org"
    )
    assert attempts <= len(histories) + 1  # one attempt per run, not a spin
    assert state.last_error
