"""`billing adopt`: orgs the legacy implementation billed, adopted without billing twice.

The whole product runs (API, worker, emulator with a test clock, Temporal dev
server); the legacy implementation's customer, subscription and meter events
are made in the emulator the way it made them, and `billing adopt` runs as the
operator runs it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner, Result

from billing.config import Settings
from billing.db import orgs
from billing.db.models import Org, UsageLedger
from billing.domain import BillingStatus, SubscriptionStatus
from billing.orchestration import query_state
from stripe_emulator.server import EmulatorServer
from tests.api.support import workflow_exists
from tests.factories.live import LiveStack, live_stack
from tests.factories.stack import create_org, eventually, wait_for_status
from tooling.cli.main import app

pytestmark = pytest.mark.asyncio
LEGACY_SOURCE = "flotorch_console"

USERS = "additional_users"
REQUESTS = "additional_requests"


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def record(stack: LiveStack, org_id: int, count: int, when: int) -> None:
    with stack.session_factory.begin() as session:
        orgs.record_requests(session, org_id, count, at(when))


def period_of(stack: LiveStack, sub_id: str) -> tuple[int, int]:
    item = stack.subscription(sub_id)["items"].data[0]
    return int(item.current_period_start), int(item.current_period_end)


async def finish_period(stack: LiveStack, org_id: int, sub_id: str) -> None:
    """Cross the period end, let the final report land, then let the invoice finalize."""
    start, end = period_of(stack, sub_id)
    await stack.advance(end + 300)

    async def reported() -> list[UsageLedger]:
        with stack.session_factory() as session:
            return list(
                session.scalars(
                    select(UsageLedger).where(
                        UsageLedger.org_id == org_id, UsageLedger.period_start == at(start)
                    )
                )
            )

    await eventually(
        reported,
        lambda rows: (
            {r.dimension for r in rows} >= {USERS} and all(r.status == "sent" for r in rows)
        ),
        timeout=30,
    )
    await stack.advance(end + 2 * 3600)


def invoice_quantities(stack: LiveStack, sub_id: str, period_start: int) -> dict[str, int]:
    """Metered quantities billed for the period starting at `period_start`."""
    prices = {
        stack.settings.stripe_users_price_id: USERS,
        stack.settings.stripe_requests_price_id: REQUESTS,
    }
    found: dict[str, int] = {}
    for invoice in stack.stripe.v1.invoices.list({"subscription": sub_id, "limit": 100}).data:
        data = invoice.to_dict()
        if data["status"] == "draft":
            continue
        for line in data["lines"]["data"]:
            price = line["pricing"]["price_details"]["price"]
            if price in prices and line["period"]["start"] == period_start:
                found[prices[price]] = line["quantity"]
    return found


def meter_total(stack: LiveStack, customer_id: str, event_name: str, start: int, end: int) -> float:
    meter = next(
        m for m in stack.stripe.v1.billing.meters.list().data if m.event_name == event_name
    )
    summaries = stack.stripe.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer_id, "start_time": start, "end_time": end}
    )
    return float(sum(s.aggregated_value for s in summaries.data))


@pytest_asyncio.fixture
async def stack(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[LiveStack]:
    async with live_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
    ) as live:
        yield live


def cli_env(stack: LiveStack, home: Path) -> dict[str, str | None]:
    """The stack's settings as the environment of a `billing` command, nothing else."""
    env: dict[str, str | None] = dict.fromkeys(name.upper() for name in Settings.model_fields)
    env.update(stack.settings.environment())
    env["TEMPORAL_ADDRESS"] = stack.client.service_client.config.target_host
    env["BILLING_HOME"] = str(home)
    env["COLUMNS"] = "300"
    return env


