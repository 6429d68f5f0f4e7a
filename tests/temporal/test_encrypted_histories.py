"""With `BILLING_ENCRYPTION_KEYS` set, Temporal holds ciphertext; operators still read it.

The live stack runs encrypted (worker, API, the test's client): an org
provisions and its Stripe webhooks arrive. The raw history, as anyone with
access to the namespace would fetch it, holds no owner email, org name or
Stripe id outside the `StripeCustomerId` search attribute, which the contract
keeps searchable; the codec server, and the `temporal` CLI through it, decode
it. Keys rotate without breaking old runs, and a wrong key is named.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from google.protobuf import json_format
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.common.v1 import Payload, Payloads, SearchAttributes
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from billing.config import Settings
from billing.constants import RECONCILE_UPDATE, org_workflow_id
from billing.domain import BillingStatus, ReconcileResult
from billing.encryption import KEY_ID_METADATA, PayloadDecryptionError, new_key_entry
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from billing.search_attributes import SEARCH_ATTRIBUTES
from billing.temporal_client import connect_client, data_converter
from stripe_emulator.server import EmulatorServer
from tests.factories.live import LiveStack, free_port, live_stack
from tests.factories.stack import create_org, make_settings, running_worker, wait_for_status
from tooling.binaries import temporal_cli_path
from tooling.codec_server import check_startup, create_codec_app
from workflows import ALL_WORKFLOWS
from workflows.org_billing import NOT_BILLED_RECHECK, PROVABLE_ADOPTION

KID1 = new_key_entry("kid1")
KID2 = new_key_entry("kid2")
# Stripe object ids as Stripe (and the emulator) shape them.
STRIPE_ID = re.compile(rb"\b(cus|sub|si|evt|in|ii|pm|price|prod|bps|mtr|clock)_[A-Za-z0-9]{6,}")

PATCH_IDS = {NOT_BILLED_RECHECK, PROVABLE_ADOPTION}


def address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


async def encrypted_client(env: WorkflowEnvironment, keys: str) -> Client:
    return await connect_client(
        Settings.model_validate({"temporal_address": address(env), "billing_encryption_keys": keys})
    )


def _payloads(message: Any) -> Iterator[Payload]:
    """Every payload anywhere in a protobuf message."""
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            values = value.values()
        elif descriptor.is_repeated:
            values = value
        else:
            values = [value]
        for item in values:
            if hasattr(item, "ListFields"):
                yield from _payloads(item)


def _search_attributes(event: HistoryEvent) -> SearchAttributes | None:
    for field in (
        "workflow_execution_started_event_attributes",
        "upsert_workflow_search_attributes_event_attributes",
        "workflow_execution_continued_as_new_event_attributes",
    ):
        if event.HasField(field):
            attributes: SearchAttributes = getattr(event, field).search_attributes
            return attributes
    return None


def split_history(history: WorkflowHistory) -> tuple[bytes, dict[str, set[bytes]]]:
    """The raw history without its search attributes, and the search attributes apart."""
    rest = bytearray()
    attributes: dict[str, set[bytes]] = {}
    for original in history.events:
        event = HistoryEvent()
        event.CopyFrom(original)
        found = _search_attributes(event)
        if found is not None:
            for name, payload in found.indexed_fields.items():
                attributes.setdefault(name, set()).add(payload.data)
            found.Clear()
        rest += event.SerializeToString()
    return bytes(rest), attributes


def key_ids(*histories: WorkflowHistory) -> set[str]:
    return {
        payload.metadata[KEY_ID_METADATA].decode()
        for history in histories
        for event in history.events
        for payload in _payloads(event)
        if KEY_ID_METADATA in payload.metadata
    }


async def every_run(client: Client, org_id: int) -> list[tuple[str, WorkflowHistory]]:
    """Each run of the org's workflow (it continues as new), oldest first, as fetched raw."""
    workflow_id = org_workflow_id(org_id)
    runs = [
        (execution.start_time, execution.run_id)
        async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'")
    ]
    return [
        (run_id, await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history())
        for _, run_id in sorted(runs)
    ]


