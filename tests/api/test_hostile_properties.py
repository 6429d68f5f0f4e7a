"""Property: whatever JSON, headers and tokens arrive, no answer is a 500 and no error is logged.

The app is wired from settings alone (real database, dev server, emulator) and
driven through Starlette's test client, so every draw goes through the whole
stack: middleware, signature check, routing, auth, Temporal hand-over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.config import Settings
from billing.constants import HANDLED_EVENT_TYPES
from tests.api.support import JWT_SECRET, WEBHOOK_SECRET
from tests.factories.orgs import make_org_with_member
from tests.factories.stripe_events import sign_stripe_payload

EXAMPLES = 120
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.one_of(st.integers(min_value=-5, max_value=2**40), st.text(max_size=30), st.none())
stripe_ids = st.one_of(
    st.text(max_size=30), st.sampled_from(["cus_1", "sub_1", "in_1"]), json_value
)
event_objects = st.fixed_dictionaries(
    {"id": stripe_ids},
    optional={
        "object": st.sampled_from(["subscription", "invoice", "customer", "other"]),
        "customer": stripe_ids,
        "metadata": st.dictionaries(st.sampled_from(["org_id", "x"]), ids, max_size=2) | json_value,
        "parent": json_value,
        "subscription": stripe_ids,
    },
)
events = st.fixed_dictionaries(
    {
        "id": st.text(max_size=30) | json_value,
        "type": st.sampled_from(sorted(HANDLED_EVENT_TYPES)) | st.text(max_size=30),
        "created": st.integers(min_value=-(2**40), max_value=2**60) | json_value,
        "data": st.fixed_dictionaries({"object": event_objects}) | json_value,
    }
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
headers = st.dictionaries(
    st.sampled_from(
        ["Content-Type", "Content-Length", "X-Forwarded-For", "Accept", "Stripe-Signature"]
    ),
    header_values,
    max_size=3,
)
claims = st.dictionaries(
    st.sampled_from(["sub", "org_id", "exp", "iat", "aud", "iss", "nbf"]),
    json_value | ids,
    max_size=7,
)


@pytest.fixture
def client(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> Iterator[TestClient]:
    address = temporal_dev_env.client.service_client.config.target_host
    app = create_app(api_settings.model_copy(update={"temporal_address": address}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    caplog.set_level(logging.INFO)
    yield caplog.records


def _no_errors(records: list[logging.LogRecord]) -> None:
    bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@PROPERTY
@given(event=events | json_value, extra=headers, sign=st.booleans(), skew=st.integers(-400, 400))
def test_webhook_never_answers_500(
    client: TestClient,
    errors: list[logging.LogRecord],
    event: Any,
    extra: dict[str, str],
    sign: bool,
    skew: int,
) -> None:
    body = json.dumps(event).encode()
    sent = dict(extra)
    if sign:
        sent["Stripe-Signature"] = sign_stripe_payload(
            body, WEBHOOK_SECRET, timestamp=int(time.time()) + skew
        )
    sent.pop("Content-Length", None)
    response = client.post("/api/webhooks/stripe", content=body, headers=sent)
    assert response.status_code != 500, response.text
    assert response.status_code in (200, 400, 413, 503), response.text
    _no_errors(errors)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@PROPERTY
@given(
    token=claims,
    raw=st.one_of(st.none(), header_values),
    org=st.one_of(st.integers(min_value=-(2**40), max_value=2**40), st.text(max_size=12)),
    secret=st.sampled_from([JWT_SECRET, "another-secret-of-at-least-32-bytes!!"]),
    algorithm=st.sampled_from(["HS256", "HS384", "HS512"]),
)
def test_portal_and_billing_never_answer_500(
    client: TestClient,
    errors: list[logging.LogRecord],
    session_factory: sessionmaker[Session],
    token: dict[str, Any],
    raw: str | None,
    org: int | str,
    secret: str,
    algorithm: str,
) -> None:
    if raw is not None:
        authorization = raw
    else:
        try:
            encoded = jwt.encode(token, secret, algorithm=algorithm)
        except (TypeError, ValueError):
            encoded = "not-a-token"
        authorization = f"Bearer {encoded}"
    headers = {"Authorization": authorization}
    answers = [
        client.post("/api/payments/stripe/portal", headers=headers),
        client.get(f"/api/orgs/{quote(str(org), safe='')}/billing", headers=headers),
    ]
    for response in answers:
        assert response.status_code != 500, response.text
        assert response.status_code in (200, 401, 403, 404, 422, 502, 503), response.text
    _no_errors(errors)


def test_a_real_members_token_still_works_through_the_same_client(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    """The properties above would pass on an app that refuses everything: this one must not."""
    org, user = make_org_with_member(session_factory)
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": str(user.id),
            "org_id": org.id,
            "iat": now,
            "exp": now + 600,
            "aud": "org-billing",
            "iss": "org-billing",
        },
        JWT_SECRET,
        algorithm="HS256",
    )
    response = client.get(
        f"/api/orgs/{org.id}/billing", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
