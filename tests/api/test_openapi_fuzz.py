"""Fuzz every operation of the app's own OpenAPI document with schemathesis.

The app is built from settings alone (its lifespan connects to the dev server,
the test database and the emulator), so this also exercises the production
wiring. Every answer must be documented, match its schema, and not be a 500.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import stripe
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from tests.api.support import WEBHOOK_SECRET, bearer
from tests.factories.orgs import add_member, make_org_with_member, make_user
from tests.factories.service_api import SERVICE_KEY
from tests.factories.stripe_events import sign_stripe_payload

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_RUN = 25


@pytest.fixture
def fuzz_app(api_settings: Settings, temporal_dev_env: WorkflowEnvironment) -> Iterator[FastAPI]:
    """An app wired only from settings, like `uvicorn api.main:app`."""
    address = temporal_dev_env.client.service_client.config.target_host
    yield create_app(
        api_settings.model_copy(
            update={
                "temporal_address": address,
                "billing_service_api_keys": SecretStr(SERVICE_KEY),
            }
        )
    )
    from schemathesis.python import asgi

    # Stop the lifespan schemathesis started (engine, clients) before the next test.
    with contextlib.suppress(Exception):
        asgi.shutdown_lifespans()


def _signed(case: Any) -> dict[str, Any]:
    """Send the generated event the way Stripe would: serialized once, and signed."""
    body = json.dumps(case.body).encode()
    signature = sign_stripe_payload(body, WEBHOOK_SECRET)
    return {
        "headers": {"Stripe-Signature": signature, "Content-Type": "application/json"},
        "data": body,
    }


def _fuzz(operation: Any, *, signed: bool = False, **fixed: Any) -> None:
    modes = [GenerationMode.POSITIVE] if signed else list(GenerationMode)
    for mode in modes:

        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        @settings(
            max_examples=EXAMPLES_PER_RUN,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        def run(case: Any) -> None:
            extra = _signed(case) if signed else {}
            case.call_and_validate(checks=CHECKS, **extra)

        if mode is GenerationMode.NEGATIVE:
            # An operation with nothing to get wrong (no parameters, no body) has no negative cases.
            with contextlib.suppress(Unsatisfiable):
                run()
        else:
            run()


def test_every_answer_is_documented_and_none_is_a_500(
    fuzz_app: FastAPI,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> None:
    customer = stripe_client.v1.customers.create({"email": "fuzz@example.com"})
    org, user = make_org_with_member(session_factory, stripe_customer_id=customer.id)
    member = bearer(user.id, org.id)
    # The portal answers a plain member 403; its other answers need the owner.
    owner_user = make_user(session_factory)
    add_member(session_factory, org.id, owner_user.id, role="owner")
    owner = bearer(owner_user.id, org.id)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)

    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the app's OpenAPI document is invalid: {result}"
        operations.append(result.ok())
    assert {op.label for op in operations} >= {
        "POST /api/webhooks/stripe",
        "POST /api/payments/stripe/portal",
        "GET /api/orgs/{org_id}/billing",
        "GET /readyz",
        "PUT /api/orgs/{org_id}",
        "DELETE /api/orgs/{org_id}",
        "PUT /api/orgs/{org_id}/members/{user_external_id}",
        "DELETE /api/orgs/{org_id}/members/{user_external_id}",
        "POST /api/orgs/{org_id}/usage",
    }
    service = {"Authorization": f"Bearer {SERVICE_KEY}"}
    for operation in operations:
        # As anyone: no token, or whatever token the generator invents.
        _fuzz(operation)
        if operation.label == "POST /api/webhooks/stripe":
            # Past the signature check: routing, recording, Temporal.
            _fuzz(operation, signed=True)
        if operation.label == "POST /api/payments/stripe/portal":
            _fuzz(operation, headers=member)
            _fuzz(operation, headers=owner)
        if "ServiceApiKey" in json.dumps(operation.definition.raw.get("security", [])):
            # With the console's key: every body the schema allows, or nearly.
            _fuzz(operation, headers=service)
            _fuzz(operation, headers=service, path_parameters={"org_id": org.id})
        if operation.label == "GET /api/orgs/{org_id}/billing":
            _fuzz(operation, headers=member)
            _fuzz(operation, headers=member, path_parameters={"org_id": org.id})
            _fuzz(operation, headers=owner, path_parameters={"org_id": org.id})