async def replay(history: WorkflowHistory, keys: str) -> None:
    converter = data_converter(Settings.model_validate({"billing_encryption_keys": keys}))
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=converter)
    await replayer.replay_workflow(history)


@contextlib.asynccontextmanager
async def encrypted_stack(
    env: WorkflowEnvironment, keys: str, **fixtures: Any
) -> AsyncIterator[LiveStack]:
    client = await encrypted_client(env, keys)
    async with live_stack(
        client,
        api_connects=True,
        temporal_address=address(env),
        billing_encryption_keys=keys,
        **fixtures,
    ) as stack:
        yield stack


async def test_histories_hold_no_personal_data_and_operators_still_read_them(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    tmp_path: Path,
) -> None:
    owner_email = "grace.hopper@encrypted.example"
    org_name = "Cobol Compilers Incorporated"
    keys = f"{KID2},{KID1}"
    async with encrypted_stack(
        temporal_dev_env,
        keys,
        emulator=emulator,
        stripe_client=stripe_client,
        session_factory=session_factory,
        database_url=database_url,
        task_queue=task_queue,
        catalog=catalog,
    ) as stack:
        org_id = create_org(
            session_factory, name=org_name, owner_email=owner_email, first_name="Grace"
        )
        await start_org_workflow(
            stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
        assert state.stripe_customer_id and state.stripe_subscription_id
        stack.attach_card(state.stripe_customer_id, "pm_card_visa")
        trial_end = stack.subscription(state.stripe_subscription_id).trial_end
        await stack.advance(trial_end + 2 * 3600)
        await stack.settled(org_id)
        await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})
        runs = await every_run(stack.client, org_id)

    histories = [history for _, history in runs]
    raw = b""
    attributes: dict[str, set[bytes]] = {}
    for history in histories:
        run_raw, run_attributes = split_history(history)
        raw += run_raw
        for name, values in run_attributes.items():
            attributes.setdefault(name, set()).update(values)
    customer = state.stripe_customer_id.encode()
    for secret in (owner_email.encode(), org_name.encode(), b"Grace", customer):
        assert secret not in raw, secret
    assert STRIPE_ID.search(raw) is None, STRIPE_ID.search(raw)
    assert key_ids(*histories) == {"kid2"}

    # Search attributes stay plaintext: only the documented three, none personal,
    # and Temporal's own TemporalChangeVersion, which lists the workflow's patch ids.
    changes = attributes.pop("TemporalChangeVersion", set())
    assert {p for v in changes for p in json.loads(v)} <= PATCH_IDS, changes
    assert set(attributes) <= set(SEARCH_ATTRIBUTES), attributes
    searchable = b" ".join(value for values in attributes.values() for value in values)
    assert owner_email.encode() not in searchable and org_name.encode() not in searchable
    assert b"Grace" not in searchable
    assert {json.loads(v) for v in attributes["OrgId"]} == {str(org_id)}
    assert {json.loads(v) for v in attributes["StripeCustomerId"]} == {state.stripe_customer_id}

    # The codec server gives back what the workflow saw.
    sealed = Payloads(
        payloads=[p for history in histories for event in history.events for p in _payloads(event)]
    )
    codec_settings = Settings.model_validate({"billing_encryption_keys": keys})
    app = create_codec_app(codec_settings, check_startup(codec_settings, "127.0.0.1"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as http:
        response = await http.post("/default/decode", json=json_format.MessageToDict(sealed))
    assert response.status_code == 200, response.text
    decoded = json_format.ParseDict(response.json(), Payloads())
    plain = b" ".join(p.data for p in decoded.payloads)
    assert owner_email.encode() in plain and org_name.encode() in plain
    assert customer in plain and state.stripe_subscription_id.encode() in plain

    # The `temporal` CLI reads the same history through `billing codec-server`.
    first_run = runs[0][0]
    await _temporal_cli_decodes(temporal_dev_env, org_id, first_run, keys, owner_email, tmp_path)

    # The encrypted histories replay on the current workflow code.
    for history in histories:
        await replay(history, keys)


async def _temporal_cli_decodes(
    env: WorkflowEnvironment,
    org_id: int,
    run_id: str,
    keys: str,
    owner_email: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    server_env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in {name.upper() for name in Settings.model_fields}
    }
    server_env.update({"BILLING_ENCRYPTION_KEYS": keys, "BILLING_HOME": str(tmp_path / "home")})
    server = subprocess.Popen(
        [sys.executable, "-m", "tooling.cli", "codec-server", "--port", str(port)],
        env=server_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{endpoint}/healthz")).status_code == 200:
                        break
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                await asyncio.sleep(0.05)

        async def show(*extra: str) -> str:
            process = await asyncio.create_subprocess_exec(
                temporal_cli_path(),
                "workflow",
                "show",
                "--workflow-id",
                org_workflow_id(org_id),
                "--run-id",
                run_id,
                "--address",
                address(env),
                "--output",
                "json",
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err.decode()
            return out.decode()

        assert owner_email.encode() not in _payload_data(await show())
        decoded = _payload_data(await show("--codec-endpoint", f"{endpoint}/default"))
        assert owner_email.encode() in decoded
    finally:
        server.terminate()
        server.wait(10)


def _payload_data(shown: str) -> bytes:
    """The payload bytes in `temporal workflow show --output json` (base64 `data` fields)."""
    found: list[bytes] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
                found.append(base64.b64decode(node["data"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(shown))
    assert found, "no payloads in the CLI's output"
    return b" ".join(found)


async def test_rotating_keys_keeps_old_runs_readable_and_replaying(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def settings(keys: str) -> Settings:
        return make_settings(
            database_url=database_url,
            emulator_url=emulator.url,
            task_queue=task_queue,
            catalog=catalog,
            temporal_address=address(temporal_dev_env),
            billing_encryption_keys=keys,
        )

    org_id = create_org(session_factory, name="Rotation GmbH")
    before = await connect_client(settings(KID1))
    async with running_worker(before, settings(KID1), session_factory):
        await start_org_workflow(before, task_queue, org_id, signal=RETRY_PROVISIONING)
        state = await wait_for_status(before, org_id, {BillingStatus.TRIALING})

    # A new key goes first; kid1 stays to decrypt what was written under it.
    rotated = await connect_client(settings(f"{KID2},{KID1}"))
    async with running_worker(rotated, settings(f"{KID2},{KID1}"), session_factory):
        handle = rotated.get_workflow_handle(org_workflow_id(org_id))
        result = await handle.execute_update(RECONCILE_UPDATE, result_type=ReconcileResult)
        assert result.differences == []
        after = await query_state(rotated, org_id)
        assert after.stripe_subscription_id == state.stripe_subscription_id

        histories = [history for _, history in await every_run(rotated, org_id)]
        assert key_ids(*histories) == {"kid1", "kid2"}
        for history in histories:
            await replay(history, f"{KID2},{KID1}")

        # Dropping kid1 too early fails the workflow task; the worker's log names the key.
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError) as caught:
            await replay(histories[0], KID2)
        assert "PayloadDecryptionError" in str(caught.value)
        assert (
            "A payload is encrypted with key 'kid1', which BILLING_ENCRYPTION_KEYS does not "
            "hold (it holds 'kid2')" in caplog.text
        )
        # So is a key under the right id that is not the right key.
        wrong = await encrypted_client(temporal_dev_env, f"{KID2},{new_key_entry('kid1')}")
        with pytest.raises(PayloadDecryptionError, match="key 'kid1'"):
            await _first_input(wrong, org_id)
        # A client still on the old keys cannot read what the new key wrote, and says so.
        with pytest.raises(PayloadDecryptionError, match="key 'kid2', which"):
            await query_state(await encrypted_client(temporal_dev_env, KID1), org_id)


async def _first_input(client: Client, org_id: int) -> object:
    """Decode the workflow's input as an operator's client would."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return await client.data_converter.decode(started.input.payloads)
