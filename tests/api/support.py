"""Ways for API tests to look at what a request left behind: workflows, rows, tokens."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from billing.auth import TokenRules, mint_token
from billing.config import Settings
from billing.constants import STRIPE_EVENT_SIGNAL, org_workflow_id
from billing.db.models import StripeEventLog
from billing.domain import OrgBillingInput, OrgBillingState, StripeEventSignal
from tests.api.stub_workflow import StateOnlyOrgBilling
from tests.factories.stripe_events import event_body, sign_stripe_payload

JWT_SECRET = "api-tests-jwt-secret-0123456789abcdef"
WEBHOOK_SECRET = "whsec_apitestsecret0123456789"
STRIPE_KEY = "sk_test_apitests"


def free_port() -> int:
    """A local port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_api_settings(**values: object) -> Settings:
    """Explicit settings, so the developer's environment and `.env` never leak in."""
    defaults: dict[str, object] = {
        "auth_jwt_secret": JWT_SECRET,
        "stripe_secret_key": STRIPE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_portal_return_url": "https://app.example.com/settings/billing",
    }
    return Settings.model_validate({**defaults, **values})


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def workflow_exists(client: Client, org_id: int) -> bool:
    try:
        await client.get_workflow_handle(org_workflow_id(org_id)).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def signalled_events(client: Client, org_id: int) -> list[StripeEventSignal]:
    """The `stripe_event` signals in the org workflow's history, decoded."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    signals: list[StripeEventSignal] = []
    async for event in handle.fetch_history_events():
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        attrs = event.workflow_execution_signaled_event_attributes
        if attrs.signal_name != STRIPE_EVENT_SIGNAL:
            continue
        decoded = await client.data_converter.decode(attrs.input.payloads, [StripeEventSignal])
        signals.extend(decoded)
    return signals


def event_row(session_factory: sessionmaker[Session], event_id: str) -> StripeEventLog | None:
    with session_factory() as session:
        return session.get(StripeEventLog, event_id)


def event_rows(session_factory: sessionmaker[Session]) -> list[StripeEventLog]:
    with session_factory() as session:
        return list(session.query(StripeEventLog).all())


async def post_event(
    http: httpx.AsyncClient,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    """Deliver `event` the way Stripe does: raw JSON body, signed."""
    body = event_body(event)
    signature = sign_stripe_payload(body, secret, timestamp=timestamp or int(time.time()))
    return await http.post(
        "/api/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )


def token_rules(**settings: object) -> TokenRules:
    """The token rules of an API built with `make_api_settings(**settings)`."""
    return TokenRules.of(make_api_settings(**settings))


def member_token(
    user_id: int,
    org_id: int,
    *,
    secret: str = JWT_SECRET,
    ttl: timedelta | None = None,
    now: datetime | None = None,
) -> str:
    """A token as the console (or `billing token`) would mint it for the test API."""
    return mint_token(token_rules(auth_jwt_secret=secret), user_id, org_id, ttl, now=now)


def bearer(user_id: int, org_id: int, *, secret: str = JWT_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {member_token(user_id, org_id, secret=secret)}"}


@asynccontextmanager
async def org_workflow_with_state(
    client: Client, task_queue: str, state: OrgBillingState
) -> AsyncIterator[None]:
    """The org's workflow, running on `task_queue` with a worker, holding `state`."""
    async with Worker(client, task_queue=task_queue, workflows=[StateOnlyOrgBilling]):
        handle = await client.start_workflow(
            StateOnlyOrgBilling.run,
            OrgBillingInput(org_id=state.org_id, state=state),
            id=org_workflow_id(state.org_id),
            task_queue=task_queue,
        )
        try:
            yield
        finally:
            await handle.terminate()
