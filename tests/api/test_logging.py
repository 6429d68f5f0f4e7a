"""Structured logs: one JSON object per line, and never a secret, token or signature."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from billing.logging import configure_logging, log_context
from tests.api.conftest import Api
from tests.api.support import (
    JWT_SECRET,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    member_token,
    post_event,
)
from tests.factories.orgs import make_org_with_member
from tests.factories.stripe_events import (
    event_body,
    sign_stripe_payload,
    stripe_event,
    subscription_object,
)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything logged during the test, as `configure_logging` writes it."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_records_are_json_with_context_and_extras(log_stream: io.StringIO) -> None:
    log = logging.getLogger("billing.test")
    with log_context(org_id=7, event_id="evt_1"):
        log.info("applied %s", "event", extra={"workflow_id": "org-billing-7"})

    [record] = _records(log_stream)
    assert record["level"] == "INFO"
    assert record["logger"] == "billing.test"
    assert record["message"] == "applied event"
    assert (record["org_id"], record["event_id"], record["workflow_id"]) == (
        7,
        "evt_1",
        "org-billing-7",
    )
    assert str(record["timestamp"]).endswith("+00:00")


def test_secrets_are_redacted_wherever_they_appear(log_stream: io.StringIO) -> None:
    token = member_token(1, 2)
    signature = sign_stripe_payload(b"{}", WEBHOOK_SECRET)
    log = logging.getLogger("billing.test")

    log.warning("key %s secret %s", STRIPE_KEY, WEBHOOK_SECRET)
    log.warning("Authorization: Bearer %s", token)
    log.warning("raw token %s", token)
    log.warning("header", extra={"stripe_signature": signature, "note": f"sig was {signature}"})
    log.warning("nested", extra={"request": {"headers": {"authorization": f"Bearer {token}"}}})
    try:
        raise RuntimeError(f"failed with {STRIPE_KEY}")
    except RuntimeError:
        log.exception("boom")

    output = log_stream.getvalue()
    for secret in (STRIPE_KEY, WEBHOOK_SECRET, token, signature, signature.split(",")[1]):
        assert secret not in output
    assert output.count("[REDACTED]") >= 7


async def test_webhook_and_portal_requests_log_no_secrets(
    api: Api, log_stream: io.StringIO
) -> None:
    org, _ = make_org_with_member(api.session_factory)
    # Another org for the bearer requests: one without a workflow answers at once.
    other, user = make_org_with_member(api.session_factory)
    token = member_token(user.id, other.id)
    event = stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))
    body = event_body(event)
    good_signature = sign_stripe_payload(body, WEBHOOK_SECRET, timestamp=int(time.time()))
    bad_signature = sign_stripe_payload(body, "whsec_wrong_secret_value")

    accepted = await api.http.post(
        "/api/webhooks/stripe", content=body, headers={"Stripe-Signature": good_signature}
    )
    refused = await api.http.post(
        "/api/webhooks/stripe", content=body, headers={"Stripe-Signature": bad_signature}
    )
    await post_event(api.http, event)
    await api.http.post("/api/payments/stripe/portal", headers={"Authorization": f"Bearer {token}"})
    await api.http.get(
        f"/api/orgs/{other.id}/billing", headers={"Authorization": f"Bearer {token}"}
    )

    assert (accepted.status_code, refused.status_code) == (200, 400)
    output = log_stream.getvalue()
    records = _records(log_stream)
    assert any(r.get("event_id") == event["id"] and r.get("org_id") == org.id for r in records)
    assert any(r.get("workflow_id") == f"org-billing-{org.id}" for r in records)
    for secret in (
        token,
        good_signature,
        bad_signature,
        good_signature.split(",")[1],
        WEBHOOK_SECRET,
        STRIPE_KEY,
        JWT_SECRET,
    ):
        assert secret not in output


async def test_a_webhook_delivery_is_one_access_line_with_its_event_org_and_outcome(
    api: Api, log_stream: io.StringIO
) -> None:
    org, _ = make_org_with_member(api.session_factory)
    event = stripe_event("customer.subscription.updated", subscription_object(org_id=org.id))

    answer = await post_event(api.http, event)

    assert answer.status_code == 200
    records = _records(log_stream)
    mine = [r for r in records if r.get("event_id") == event["id"] and r["level"] != "DEBUG"]
    assert len(mine) == 1, mine
    [line] = mine
    assert line["message"] == "POST /api/webhooks/stripe 200"
    assert (line["org_id"], line["workflow_id"], line["outcome"]) == (
        org.id,
        f"org-billing-{org.id}",
        "signalled",
    )
    assert line["event_type"] == "customer.subscription.updated"
    assert line["routed_by"] == "org from metadata"
    assert isinstance(line["duration_ms"], float)


@pytest.mark.parametrize(
    "text",
    [
        "key sk_test_abc123 and rk_live_Z9",
        "whsec_abc+/=",
        "Authorization: Bearer abc.def-ghi",
        "BEARER    token",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        "t=1700000000,v1=0123456789abcdef,v0=fedcba9876543210",
        "v1=0123456789abcdef0123",
        "nothing secret here: org 7, event evt_1, sub_123",
    ],
)
def test_the_quick_check_never_skips_a_secret(text: str) -> None:
    """`redact` skips text in which no pattern can start; it must agree with every pattern."""
    from billing.logging import _SECRET_PATTERNS, redact

    expected = text
    for pattern, replacement in _SECRET_PATTERNS:
        expected = pattern.sub(replacement, expected)
    assert redact(text) == expected
    assert redact(f"prefix {text} suffix") == f"prefix {expected} suffix"
