"""The service API over a live stack: a console's backend calling it with its key."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from stripe_emulator.server import EmulatorServer
from tests.factories.live import LiveStack, live_stack

SERVICE_KEY = "svc_test_" + "k" * 40
OLD_SERVICE_KEY = "svc_test_" + "o" * 40


@dataclass
class ServiceStack:
    stack: LiveStack
    http: httpx.AsyncClient

    async def put_org(self, org_id: int, body: dict[str, Any]) -> httpx.Response:
        return await self.http.put(f"/api/orgs/{org_id}", json=body)


@asynccontextmanager
async def service_stack(
    client: Client,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
    *,
    org_close_cancels: str = "immediately",
) -> AsyncIterator[ServiceStack]:
    async with (
        live_stack(
            client,
            emulator,
            stripe_client,
            session_factory,
            database_url,
            task_queue,
            catalog,
            billing_service_api_keys=f"{SERVICE_KEY},{OLD_SERVICE_KEY}",
            org_close_cancels=org_close_cancels,
        ) as stack,
        httpx.AsyncClient(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {SERVICE_KEY}"},
            timeout=30,
        ) as http,
    ):
        yield ServiceStack(stack=stack, http=http)


def new_org_id() -> int:
    """A console org id no other test uses (workflow ids live on a shared server)."""
    return random.randint(10**8, 2**31 - 2)


def org_body(
    *,
    uid: str | None = None,
    name: str = "Acme",
    email: str | None = None,
    first_name: str = "Ada",
    last_name: str = "Lovelace",
    aws_account_id: str | None = None,
) -> dict[str, Any]:
    return {
        "uid": uid or str(uuid.uuid4()),
        "name": name,
        "owner": {
            "email": email or f"owner-{uuid.uuid4().hex[:8]}@acme.example",
            "first_name": first_name,
            "last_name": last_name,
        },
        "aws_account_id": aws_account_id,
        "azure_subscription_id": None,
    }
