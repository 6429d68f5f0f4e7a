"""`billing orgs create | list | show` against the real database (Temporal down or up)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.constants import org_workflow_id
from billing.db.models import Membership, Org, User
from tests.cli.conftest import Invoke, assert_clean_error


def _create(invoke: Invoke, name: str = "Acme", email: str = "ada@acme.test", *extra: str) -> Any:
    result = invoke("orgs", "create", "--name", name, "--owner-email", email, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_create_makes_org_owner_and_membership_even_when_temporal_is_down(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    result = invoke(
        "orgs",
        "create",
        "--name",
        "Acme",
        "--owner-email",
        "Ada@Acme.test",
        "--owner-first-name",
        "Ada",
        "--owner-last-name",
        "Lovelace",
        "--json",
    )

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    org = document["org"]
    assert org["name"] == "Acme"
    assert org["owner_email"] == "ada@acme.test"
    assert uuid.UUID(org["uid"]).version == 4
    assert document["workflow"] == {
        "id": org_workflow_id(org["id"]),
        "started": False,
        "problem": document["workflow"]["problem"],
    }
    assert "Temporal is not reachable" in document["workflow"]["problem"]
    assert "billing-backfill" in result.stderr
    assert "Traceback" not in result.output
    with session_factory() as session:
        row = session.get(Org, org["id"])
        assert row is not None
        owner = session.scalar(select(User).where(User.email == "ada@acme.test"))
        assert owner is not None and owner.first_name == "Ada"
        membership = session.scalar(select(Membership).where(Membership.org_id == row.id))
        assert membership is not None and membership.role == "owner"


def test_create_records_marketplace_billing(invoke: Invoke) -> None:
    org = _create(invoke, "Initech", "bill@initech.test", "--aws-account-id", "123456789012")

    assert org["org"]["aws_account_id"] == "123456789012"
    listed = json.loads(invoke("orgs", "list", "--json").stdout)
    assert listed[0]["billing"]["status"] == "not_billed"


def test_a_second_org_with_the_same_name_and_owner_is_created_with_a_warning(
    invoke: Invoke,
) -> None:
    first = _create(invoke, "Acme", "ada@acme.test")["org"]["id"]
    other_owner = invoke("orgs", "create", "--name", "Acme", "--owner-email", "bob@acme.test")
    again = invoke("orgs", "create", "--name", "Acme", "--owner-email", "ADA@acme.test", "--json")

    assert other_owner.exit_code == 0 and "already has the name" not in other_owner.stderr
    assert again.exit_code == 0, again.output
    document = json.loads(again.stdout)
    assert document["same_name_and_owner"] == [first]
    assert document["org"]["id"] != first
    assert f"Warning: Org {first} already has the name 'Acme'" in again.stderr
    assert f"org {document['org']['id']} is a second one" in again.stderr
    assert len(json.loads(invoke("orgs", "list", "--json").stdout)) == 3


def test_create_rejects_a_bad_email(invoke: Invoke) -> None:
    result = invoke("orgs", "create", "--name", "Acme", "--owner-email", "not-an-email")

    assert_clean_error(result, "not an email address")


@pytest.mark.devserver
async def test_create_starts_the_org_workflow(
    invoke: Invoke, temporal_dev_env: WorkflowEnvironment, fresh_org_ids: None
) -> None:
    address = temporal_dev_env.client.service_client.config.target_host
    result = await asyncio.to_thread(
        invoke,
        "orgs",
        "create",
        "--name",
        "Acme",
        "--owner-email",
        "ada@acme.test",
        "--json",
        env={"TEMPORAL_ADDRESS": address, "TEMPORAL_TASK_QUEUE": f"cli-{uuid.uuid4().hex[:8]}"},
    )

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["workflow"]["started"] is True
    assert result.stderr == ""
    handle = temporal_dev_env.client.get_workflow_handle(document["workflow"]["id"])
    description = await handle.describe()
    assert description.workflow_type == "OrgBilling"
    await handle.terminate("test done")


def test_list_shows_db_rows_when_temporal_is_down(invoke: Invoke) -> None:
    _create(invoke, "Acme", "ada@acme.test")
    _create(invoke, "Globex", "hank@globex.test")

    table = invoke("orgs", "list")
    as_json = invoke("orgs", "list", "--json")

    assert table.exit_code == 0, table.output
    assert "Acme" in table.stdout and "Globex" in table.stdout
    assert "provisioning (db)" in table.stdout
    assert "Temporal is not reachable" in table.stderr
    rows = json.loads(as_json.stdout)
    assert [r["name"] for r in rows] == ["Acme", "Globex"]
    assert rows[0]["billing"]["source"] == "database"
    assert rows[0]["members"] == 1


def test_list_filters_by_status(invoke: Invoke) -> None:
    _create(invoke, "Acme", "ada@acme.test")
    _create(invoke, "Initech", "bill@initech.test", "--azure-subscription-id", "sub-1")

    rows = json.loads(invoke("orgs", "list", "--status", "not_billed", "--json").stdout)
    empty = invoke("orgs", "list", "--status", "past_due")

    assert [r["name"] for r in rows] == ["Initech"]
    assert empty.exit_code == 0
    assert "No orgs with status past_due." in empty.stdout


def test_list_refuses_an_unknown_status(invoke: Invoke) -> None:
    assert_clean_error(invoke("orgs", "list", "--status", "late"), "not a billing status")


def test_list_with_no_orgs(invoke: Invoke) -> None:
    result = invoke("orgs", "list", "--json")

    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_show_has_row_members_and_why_there_is_no_live_state(invoke: Invoke) -> None:
    org_id = _create(invoke, "Acme", "ada@acme.test")["org"]["id"]
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")

    table = invoke("orgs", "show", str(org_id))
    document = json.loads(invoke("orgs", "show", str(org_id), "--json").stdout)

    assert table.exit_code == 0, table.output
    assert "Acme" in table.stdout and "grace@acme.test" in table.stdout
    assert [m["email"] for m in document["members"]] == ["ada@acme.test", "grace@acme.test"]
    assert document["members"][0]["role"] == "owner"
    assert document["workflow"]["state"] is None
    assert document["workflow"]["unavailable_because"] == "Temporal is not reachable"


def test_show_unknown_org(invoke: Invoke) -> None:
    assert_clean_error(invoke("orgs", "show", "424242"), "Org 424242 does not exist")


def test_missing_tables_are_a_clear_error(invoke: Invoke, database_url: str) -> None:
    """A database that was never migrated: the error says to run `billing migrate`."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    empty = f"billing_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{empty}"')
    try:
        other = url.set(database=empty).render_as_string(hide_password=False)
        result = invoke("orgs", "list", env={"DATABASE_URL": other})
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
    assert_clean_error(result, "billing migrate")


def test_unreachable_database_is_a_clear_error(invoke: Invoke) -> None:
    result = invoke(
        "orgs",
        "list",
        env={"DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2"},
    )

    assert_clean_error(result, "database is not reachable")
    assert "start `billing dev`" in result.stderr


def test_unreachable_database_while_billing_dev_runs_says_to_wait(
    invoke: Invoke, cli_home: Path
) -> None:
    """`billing dev` starts a crashed Postgres again: telling the user to start it is wrong."""
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "billing", "dev"]
    )
    try:
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "dev.pid").write_text(str(stand_in.pid))
        result = invoke(
            "orgs", "list",
            env={"DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2"},
        )  # fmt: skip
    finally:
        stand_in.kill()
        stand_in.wait()

    assert_clean_error(result, "database is not reachable", "`billing dev` runs for", "try again")
    assert "start `billing dev`" not in result.stderr