async def billing(stack: LiveStack, home: Path, *args: str) -> Result:
    """`billing ARGS` in-process, off the event loop (the command runs its own)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, list(args), env=cli_env(stack, home), catch_exceptions=False
    )


async def legacy_org(
    stack: LiveStack, *, org_uid_in_stripe: str | None = None, webhooks_reach_us: bool = True
) -> tuple[int, str, str]:
    """An org as the legacy implementation left it: its customer (legacy metadata), an
    active subscription on our prices, and both ids in the org row.

    With `webhooks_reach_us`, the org row names the customer before the
    subscription is made, so the subscription's webhooks start the org's
    workflow, whose provisioning refuses the not-yet-adopted customer and waits.
    Otherwise every webhook is delivered (unroutable) before the row names them.
    """
    org_id = create_org(stack.session_factory)
    with stack.session_factory() as session:
        org = session.get(Org, org_id)
        assert org is not None
        uid = org.uid
    s = stack.settings
    customer = stack.stripe.v1.customers.create(
        {
            "name": f"Ada Lovelace (Legacy {org_id})",
            "email": f"owner-{org_id}@example.com",
            "metadata": {
                "orgId": str(org_id),
                "orgUid": org_uid_in_stripe or uid,
                "source": LEGACY_SOURCE,
            },
            "test_clock": stack.clock_id,
        }
    )
    stack.attach_card(customer.id, "pm_card_visa")
    if webhooks_reach_us:
        set_row(stack, org_id, customer_id=customer.id)
    sub = stack.stripe.v1.subscriptions.create(
        {
            "customer": customer.id,
            "items": [
                {"price": s.stripe_price_id},
                {"price": s.stripe_users_price_id},
                {"price": s.stripe_requests_price_id},
            ],
            "metadata": {"orgId": str(org_id), "source": LEGACY_SOURCE},
        }
    )
    assert sub.status == "active"
    # Off the event loop: the API that receives them shares it.
    assert await asyncio.to_thread(stack.emulator.wait_for_webhooks, 30)
    set_row(stack, org_id, customer_id=customer.id, subscription_id=sub.id)
    return org_id, customer.id, sub.id


def set_row(
    stack: LiveStack, org_id: int, *, customer_id: str, subscription_id: str | None = None
) -> None:
    with stack.session_factory.begin() as session:
        row = session.get(Org, org_id)
        assert row is not None
        row.stripe_customer_id = customer_id
        if subscription_id:
            row.stripe_subscription_id = subscription_id
            row.subscription_status = SubscriptionStatus.ACTIVE


def legacy_report(stack: LiveStack, org_id: int, customer_id: str, value: int, ts: int) -> None:
    """A meter event as the legacy implementation sent it (its own identifier format)."""
    stack.stripe.v1.billing.meter_events.create(
        {
            "event_name": REQUESTS,
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": f"requests-{org_id}-{ts}",
            "timestamp": ts,
        }
    )


def ledger_rows(stack: LiveStack, org_id: int) -> list[tuple[str, int, int, str]]:
    with stack.session_factory() as session:
        rows = session.scalars(
            select(UsageLedger)
            .where(UsageLedger.org_id == org_id)
            .order_by(UsageLedger.period_start, UsageLedger.dimension, UsageLedger.seq)
        )
        return [(r.dimension, r.seq, r.value, r.status) for r in rows]


def metadata(stack: LiveStack, customer_id: str) -> dict[str, str]:
    found: dict[str, str] = stack.stripe.v1.customers.retrieve(customer_id).to_dict()["metadata"]
    return found


def only_line(result: Result, org_id: int) -> dict[str, Any]:
    report = json.loads(result.stdout)
    lines = [line for line in report["orgs"] if line["org_id"] == org_id]
    assert len(lines) == 1, report
    line: dict[str, Any] = lines[0]
    return line


async def test_a_legacy_org_is_adopted_and_its_period_is_billed_once(
    stack: LiveStack, tmp_path: Path
) -> None:
    org_id, customer_id, sub_id = await legacy_org(stack)
    # The legacy subscription's webhooks started the org's workflow, which refused
    # the customer (not provably the org's until adopted): nothing was reported.
    waiting = await wait_for_status(stack.client, org_id, {BillingStatus.PROVISIONING_FAILED})
    assert waiting.refused_adoptions and waiting.stripe_subscription_id is None
    start, end = period_of(stack, sub_id)
    now = stack.clock_time()
    # The legacy implementation reported 42 of the period's requests; the request
    # log (the console's table) holds them too.
    legacy_report(stack, org_id, customer_id, 30, now)
    legacy_report(stack, org_id, customer_id, 12, now + 1)
    record(stack, org_id, 42, now)
    before = metadata(stack, customer_id)

    # The dry run reads and reports, and changes nothing.
    dry = await billing(stack, tmp_path, "adopt", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    line = only_line(dry, org_id)
    assert line["outcome"] == "would_adopt"
    assert line["metadata_added"] == {"org_id": str(org_id), "org_uid": stack.org(org_id).uid}
    assert line["requests_already_reported"] == 42
    assert line["requests_recorded_as_reported"] == 42
    assert (line["workflow_started"], line["workflow_waiting"]) == (False, True)
    assert metadata(stack, customer_id) == before
    assert ledger_rows(stack, org_id) == []
    assert (await query_state(stack.client, org_id)).status == BillingStatus.PROVISIONING_FAILED

    human = await billing(stack, tmp_path, "adopt", "--dry-run")
    assert human.exit_code == 0, human.output
    assert f"org {org_id}: would be adopted: customer {customer_id}" in human.stdout
    assert "42 requests already reported, 42 to record as reported" in human.stdout
    assert "waiting workflow would be asked to provision again" in " ".join(human.stdout.split())
    assert "Dry run, nothing changed: 1 would be adopted, 0 refused, 0 skipped." in human.stdout

    adopted = await billing(stack, tmp_path, "adopt", "--json")
    assert adopted.exit_code == 0, adopted.output
    line = only_line(adopted, org_id)
    assert (line["outcome"], line["workflow_started"]) == ("adopted", True)
    # The legacy keys stay; the current ones are added beside them.
    assert metadata(stack, customer_id) == {
        **before,
        "org_id": str(org_id),
        "org_uid": stack.org(org_id).uid,
    }
    assert ledger_rows(stack, org_id) == [(REQUESTS, 0, 42, "sent")]

    state = await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    assert (state.stripe_customer_id, state.stripe_subscription_id) == (customer_id, sub_id)
    # The refusal before adoption stays in the record; nothing needs a person now.
    assert state.refused_adoptions and state.problem is None
    await stack.settled(org_id)

    # Run again: the org's workflow synced it from Stripe; it is not looked at again.
    assert stack.org(org_id).stripe_synced_at is not None
    again = await billing(stack, tmp_path, "adopt", "--json")
    assert again.exit_code == 0, again.output
    assert [line["org_id"] for line in json.loads(again.stdout)["orgs"]] == []

    # After the switch the console records 8 more; the period's invoice bills 50, not 92.
    record(stack, org_id, 8, stack.clock_time() + 60)
    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 50}
    assert meter_total(stack, customer_id, REQUESTS, start, end) == 50
    rows = ledger_rows(stack, org_id)
    assert (REQUESTS, 0, 42, "sent") in rows
    assert sum(v for d, _, v, _ in rows if d == REQUESTS) == 50
    assert (await query_state(stack.client, org_id)).last_error is None


async def test_a_customer_not_provably_the_orgs_is_refused_and_left_alone(
    stack: LiveStack, tmp_path: Path
) -> None:
    org_id, customer_id, _ = await legacy_org(
        stack, org_uid_in_stripe="someone-else", webhooks_reach_us=False
    )
    before = metadata(stack, customer_id)

    moved_id, moved_customer, _ = await legacy_org(stack, webhooks_reach_us=False)
    with stack.session_factory.begin() as session:
        moved = session.get(Org, moved_id)
        assert moved is not None
        moved.aws_account_id = "123456789012"
    moved_before = metadata(stack, moved_customer)

    result = await billing(stack, tmp_path, "adopt")

    assert result.exit_code == 1
    assert f"org {moved_id}: refused (the org is billed through a marketplace" in result.stdout
    assert metadata(stack, moved_customer) == moved_before
    assert not await workflow_exists(stack.client, moved_id)
    assert f"org {org_id}: refused (customer {customer_id} is not provably the org's" in (
        result.stdout
    )
    assert result.stderr.strip().startswith(f"Error: 2 orgs could not be adopted (org {org_id}:")
    assert metadata(stack, customer_id) == before
    assert ledger_rows(stack, org_id) == []
    assert not await workflow_exists(stack.client, org_id)


async def test_a_legacy_org_without_a_workflow_gets_one_and_nothing_is_recorded_twice(
    stack: LiveStack, tmp_path: Path
) -> None:
    org_id, customer_id, sub_id = await legacy_org(stack, webhooks_reach_us=False)
    assert not await workflow_exists(stack.client, org_id)
    legacy_report(stack, org_id, customer_id, 7, stack.clock_time())

    adopted = await billing(stack, tmp_path, "adopt")
    assert adopted.exit_code == 0, adopted.output
    assert f"org {org_id}: adopted: customer {customer_id}" in adopted.stdout
    assert "7 requests already reported, 7 recorded as reported; workflow started" in (
        adopted.stdout
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
    assert state.stripe_subscription_id == sub_id
    assert ledger_rows(stack, org_id) == [(REQUESTS, 0, 7, "sent")]

    # The backfill runs the same step. An org whose workflow runs but has not
    # synced it yet (a webhook started it, say) is skipped, not adopted twice.
    with stack.session_factory.begin() as session:
        row = session.get(Org, org_id)
        assert row is not None
        row.stripe_synced_at = None
    backfill = await billing(stack, tmp_path, "backfill", "--json")
    assert backfill.exit_code == 0, backfill.output
    skipped = only_line_of(backfill.stdout, org_id)
    assert (skipped["outcome"], skipped["reason"]) == ("skipped", "its workflow is running")
    assert ledger_rows(stack, org_id) == [(REQUESTS, 0, 7, "sent")]


def only_line_of(stdout: str, org_id: int) -> dict[str, Any]:
    document = json.loads(stdout)
    lines = [line for line in document["adoption"]["orgs"] if line["org_id"] == org_id]
    assert len(lines) == 1, document
    line: dict[str, Any] = lines[0]
    return line
