"""provision, usage report, reconcile, backfill and live `orgs` views, with a real worker.

The worker runs in this process (the production wiring, `worker.build_workers`)
against the Temporal dev server, the emulator and the test database; the CLI
runs in a thread, as a user's second terminal would.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment
from typer.testing import Result

from billing.config import Settings
from stripe_emulator.server import EmulatorServer
from tests.cli.conftest import Invoke, assert_clean_error, closed_port
from tests.factories.stack import make_settings, running_worker

pytestmark = [pytest.mark.devserver, pytest.mark.usefixtures("fresh_org_ids")]


@pytest.fixture
def settings(
    database_url: str, emulator: EmulatorServer, task_queue: str, catalog: dict[str, str]
) -> Settings:
    return make_settings(
        database_url=database_url,
        emulator_url=emulator.url,
        task_queue=task_queue,
        catalog=catalog,
    )


@pytest.fixture
def stack_env(settings: Settings, temporal_dev_env: WorkflowEnvironment) -> dict[str, str | None]:
    """What `billing dev` would have written to settings.env for this stack."""
    values: dict[str, Any] = settings.model_dump()
    env = {key.upper(): str(value) for key, value in values.items() if value is not None}
    env["TEMPORAL_ADDRESS"] = temporal_dev_env.client.service_client.config.target_host
    return dict(env)


async def cli(invoke: Invoke, env: dict[str, str | None], *args: str) -> Result:
    return await asyncio.to_thread(invoke, *args, env=env)


async def test_provision_report_reconcile_and_list(
    invoke: Invoke,
    stack_env: dict[str, str | None],
    settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    async with running_worker(temporal_dev_env.client, settings, session_factory):
        created = await cli(
            invoke,
            stack_env,
            "orgs",
            "create",
            "--name",
            "Acme",
            "--owner-email",
            "ada@acme.test",
            "--json",
        )
        org_id = str(json.loads(created.stdout)["org"]["id"])
        provisioned = await cli(invoke, stack_env, "provision", org_id, "--json")
        await cli(invoke, stack_env, "members", "add", org_id, "--email", "grace@acme.test")
        await cli(invoke, stack_env, "requests", "record", org_id, "--count", "40")
        reported = await cli(invoke, stack_env, "usage", "report", org_id, "--json")
        reconciled = await cli(invoke, stack_env, "reconcile", org_id, "--json")
        reconciled_all = await cli(invoke, stack_env, "reconcile", "--json")
        listed = await cli(invoke, stack_env, "orgs", "list", "--json")
        shown = await cli(invoke, stack_env, "orgs", "show", org_id, "--json")
        table = await cli(invoke, stack_env, "orgs", "list")

    assert provisioned.exit_code == 0, provisioned.output
    state = json.loads(provisioned.stdout)
    assert state["status"] == "trialing"
    assert state["stripe_customer_id"].startswith("cus_")

    assert reported.exit_code == 0, reported.output
    usage = json.loads(reported.stdout)
    assert usage["org_id"] == int(org_id)
    sent = [(p["users"], p["requests"]) for p in usage["periods"]]
    assert sent == [(2, 40)], usage
    assert usage["meter_events_sent"] >= 1

    assert reconciled.exit_code == 0, reconciled.output
    [result] = json.loads(reconciled.stdout)
    assert result["org_id"] == int(org_id) and result["status"] == "trialing"
    assert int(org_id) in [r["org_id"] for r in json.loads(reconciled_all.stdout)]

    [row] = json.loads(listed.stdout)
    assert row["billing"]["source"] == "workflow"
    assert row["billing"]["status"] == "trialing"
    assert row["billing"]["stripe_customer_id"] == state["stripe_customer_id"]
    assert json.loads(shown.stdout)["workflow"]["state"]["status"] == "trialing"
    assert "trialing" in table.stdout and "(db)" not in table.stdout


async def test_backfill_starts_orgs_created_while_temporal_was_down(
    invoke: Invoke,
    stack_env: dict[str, str | None],
    settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    offline = {**stack_env, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"}
    first = await cli(
        invoke,
        offline,
        "orgs",
        "create",
        "--name",
        "Acme",
        "--owner-email",
        "ada@acme.test",
        "--json",
    )
    await cli(
        invoke,
        offline,
        "orgs",
        "create",
        "--name",
        "Initech",
        "--owner-email",
        "bill@initech.test",
        "--aws-account-id",
        "1234",
    )
    org_id = json.loads(first.stdout)["org"]["id"]

    async with running_worker(temporal_dev_env.client, settings, session_factory):
        backfilled = await cli(invoke, stack_env, "backfill", "--json")
        provisioned = await cli(invoke, stack_env, "provision", str(org_id), "--json")

    assert backfilled.exit_code == 0, backfilled.output
    assert json.loads(backfilled.stdout) == {"started": [org_id], "failed": []}
    assert json.loads(provisioned.stdout)["status"] == "trialing"


async def test_workflow_commands_explain_what_is_missing(
    invoke: Invoke, stack_env: dict[str, str | None], temporal_dev_env: WorkflowEnvironment
) -> None:
    created = await cli(
        invoke,
        {**stack_env, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"},
        "orgs",
        "create",
        "--name",
        "Acme",
        "--owner-email",
        "ada@acme.test",
        "--json",
    )
    org_id = str(json.loads(created.stdout)["org"]["id"])

    no_workflow = await cli(invoke, stack_env, "usage", "report", org_id)
    unknown = await cli(invoke, stack_env, "provision", "999999999")
    offline = await cli(
        invoke, {**stack_env, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"}, "reconcile", org_id
    )
    no_worker = await cli(invoke, stack_env, "provision", org_id, "--timeout", "2")

    assert_clean_error(no_workflow, f"Org {org_id} has no running billing workflow")
    assert_clean_error(unknown, "Org 999999999 does not exist")
    assert_clean_error(offline, "Temporal is not reachable")
    assert_clean_error(no_worker, "still provisioning", "billing worker")
    await temporal_dev_env.client.get_workflow_handle(f"org-billing-{org_id}").terminate()


async def test_reconcile_all_reports_orgs_whose_worker_is_gone(
    invoke: Invoke,
    stack_env: dict[str, str | None],
    settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    orphan_queue = {**stack_env, "TEMPORAL_TASK_QUEUE": f"{settings.temporal_task_queue}-gone"}
    orphan = await cli(
        invoke,
        orphan_queue,
        "orgs",
        "create",
        "--name",
        "Orphan",
        "--owner-email",
        "o@orphan.test",
        "--json",
    )
    orphan_id = json.loads(orphan.stdout)["org"]["id"]
    async with running_worker(temporal_dev_env.client, settings, session_factory):
        served = await cli(
            invoke,
            stack_env,
            "orgs",
            "create",
            "--name",
            "Acme",
            "--owner-email",
            "ada@acme.test",
            "--json",
        )
        served_id = json.loads(served.stdout)["org"]["id"]
        await cli(invoke, stack_env, "provision", str(served_id))
        result = await cli(invoke, stack_env, "reconcile", "--timeout", "2", "--json")

    assert [r["org_id"] for r in json.loads(result.stdout)] == [served_id]
    assert_clean_error(
        result, "1 orgs could not be reconciled", f"org {orphan_id}", "did not answer"
    )
    await temporal_dev_env.client.get_workflow_handle(f"org-billing-{orphan_id}").terminate()
