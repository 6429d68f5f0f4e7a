"""`billing orgs list --problem` and `billing orgs show` print the same code and fix.

A real worker with a price Stripe refuses leaves the org `provisioning_failed`;
the list reads it from Temporal's visibility (the `BillingProblem` search
attribute), `orgs show` from the workflow's state.
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
from billing.domain import BillingProblem, BillingStatus
from billing.problems import problem_help
from stripe_emulator.server import EmulatorServer
from tests.cli.conftest import Invoke, assert_clean_error, closed_port
from tests.factories.stack import make_settings, running_worker, wait_for_status

pytestmark = [pytest.mark.devserver, pytest.mark.usefixtures("fresh_org_ids")]


@pytest.fixture
def settings(
    database_url: str, emulator: EmulatorServer, task_queue: str, catalog: dict[str, str]
) -> Settings:
    return make_settings(
        database_url=database_url,
        emulator_url=emulator.url,
        task_queue=task_queue,
        catalog={**catalog, "stripe_price_id": "price_does_not_exist"},
    )


@pytest.fixture
def stack_env(settings: Settings, temporal_dev_env: WorkflowEnvironment) -> dict[str, str | None]:
    values: dict[str, Any] = settings.model_dump()
    env = {key.upper(): str(value) for key, value in values.items() if value is not None}
    env["TEMPORAL_ADDRESS"] = temporal_dev_env.client.service_client.config.target_host
    return dict(env)


async def cli(invoke: Invoke, env: dict[str, str | None], *args: str) -> Result:
    return await asyncio.to_thread(invoke, *args, env=env)


async def test_a_stuck_org_is_listed_and_shown_with_its_fix(
    invoke: Invoke,
    stack_env: dict[str, str | None],
    settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    client = temporal_dev_env.client
    async with running_worker(client, settings, session_factory):
        created = await cli(
            invoke, stack_env, "orgs", "create", "--name", "Acme", "--owner-email", "a@acme.test"
        )
        assert created.exit_code == 0, created.output
        org_id = int(created.stdout.split()[2])
        await wait_for_status(client, org_id, {BillingStatus.PROVISIONING_FAILED})
        fix = problem_help(BillingProblem.PROVISIONING_FAILED).fix_for(org_id)
        assert fix.endswith(f"`billing provision {org_id}`")

        async def listed() -> list[dict[str, Any]]:
            result = await cli(invoke, stack_env, "orgs", "list", "--problem", "--json")
            assert result.exit_code == 0, result.output
            return [o for o in json.loads(result.stdout) if o["id"] == org_id]

        for _ in range(50):
            found = await listed()
            if found:
                break
            await asyncio.sleep(0.2)
        assert found == [
            {
                "id": org_id,
                "name": "Acme",
                "workflow_id": f"org-billing-{org_id}",
                "status": "provisioning_failed",
                "problem": {
                    "code": "provisioning_failed",
                    "means": problem_help(BillingProblem.PROVISIONING_FAILED).means,
                    "fix": fix,
                },
            }
        ]
        table = await cli(invoke, stack_env, "orgs", "list", "--problem")
        only_active = await cli(
            invoke, stack_env, "orgs", "list", "--problem", "--status", "active"
        )
        shown = await cli(invoke, stack_env, "orgs", "show", str(org_id))
        shown_json = await cli(invoke, stack_env, "orgs", "show", str(org_id), "--json")

    assert f"{org_id} Acme" in table.stdout and "provisioning_failed" in table.stdout
    assert f"billing provision {org_id}" in table.stdout
    assert f"{org_id} Acme" not in only_active.stdout
    assert "Problem provisioning_failed: Stripe refused" in shown.stdout
    assert f"Fix: {fix}." in shown.stdout
    assert json.loads(shown_json.stdout)["problem"] == found[0]["problem"]


def test_listing_problems_needs_temporal(invoke: Invoke) -> None:
    result = invoke(
        "orgs", "list", "--problem", env={"TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"}
    )
    assert_clean_error(result, "visibility")
