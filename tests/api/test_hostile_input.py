"""What an adversary sends the API: each input gets a clear 4xx, never a 500 or a flood."""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
import pytest
from starlette.types import Message

from api.log_limits import BoundedLog
from tests.api.conftest import Api
from tests.api.support import JWT_SECRET, WEBHOOK_SECRET, event_rows, post_event
from tests.factories.orgs import make_org_with_member
from tests.factories.stripe_events import sign_stripe_payload, stripe_event, subscription_object

WEBHOOK = "/api/webhooks/stripe"


def _series(page: str, metric: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith(metric + "{")]


async def _metrics(api: Api) -> str:
    return (await api.http.get("/metrics")).text


async def test_random_methods_and_paths_do_not_grow_the_metrics_page(api: Api) -> None:
    for i in range(40):
        await api.http.request(f"X{i}METHOD{'A' * i}", f"/no/such/path/{i}")
    page = await _metrics(api)
    series = _series(page, "billing_http_requests_total")
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    routes = {line.split('route="')[1].split('"')[0] for line in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods
    assert routes == {"<unmatched>"}
    assert len(series) <= 3


async def test_event_types_outside_the_known_set_share_one_label(api: Api) -> None:
    for i in range(20):
        event = stripe_event(f"made.up.type{i}", subscription_object())
        assert (await post_event(api.http, event)).status_code == 200
    series = _series(await _metrics(api), "billing_webhook_events_total")
    types = {line.split('type="')[1].split('"')[0] for line in series}
    assert types == {"other"}


async def test_live_event_created_after_its_signature_is_refused(api: Api) -> None:
    org, _ = make_org_with_member(api.session_factory)
    poisoned = stripe_event(
        "customer.subscription.updated", subscription_object(org_id=org.id), created=2**53
    )
    ahead = stripe_event(
        "customer.subscription.updated",
        subscription_object(org_id=org.id),
        created=int(time.time()) + 3600,
    )
    for event in (poisoned, ahead):
        event["livemode"] = True
        response = await post_event(api.http, event)
        assert response.status_code == 400
        assert response.json() == {"detail": "Event `created` is later than its signature"}
    assert event_rows(api.session_factory) == []


async def test_test_mode_event_on_a_test_clock_may_be_dated_ahead(api: Api) -> None:
    """Test clocks date their events in simulated time; Stripe signs them now."""
    event = stripe_event(
        "made.up.type", subscription_object(), created=int(time.time()) + 40 * 86400
    )
    assert event["livemode"] is False
    assert (await post_event(api.http, event)).status_code == 200


async def test_signature_timestamp_from_the_future_is_refused(api: Api) -> None:
    event = stripe_event("customer.subscription.updated", subscription_object())
    response = await post_event(api.http, event, timestamp=int(time.time()) + 3600)
    assert response.status_code == 400
    assert response.json() == {"detail": "Stripe-Signature timestamp is in the future"}


async def test_a_slightly_early_signature_within_tolerance_is_accepted(api: Api) -> None:
    event = stripe_event("made.up.type", subscription_object())
    response = await post_event(api.http, event, timestamp=int(time.time()) + 60)
    assert response.status_code == 200


def _signed(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    signature = sign_stripe_payload(body, WEBHOOK_SECRET, timestamp=timestamp or int(time.time()))
    return {"Stripe-Signature": signature, "Content-Type": "application/json"}


@pytest.mark.parametrize("where", ["created", "metadata"])
async def test_integer_past_the_digit_limit_is_a_400(api: Api, where: str) -> None:
    huge = "9" * 5000
    if where == "created":
        body = (
            '{"id": "evt_1", "type": "customer.subscription.updated", "created": '
            + huge
            + ', "data": {"object": {"id": "sub_1"}}}'
        ).encode()
    else:
        body = (
            '{"id": "evt_1", "type": "customer.subscription.updated", "created": 1, '
            '"data": {"object": {"id": "sub_1", "metadata": {"n": ' + huge + "}}}}"
        ).encode()
    response = await api.http.post(WEBHOOK, content=body, headers=_signed(body))
    assert (response.status_code, response.json()) == (400, {"detail": "Body is not JSON"})


async def test_thousands_of_digits_as_org_id_is_unroutable(api: Api) -> None:
    event = stripe_event("customer.subscription.updated", subscription_object(org_id="7" * 6000))
    response = await post_event(api.http, event)
    assert response.status_code == 200
    assert response.json()["outcome"] == "unroutable"


def _token(claims: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        (2**40, "Token claim 'exp' is out of range"),
        (10**30, "Token claim 'exp' is out of range"),
        ("9999999999", "Token claim 'exp' is not an integer timestamp"),
        (9999999999.5, "Token claim 'exp' is not an integer timestamp"),
    ],
)
async def test_token_expiry_that_is_no_timestamp_is_a_401(
    api: Api, exp: object, reason: str
) -> None:
    org, user = make_org_with_member(api.session_factory)
    now = int(time.time())
    headers = _token(
        {
            "sub": str(user.id),
            "org_id": org.id,
            "iat": now,
            "exp": exp,
            "aud": "org-billing",
            "iss": "org-billing",
        }
    )
    for response in (
        await api.http.get(f"/api/orgs/{org.id}/billing", headers=headers),
        await api.http.post("/api/payments/stripe/portal", headers=headers),
    ):
        assert (response.status_code, response.json()["detail"]) == (401, reason)


async def test_client_that_leaves_mid_body_is_counted_apart_and_not_an_error(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"id": "evt_1", "type": "customer.subscription.updated"'
    chunks: list[Message] = [
        {"type": "http.request", "body": body, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": WEBHOOK,
        "raw_path": WEBHOOK.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"4096"),
            (b"stripe-signature", sign_stripe_payload(body, WEBHOOK_SECRET).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "state": {},
        "app": api.app,
    }
    with caplog.at_level(logging.INFO):
        await api.app(scope, receive, send)

    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    series = _series(await _metrics(api), "billing_http_requests_total")
    assert any('status="client_closed"' in line for line in series)
    assert not any('route="/api/webhooks/stripe",status="500"' in line for line in series)


async def test_bad_signatures_are_counted_one_by_one_and_logged_at_a_bounded_rate(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    event = stripe_event("customer.subscription.updated", subscription_object())
    with caplog.at_level(logging.INFO):
        for _ in range(200):
            response = await post_event(api.http, event, secret="whsec_not_ours")
            assert response.status_code == 400
    # Ours only: the test client logs each of its own requests too.
    lines = [r for r in caplog.records if r.name.startswith(("api", "billing", "uvicorn"))]
    assert len(lines) <= 3
    page = await _metrics(api)
    assert 'billing_webhook_events_total{outcome="rejected",type="unverified"} 200.0' in page


def test_bounded_log_summarizes_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = BoundedLog(
        logging.getLogger("test.bounded"), "refused", interval=60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.bounded"):
        assert log.warning("bad signature") is True
        assert [log.warning("bad signature") for _ in range(9)] == [False] * 9
        assert log.warning("stale") is True
        now[0] = 61.0
        assert log.warning("bad signature") is True
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused: bad signature",
        "refused: stale",
        "refused: 9 more in the last 61 s (bad signature x9)",
        "refused: bad signature",
    ]
