"""`BillingProblem` is set while an org needs a person and unset once it is fixed.

Each case is made for real (a refused price, a restored row naming another
environment's customer, a declined card through dunning), looked up through
the dev server's visibility store the way an operator does, then fixed the way
the hint says; the workflow's current details (the Temporal UI's detail page)
say the same. Refused usage reports and failed events:
tests/workflows/test_usage_refusals.py.
"""

from __future__ import annotations

import uuid

import pytest
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from billing.config import Settings
from billing.constants import org_workflow_id
from billing.db.models import Org
from billing.domain import BillingProblem, BillingStatus
from billing.orchestration import RETRY_PROVISIONING, start_org_workflow
from billing.problems import PROBLEM_ORGS_QUERY, problem_help
from billing.search_attributes import BILLING_PROBLEM_KEY
from stripe_emulator.server import EmulatorServer
from tests.factories.live import LiveStack
from tests.factories.stack import (
    capture_history,
    create_org,
    current_details,
    eventually,
    make_settings,
    running_worker,
    wait_for_status,
)

pytestmark = pytest.mark.asyncio


async def listed_problems(client: Client) -> dict[str, str | None]:
    """Running org workflows with a problem, by id, as the operator's query finds them."""
    return {
        wf.id: wf.typed_search_attributes.get(BILLING_PROBLEM_KEY)
        async for wf in client.list_workflows(PROBLEM_ORGS_QUERY)
    }


async def shown(client: Client, org_id: int, problem: BillingProblem) -> None:
    """Listed with the code, and the details carry the code and the fix for this org."""
    workflow_id = org_workflow_id(org_id)
    await eventually(
        lambda: listed_problems(client), lambda found: found.get(workflow_id) == problem
    )
    details = await current_details(client, org_id)
    assert f"**{problem.value}**" in details
    assert problem_help(problem).fix_for(org_id) in details


async def cleared(client: Client, org_id: int) -> None:
    workflow_id = org_workflow_id(org_id)
    await eventually(lambda: listed_problems(client), lambda found: workflow_id not in found)
    description = await client.get_workflow_handle(workflow_id).describe()
    assert description.typed_search_attributes.get(BILLING_PROBLEM_KEY) is None
    details = await current_details(client, org_id)
    assert "problem" not in details and "fix" not in details


@pytest.fixture
def settings(
    database_url: str, emulator: EmulatorServer, task_queue: str, catalog: dict[str, str]
) -> Settings:
    return make_settings(
        database_url=database_url, emulator_url=emulator.url, task_queue=task_queue, catalog=catalog
    )


async def test_provisioning_failed_until_the_setting_is_fixed_and_provisioning_retried(
    temporal_dev_env: WorkflowEnvironment,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    client = temporal_dev_env.client
    org_id = create_org(session_factory)
    broken = settings.model_copy(update={"stripe_price_id": "price_does_not_exist"})
    async with running_worker(client, broken, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
        await shown(client, org_id, BillingProblem.PROVISIONING_FAILED)
        assert "price_does_not_exist" in await current_details(client, org_id)

    # The fix: a working setting, then `billing provision ORG_ID` (the same signal).
    async with running_worker(client, settings, session_factory):
        await start_org_workflow(
            client, settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        await wait_for_status(client, org_id, {BillingStatus.TRIALING})
        await cleared(client, org_id)
        assert (await current_details(client, org_id)).startswith("trialing, period to ")


async def test_adoption_refused_until_the_row_names_the_orgs_own_customer(
    stack: LiveStack,
) -> None:
    """A row restored from staging names staging's customer: never billed, and said so."""
    org_id = create_org(stack.session_factory)
    staging = stack.stripe.v1.customers.create(
        {
            "email": "ops@staging.test",
            "metadata": {"org_id": str(org_id), "org_uid": str(uuid.uuid4()), "source": "staging"},
        }
    )
    with stack.session_factory.begin() as session:
        row = session.get(Org, org_id)
        assert row is not None
        row.stripe_customer_id = staging.id
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.PROVISIONING_FAILED})
    assert state.problem is BillingProblem.ADOPTION_REFUSED
    await shown(stack.client, org_id, BillingProblem.ADOPTION_REFUSED)
    await capture_history(stack.client, org_workflow_id(org_id), "adoption_refused_problem")

    # The fix: the row no longer names staging's customer, then `billing provision`.
    with stack.session_factory.begin() as session:
        row = session.get(Org, org_id)
        assert row is not None
        row.stripe_customer_id = None
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id not in (None, staging.id) and state.problem is None
    await cleared(stack.client, org_id)


async def test_payment_failed_while_past_due_and_cleared_once_the_invoice_is_paid(
    stack: LiveStack,
) -> None:
    org_id = create_org(stack.session_factory)
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id and state.trial_end
    stack.attach_card(state.stripe_customer_id, "pm_card_chargeCustomerFail")
    await stack.settled(org_id)
    await cleared(stack.client, org_id)

    await stack.advance(int(state.trial_end.timestamp()) + 2 * 3600)
    await wait_for_status(stack.client, org_id, {BillingStatus.PAST_DUE})
    await shown(stack.client, org_id, BillingProblem.PAYMENT_FAILED)

    # The fix: the owner puts a working card in (the portal does this) and the
    # open invoice is paid (Stripe's next dunning attempt, or now).
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    invoices = stack.stripe.v1.invoices.list(
        {"customer": state.stripe_customer_id, "status": "open"}
    )
    assert invoices.data
    for invoice in invoices.data:
        assert invoice.id
        stack.stripe.v1.invoices.pay(invoice.id)
    await stack.settled(org_id)
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    await cleared(stack.client, org_id)


async def test_the_problem_query_lists_only_running_orgs_that_need_a_person(
    stack: LiveStack, stripe_client: stripe.StripeClient
) -> None:
    """A healthy org beside a stuck one: only the stuck one is listed."""
    healthy = create_org(stack.session_factory)
    stuck = create_org(stack.session_factory)
    with stack.session_factory.begin() as session:
        row = session.get(Org, stuck)
        assert row is not None
        row.stripe_customer_id = stripe_client.v1.customers.create(
            {"metadata": {"org_id": str(stuck), "org_uid": str(uuid.uuid4()), "source": "x"}}
        ).id
    for org_id in (healthy, stuck):
        await start_org_workflow(
            stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
    await wait_for_status(stack.client, healthy, {BillingStatus.TRIALING})
    await shown(stack.client, stuck, BillingProblem.ADOPTION_REFUSED)
    found = await listed_problems(stack.client)
    assert org_workflow_id(healthy) not in found
    assert found[org_workflow_id(stuck)] == BillingProblem.ADOPTION_REFUSED
    # The form of the query works on the same visibility store.
    also = {wf.id async for wf in stack.client.list_workflows("BillingProblem != ''")}
    assert org_workflow_id(stuck) in also and org_workflow_id(healthy) not in also
