"""The product over mutual TLS: a TLS-terminating proxy that wants a client certificate.

The proxy sits in front of the session's dev server (tests/factories/tls.py).
The whole stack runs through it: the worker and the test's client connect with
`connect_client`, the API builds its own client from the same settings, a
webhook goes from the emulator to the API to the workflow, and a portal opens.
Clients without the right certificate are refused with a sentence that says
what to fix, quickly, and `/readyz` repeats it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.auth import TokenRules, mint_token
from billing.config import Settings
from billing.db import orgs
from billing.domain import BillingStatus
from billing.orchestration import RETRY_PROVISIONING, start_org_workflow
from billing.temporal_client import TemporalConfigError, connect_client
from stripe_emulator.server import EmulatorServer
from tests.api.support import make_api_settings, serve
from tests.factories.live import live_stack
from tests.factories.stack import create_org, wait_for_status
from tests.factories.tls import SERVER_NAME, RefusingGrpcServer, TlsFiles, TlsProxy
from worker import run_worker

pytestmark = pytest.mark.asyncio

REFUSAL_WITHIN_SECONDS = 5.0


@pytest_asyncio.fixture
async def proxy(
    temporal_dev_env: WorkflowEnvironment, tls_files: TlsFiles
) -> AsyncIterator[TlsProxy]:
    proxy = TlsProxy(tls_files, temporal_dev_env.client.service_client.config.target_host)
    await proxy.start()
    yield proxy
    await proxy.stop()


def mtls(proxy: TlsProxy, files: TlsFiles) -> dict[str, Any]:
    """Settings fields for a deployment with a private CA and a client certificate."""
    return {
        "temporal_address": proxy.address,
        "temporal_tls_client_cert_path": str(files.client_cert),
        "temporal_tls_client_key_path": str(files.client_key),
        "temporal_tls_server_ca_cert_path": str(files.ca),
        "temporal_tls_server_name": SERVER_NAME,
    }


async def test_an_org_provisions_gets_its_webhooks_and_opens_a_portal_over_mtls(
    proxy: TlsProxy,
    tls_files: TlsFiles,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> None:
    fields = mtls(proxy, tls_files)
    client = await connect_client(Settings.model_validate(fields))
    async with (
        live_stack(
            client,
            emulator,
            stripe_client,
            session_factory,
            database_url,
            task_queue,
            catalog,
            api_connects=True,
            **fields,
        ) as stack,
        httpx.AsyncClient(base_url=stack.api_url) as http,
    ):
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text

        owner_email = "ada@tls.example"
        org_id = create_org(session_factory, name="Mutual TLS Ltd", owner_email=owner_email)
        await start_org_workflow(
            client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
        )
        state = await wait_for_status(client, org_id, {BillingStatus.TRIALING})
        assert state.stripe_customer_id and state.stripe_subscription_id

        # Stripe's webhooks go to the API, which signals the workflow through the proxy.
        stack.attach_card(state.stripe_customer_id, "pm_card_visa")
        trial_end = stack.subscription(state.stripe_subscription_id).trial_end
        await stack.advance(trial_end + 2 * 3600)
        await stack.settled(org_id)
        await wait_for_status(client, org_id, {BillingStatus.ACTIVE})

        with session_factory() as session:
            owner_id = orgs.find_user(session, owner_email).id
        token = mint_token(TokenRules.of(stack.settings), owner_id, org_id)
        portal = await http.post(
            "/api/payments/stripe/portal", headers={"Authorization": f"Bearer {token}"}
        )
        assert portal.status_code == 200, portal.text
        assert portal.json()["url"].startswith(emulator.url)

        billing = await http.get(
            f"/api/orgs/{org_id}/billing", headers={"Authorization": f"Bearer {token}"}
        )
        assert billing.status_code == 200, billing.text
        assert billing.json()["status"] == "active"
    # The test's client and the API's each came through the proxy.
    assert proxy.accepted >= 2


def _without(fields: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in names}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda f, files: _without(
                f, "temporal_tls_client_cert_path", "temporal_tls_client_key_path"
            ),
            "it requires a client certificate; set TEMPORAL_TLS_CLIENT_CERT_PATH and "
            "TEMPORAL_TLS_CLIENT_KEY_PATH",
        ),
        (
            lambda f, files: {
                **f,
                "temporal_tls_client_cert_path": str(files.untrusted_client_cert),
                "temporal_tls_client_key_path": str(files.untrusted_client_key),
            },
            "the server refused our client certificate",
        ),
        (
            lambda f, files: {**f, "temporal_tls_server_ca_cert_path": str(files.other_ca)},
            "the server's certificate is not signed by a CA this process trusts; set "
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
        ),
        (
            lambda f, files: {**f, "temporal_tls_server_name": "elsewhere.example"},
            "not valid for that name; set TEMPORAL_TLS_SERVER_NAME",
        ),
        (
            lambda f, files: {"temporal_address": f["temporal_address"]},
            "the server closed the connection; if it requires TLS set TEMPORAL_TLS=true",
        ),
    ],
    ids=["no-client-cert", "untrusted-client-cert", "unknown-server-ca", "wrong-name", "no-tls"],
)
async def test_a_refused_connection_says_what_to_fix(
    proxy: TlsProxy, tls_files: TlsFiles, change: object, expected: str
) -> None:
    fields = change(mtls(proxy, tls_files), tls_files)  # type: ignore[operator]
    started = time.monotonic()

    with pytest.raises(TemporalConfigError) as caught:
        await connect_client(Settings.model_validate(fields))

    message = str(caught.value)
    assert message.startswith(f"Temporal at {proxy.address} (namespace default, "), message
    assert expected in message, message
    assert "\n" not in message and "tonic" not in message, message
    assert time.monotonic() - started < REFUSAL_WITHIN_SECONDS


async def test_a_worker_without_the_client_certificate_is_refused(
    proxy: TlsProxy, tls_files: TlsFiles, database_url: str, tmp_path: Path
) -> None:
    fields = _without(
        mtls(proxy, tls_files), "temporal_tls_client_cert_path", "temporal_tls_client_key_path"
    )
    settings = make_api_settings(database_url=database_url, **fields)

    with pytest.raises(TemporalConfigError, match="requires a client certificate"):
        await asyncio.wait_for(run_worker(settings), REFUSAL_WITHIN_SECONDS)

    # `billing worker` as an operator runs it: one line on stderr, exit code 1.
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in {name.upper() for name in Settings.model_fields}
    }
    env.update({name.upper(): value for name, value in fields.items()})
    env.update(
        {
            "DATABASE_URL": database_url,
            "STRIPE_SECRET_KEY": "sk_test_tls",
            "STRIPE_WEBHOOK_SECRET": "whsec_tls",
            "BILLING_HOME": str(tmp_path / "home"),
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tooling.cli",
        "worker",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    message = stderr.decode().strip()
    assert process.returncode == 1, (stdout, message)
    assert message.startswith("Error: Temporal at "), message
    assert "it requires a client certificate" in message, message
    assert "Traceback" not in message and len(message.splitlines()) == 1, message


async def test_readyz_names_a_refused_configuration(
    proxy: TlsProxy, tls_files: TlsFiles, session_factory: sessionmaker[Session]
) -> None:
    fields = {**mtls(proxy, tls_files), "temporal_tls_server_ca_cert_path": str(tls_files.other_ca)}
    app = create_app(make_api_settings(**fields), session_factory=session_factory)

    async with serve(app) as http:
        response = await http.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["unavailable"] == ["temporal"]
    assert "not signed by a CA this process trusts" in body["checks"]["temporal"]


async def test_readyz_names_a_missing_certificate_file(
    proxy: TlsProxy, tls_files: TlsFiles, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    missing = tmp_path / "gone" / "client.pem"
    fields = {**mtls(proxy, tls_files), "temporal_tls_client_cert_path": str(missing)}
    app = create_app(make_api_settings(**fields), session_factory=session_factory)

    async with serve(app) as http:
        response = await http.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["temporal"] == (
        f"TEMPORAL_TLS_CLIENT_CERT_PATH names {missing}, which is not a file."
    )


@pytest_asyncio.fixture
async def refusing_server(tls_files: TlsFiles) -> AsyncIterator[RefusingGrpcServer]:
    server = RefusingGrpcServer(tls_files)
    await server.start()
    yield server
    await server.stop()


async def test_a_refused_api_key_is_named(
    refusing_server: RefusingGrpcServer,
    tls_files: TlsFiles,
    session_factory: sessionmaker[Session],
) -> None:
    fields = {
        "temporal_address": refusing_server.address,
        "temporal_namespace": "billing.a1b2c",
        "temporal_api_key": "revoked-key",
        "temporal_tls_server_ca_cert_path": str(tls_files.ca),
        "temporal_tls_server_name": SERVER_NAME,
    }

    with pytest.raises(TemporalConfigError) as caught:
        await connect_client(Settings.model_validate(fields))

    assert str(caught.value) == (
        f"Temporal at {refusing_server.address} (namespace billing.a1b2c, TLS, API key) cannot "
        "be used: the server refused the API key (TEMPORAL_API_KEY): it is wrong, expired or "
        "not allowed on namespace billing.a1b2c."
    )
    assert refusing_server.authorizations[0] == "Bearer revoked-key"

    app = create_app(make_api_settings(**fields), session_factory=session_factory)
    async with serve(app) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert "refused the API key" in response.json()["checks"]["temporal"]
