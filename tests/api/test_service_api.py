"""The service API: keys, bodies, idempotent repeats, concurrent PUTs, members, usage items.

Over the live stack (API on a port, worker, emulator): what a console's backend sees.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
import stripe
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from billing.auth import TokenRules, mint_token
from billing.constants import org_workflow_id
from billing.db import orgs
from billing.db.models import Membership, Org, RequestLog, UsageLedger, User
from billing.domain import LIVE_SUBSCRIPTION_STATUSES, BillingStatus
from billing.logging import configure_logging
from stripe_emulator.server import EmulatorServer
from tests.api.support import make_api_settings, serve
from tests.factories.service_api import (
    OLD_SERVICE_KEY,
    SERVICE_KEY,
    ServiceStack,
    new_org_id,
    org_body,
    service_stack,
)
from tests.factories.stack import eventually, wait_for_status

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def svc(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[ServiceStack]:
    async with service_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
    ) as live:
        yield live


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
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


# Keys -----------------------------------------------------------------------------------


async def test_only_a_service_key_passes_and_no_key_is_logged(
    svc: ServiceStack, log_stream: io.StringIO
) -> None:
    org_id = new_org_id()
    body = org_body()
    url = f"{svc.stack.api_url}/api/orgs/{org_id}"
    member_token = mint_token(TokenRules.of(svc.stack.settings), 1, org_id)
    async with httpx.AsyncClient(timeout=30) as anonymous:
        missing = await anonymous.put(url, json=body)
        wrong = await anonymous.put(
            url, json=body, headers={"Authorization": "Bearer svc_test_" + "x" * 40}
        )
        member = await anonymous.put(
            url, json=body, headers={"Authorization": f"Bearer {member_token}"}
        )
        basic = await anonymous.put(url, json=body, headers={"Authorization": "Basic abc"})
        old = await anonymous.put(
            url, json=body, headers={"Authorization": f"Bearer {OLD_SERVICE_KEY}"}
        )
    assert [r.status_code for r in (missing, wrong, member, basic)] == [401] * 4
    assert missing.json()["detail"].startswith("Missing service API key")
    assert wrong.json()["detail"] == "Invalid service API key"
    assert "Member tokens are not accepted" in member.json()["detail"]
    # Both keys of a rotation pass.
    assert old.status_code == 201
    assert (await svc.put_org(org_id, body)).status_code == 200
    output = log_stream.getvalue()
    assert "PUT /api/orgs/{org_id}" in output
    for secret in (SERVICE_KEY, OLD_SERVICE_KEY, member_token):
        assert secret not in output


async def test_every_service_route_refuses_a_bad_key_and_changes_nothing(
    svc: ServiceStack,
) -> None:
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body())).status_code == 201
    base = f"{svc.stack.api_url}/api/orgs"
    member = {"email": "grace@acme.example", "role": "member"}
    usage = {"items": [{"id": "k-1", "count": 1, "at": datetime.now(UTC).isoformat()}]}
    routes: list[tuple[str, str, object]] = [
        ("PUT", f"{base}/{new_org_id()}", org_body()),
        ("DELETE", f"{base}/{org_id}", None),
        ("PUT", f"{base}/{org_id}/members/u-grace", member),
        ("DELETE", f"{base}/{org_id}/members/u-grace", None),
        ("POST", f"{base}/{org_id}/usage", usage),
        # The key is checked before the path: an id holding `/`, an org id out of range.
        ("PUT", f"{base}/{org_id}/members/auth0%7Cx%2Fy", member),
        ("DELETE", f"{base}/0/members/a%2Fb", None),
    ]
    member_token = mint_token(TokenRules.of(svc.stack.settings), 1, org_id)
    keys = {
        "missing": {},
        "wrong": {"Authorization": "Bearer svc_test_" + "x" * 40},
        "member": {"Authorization": f"Bearer {member_token}"},
    }
    details = {
        "missing": "Missing service API key",
        "wrong": "Invalid service API key",
        "member": "Member tokens are not accepted",
    }
    async with httpx.AsyncClient(timeout=30) as anonymous:
        for method, url, body in routes:
            for what, headers in keys.items():
                answer = await anonymous.request(method, url, json=body, headers=headers)
                assert answer.status_code == 401, (method, url, what)
                assert details[what] in answer.json()["detail"], (method, url, what)
    # Nothing got through: the org is open, has no member and no usage.
    assert svc.stack.org(org_id).closed_at is None
    assert "grace@acme.example" not in roles(svc.stack.session_factory, org_id)
    with svc.stack.session_factory() as session:
        logged = session.scalar(select(func.count()).where(RequestLog.org_id == org_id))
    assert logged == 0


async def test_without_keys_the_routes_say_they_are_not_configured(
    database_url: str,
    emulator: EmulatorServer,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
) -> None:
    settings = make_api_settings(database_url=database_url, stripe_api_base=emulator.url)
    app = create_app(
        settings, temporal_client=temporal_dev_env.client, session_factory=session_factory
    )
    async with serve(app) as http:
        answer = await http.post(
            "/api/orgs/7/usage",
            json={"items": []},
            headers={"Authorization": f"Bearer {SERVICE_KEY}"},
        )
    assert answer.status_code == 503
    assert "BILLING_SERVICE_API_KEYS" in answer.json()["detail"]["description"]


async def test_a_short_key_stops_the_api_at_startup(
    database_url: str, session_factory: sessionmaker[Session]
) -> None:
    from api.service_auth import ServiceKeyConfigError

    settings = make_api_settings(database_url=database_url, billing_service_api_keys="short")
    app = create_app(settings, session_factory=session_factory)
    with pytest.raises(ServiceKeyConfigError, match="at least 32"):
        async with serve(app):
            pass


# OpenAPI --------------------------------------------------------------------------------


def test_every_service_key_operation_has_examples(database_url: str) -> None:
    """A console's developer sees a body to send and an answer to expect on every route."""
    app = create_app(make_api_settings(database_url=database_url))
    doc = app.openapi()
    reached: set[str] = set()
    for path, operations in doc["paths"].items():
        if not path.startswith("/api/orgs/"):
            continue
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            keyed = "ServiceApiKey" in str(operation.get("security", []))
            # The entitlement route also takes a service key (docs/http.md).
            if not keyed and not path.endswith("/entitlement"):
                continue
            reached.add(label)
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]
                assert body.get("examples"), f"{label}: no request body example"
            answered = [
                code
                for code, answer in operation["responses"].items()
                if answer.get("content", {}).get("application/json", {}).get("examples")
            ]
            assert answered, f"{label}: no response example"
            for code, answer in operation["responses"].items():
                if code.startswith("2") and "content" in answer:
                    assert code in answered, f"{label}: no example of its {code}"
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert parameter.get("examples"), f"{label}: no example of {parameter['name']}"
    assert reached == {
        "PUT /api/orgs/{org_id}",
        "DELETE /api/orgs/{org_id}",
        "PUT /api/orgs/{org_id}/members/{user_external_id}",
        "DELETE /api/orgs/{org_id}/members/{user_external_id}",
        "POST /api/orgs/{org_id}/usage",
        "GET /api/orgs/{org_id}/entitlement",
    }


def test_every_json_route_shows_an_answer_and_its_path_parameters(database_url: str) -> None:
    """Beyond the service API: each route's success answer and path parameters have examples."""
    app = create_app(make_api_settings(database_url=database_url))
    doc = app.openapi()
    checked: set[str] = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            for code, answer in operation["responses"].items():
                json_answer = answer.get("content", {}).get("application/json")
                if code.startswith("2") and json_answer is not None:
                    assert json_answer.get("examples"), f"{label}: no example of its {code}"
                    checked.add(label)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert parameter.get("examples"), f"{label}: no example of {parameter['name']}"
    assert {
        "POST /api/webhooks/stripe",
        "POST /api/payments/stripe/portal",
        "POST /api/payments/stripe/checkout",
        "GET /api/orgs/{org_id}/billing",
        "GET /healthz",
        "GET /readyz",
    } <= checked


# Orgs -----------------------------------------------------------------------------------


def org_count(factory: sessionmaker[Session], org_id: int) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).where(Org.id == org_id)) or 0)


async def test_put_creates_once_starts_billing_and_repeats_change_nothing(
    svc: ServiceStack,
) -> None:
    org_id = new_org_id()
    body = org_body(name="Acme")

    created = await svc.put_org(org_id, body)
    again = await svc.put_org(org_id, body)

    assert created.status_code == 201 and again.status_code == 200
    assert created.json()["id"] == org_id and created.json()["uid"] == body["uid"]
    assert again.json()["owner"] == body["owner"] | {"email": body["owner"]["email"]}
    assert org_count(svc.stack.session_factory, org_id) == 1
    state = await wait_for_status(svc.stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_subscription_id
    # Orgs made here later never take a console id.
    with svc.stack.session_factory.begin() as session:
        local = orgs.create_org_with_owner(session, name="Local", owner_email="l@x.example")
        assert local.id > org_id


async def test_concurrent_puts_of_one_org_make_one_org(svc: ServiceStack) -> None:
    org_id = new_org_id()
    body = org_body()

    answers = await asyncio.gather(*(svc.put_org(org_id, body) for _ in range(8)))

    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 7 + [201], [a.text for a in answers]
    assert org_count(svc.stack.session_factory, org_id) == 1
    with svc.stack.session_factory() as session:
        owners = session.scalar(
            select(func.count()).where(Membership.org_id == org_id, Membership.role == "owner")
        )
    assert owners == 1


async def test_bad_bodies_are_refused_with_a_reason(svc: ServiceStack) -> None:
    org_id = new_org_id()
    good = org_body()
    cases = {
        "no owner": {k: v for k, v in good.items() if k != "owner"},
        "bad email": good | {"owner": good["owner"] | {"email": "not-an-email"}},
        "empty name": good | {"name": "  "},
        "control chars": good | {"name": "Ac\x00me"},
        "long uid": good | {"uid": "u" * 37},
        "not an object": [1, 2],
    }
    for what, body in cases.items():
        answer = await svc.http.put(f"/api/orgs/{org_id}", json=body)
        assert answer.status_code == 422, what
        assert answer.json()["detail"], what
    not_json = await svc.http.put(
        f"/api/orgs/{org_id}", content=b"{", headers={"Content-Type": "application/json"}
    )
    zero = await svc.put_org(0, good)
    assert (not_json.status_code, zero.status_code) == (422, 422)
    assert org_count(svc.stack.session_factory, org_id) == 0

    assert (await svc.put_org(org_id, good)).status_code == 201
    other_uid = await svc.put_org(org_id, good | {"uid": "another-uid"})
    assert other_uid.status_code == 409 and "never changes" in other_uid.json()["detail"]
    taken_uid = await svc.put_org(new_org_id(), good)
    assert taken_uid.status_code == 409 and "another org" in taken_uid.json()["detail"]


async def test_delete_during_provisioning_leaves_nothing_billed(svc: ServiceStack) -> None:
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body())).status_code == 201

    first = await svc.http.delete(f"/api/orgs/{org_id}")
    second = await svc.http.delete(f"/api/orgs/{org_id}")

    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["closed_at"] == second.json()["closed_at"]
    handle = svc.stack.client.get_workflow_handle(org_workflow_id(org_id))

    async def status() -> WorkflowExecutionStatus | None:
        return (await handle.describe()).status

    await eventually(status, lambda s: s == WorkflowExecutionStatus.COMPLETED, timeout=60)
    row = svc.stack.org(org_id)
    assert row.closed_at is not None  # kept, closed
    # Whatever provisioning got to make, nothing of the org still bills.
    customers = svc.stack.stripe.v1.customers.search(
        {"query": f"metadata['org_id']:'{org_id}'"}
    ).data
    for customer in customers:
        subs = svc.stack.stripe.v1.subscriptions.list(
            {"customer": customer.id, "status": "all"}
        ).data
        assert all(s.status not in LIVE_SUBSCRIPTION_STATUSES for s in subs)
    # A closed org takes no changes, members or usage.
    put = await svc.put_org(org_id, org_body(uid=row.uid))
    member = await svc.http.put(
        f"/api/orgs/{org_id}/members/u-1", json={"email": "m@acme.example", "role": "member"}
    )
    assert (put.status_code, member.status_code) == (409, 409)
    assert "was closed" in put.json()["detail"]
    usage = await svc.http.post(
        f"/api/orgs/{org_id}/usage",
        json={"items": [{"id": "a", "count": 1, "at": datetime.now(UTC).isoformat()}]},
    )
    assert usage.json()["items"] == [
        {
            "id": "a",
            "outcome": "rejected",
            "detail": f"org {org_id} is closed; usage is no longer recorded",
        }
    ]
    with svc.stack.session_factory.begin() as session, pytest.raises(orgs.OrgClosedError):
        orgs.record_requests(session, org_id, 3)


async def test_delete_of_an_unknown_org_is_404(svc: ServiceStack) -> None:
    answer = await svc.http.delete(f"/api/orgs/{new_org_id()}")
    assert answer.status_code == 404 and "does not exist" in answer.json()["detail"]


# Members --------------------------------------------------------------------------------


def roles(factory: sessionmaker[Session], org_id: int) -> dict[str, str]:
    with factory() as session:
        rows = session.execute(
            select(User.email, Membership.role)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.org_id == org_id, Membership.left_at.is_(None))
        )
        return {email: role.value for email, role in rows}


async def test_members_come_and_go_and_one_owner_stays(svc: ServiceStack) -> None:
    org_id = new_org_id()
    body = org_body(email="ada@acme.example")
    assert (await svc.put_org(org_id, body)).status_code == 201
    url = f"/api/orgs/{org_id}/members"
    grace = {"email": "grace@acme.example", "first_name": "Grace", "last_name": "Hopper"}

    added = await svc.http.put(f"{url}/u-grace", json=grace | {"role": "member"})
    again = await svc.http.put(f"{url}/u-grace", json=grace | {"role": "member"})
    admin = await svc.http.put(f"{url}/u-grace", json=grace | {"role": "billing_admin"})
    assert (added.status_code, again.status_code, admin.status_code) == (201, 200, 200)
    assert admin.json() == grace | {"user_external_id": "u-grace", "role": "billing_admin"}

    bad_role = await svc.http.put(f"{url}/u-x", json=grace | {"role": "king"})
    bad_email = await svc.http.put(f"{url}/u-x", json=grace | {"email": "nope"})
    taken = await svc.http.put(f"{url}/u-other", json=grace | {"role": "member"})
    assert (bad_role.status_code, bad_email.status_code, taken.status_code) == (422, 422, 409)

    owner = await svc.http.put(f"{url}/u-grace", json=grace | {"role": "owner"})
    assert owner.status_code == 200
    assert roles(svc.stack.session_factory, org_id) == {
        "grace@acme.example": "owner",
        "ada@acme.example": "billing_admin",
    }
    demote = await svc.http.put(f"{url}/u-grace", json=grace | {"role": "member"})
    remove_owner = await svc.http.delete(f"{url}/u-grace")
    assert (demote.status_code, remove_owner.status_code) == (409, 409)
    assert "owner" in remove_owner.json()["detail"]

    ada = {"email": "ada@acme.example", "first_name": "Ada", "last_name": "Lovelace"}
    linked = await svc.http.put(f"{url}/u-ada", json=ada | {"role": "billing_admin"})
    assert linked.status_code == 200  # the owner's user got the console's id
    removed = await svc.http.delete(f"{url}/u-ada")
    removed_again = await svc.http.delete(f"{url}/u-ada")
    assert (removed.status_code, removed_again.status_code) == (204, 204)
    assert roles(svc.stack.session_factory, org_id) == {"grace@acme.example": "owner"}


async def test_a_member_id_holding_a_slash_is_one_member(svc: ServiceStack) -> None:
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body())).status_code == 201
    url = f"/api/orgs/{org_id}/members"
    grace = {"email": "grace@acme.example", "first_name": "Grace", "last_name": "Hopper"}

    # As a console sends it (encodeURIComponent), then with the slash as it is.
    added = await svc.http.put(f"{url}/auth0%7Cx%2Fy", json=grace | {"role": "member"})
    again = await svc.http.put(f"{url}/auth0|x/y", json=grace | {"role": "billing_admin"})

    assert (added.status_code, again.status_code) == (201, 200), added.text
    assert added.json()["user_external_id"] == "auth0|x/y"
    assert again.json()["user_external_id"] == "auth0|x/y"
    with svc.stack.session_factory() as session:
        stored = session.scalar(select(User.external_id).where(User.email == grace["email"]))
    assert stored == "auth0|x/y"
    assert roles(svc.stack.session_factory, org_id)["grace@acme.example"] == "billing_admin"

    removed = await svc.http.delete(f"{url}/auth0%7Cx%2Fy")
    assert removed.status_code == 204
    assert "grace@acme.example" not in roles(svc.stack.session_factory, org_id)


# Usage ----------------------------------------------------------------------------------


async def test_each_usage_item_gets_its_own_outcome(svc: ServiceStack) -> None:
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body())).status_code == 201
    now = datetime.now(UTC)
    url = f"/api/orgs/{org_id}/usage"
    items: list[object] = [
        {"id": "r-1", "count": 5, "at": now.isoformat()},
        {"id": "r-1", "count": 5, "at": now.isoformat()},  # repeated inside the batch
        {"id": "r-2", "count": 0, "at": now.isoformat()},
        {"id": "r-3", "count": "7", "at": now.isoformat()},
        {"id": "r-4", "count": 1, "at": "yesterday"},
        {"id": "r-5", "count": 1, "at": "1999-01-01T00:00:00Z"},
        {"count": 1, "at": now.isoformat()},
        "not an item",
        {"id": "r-6", "count": 2, "at": (now - timedelta(hours=1)).isoformat()},
    ]

    first = await svc.http.post(url, json={"items": items})
    second = await svc.http.post(url, json={"items": items})

    assert first.status_code == 200
    outcomes = [(i["id"], i["outcome"]) for i in first.json()["items"]]
    assert outcomes == [
        ("r-1", "recorded"),
        ("r-1", "duplicate"),
        ("r-2", "rejected"),
        ("r-3", "rejected"),
        ("r-4", "rejected"),
        ("r-5", "rejected"),
        (None, "rejected"),
        (None, "rejected"),
        ("r-6", "recorded"),
    ]
    assert all(i["detail"] for i in first.json()["items"] if i["outcome"] == "rejected")
    again = [(i["id"], i["outcome"]) for i in second.json()["items"]]
    assert again[0] == ("r-1", "duplicate") and again[8] == ("r-6", "duplicate")
    with svc.stack.session_factory() as session:
        total = session.scalar(
            select(func.sum(RequestLog.count)).where(RequestLog.org_id == org_id)
        )
    assert total == 7  # each good item once, whatever was repeated

    too_many = await svc.http.post(
        url,
        json={"items": [{"id": str(n), "count": 1, "at": now.isoformat()} for n in range(1001)]},
    )
    no_items = await svc.http.post(url, json={"things": []})
    unknown = await svc.http.post(f"/api/orgs/{new_org_id()}/usage", json={"items": []})
    assert (too_many.status_code, no_items.status_code, unknown.status_code) == (422, 422, 404)


async def test_usage_of_an_invoiced_period_is_late(svc: ServiceStack) -> None:
    stack = svc.stack
    org_id = new_org_id()
    assert (await svc.put_org(org_id, org_body())).status_code == 201
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.trial_end and state.stripe_customer_id
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    in_trial = state.trial_end - timedelta(days=1)
    url = f"/api/orgs/{org_id}/usage"
    early = await svc.http.post(
        url, json={"items": [{"id": "before", "count": 3, "at": in_trial.isoformat()}]}
    )
    assert early.json()["items"][0]["outcome"] == "recorded"

    await stack.advance(int(state.trial_end.timestamp()) + 600)
    await wait_for_status(stack.client, org_id, {BillingStatus.ACTIVE})

    async def billed_through() -> datetime | None:
        with stack.session_factory() as session:
            return orgs.usage_billed_through(session, org_id)

    trial_end = state.trial_end
    await eventually(billed_through, lambda t: t is not None and t >= trial_end)
    after = state.trial_end + timedelta(minutes=5)
    answer = await svc.http.post(
        url,
        json={
            "items": [
                {"id": "late", "count": 4, "at": in_trial.isoformat()},
                {"id": "now", "count": 1, "at": after.isoformat()},
                {"id": "before", "count": 3, "at": in_trial.isoformat()},
            ]
        },
    )
    assert [(i["id"], i["outcome"]) for i in answer.json()["items"]] == [
        ("late", "late"),
        ("now", "recorded"),
        ("before", "duplicate"),
    ]
    assert answer.json()["items"][0]["detail"] == "period already invoiced: recorded, not billed"
    # Recorded, but not billed: the invoiced period's reported usage stays the first 3.
    with stack.session_factory() as session:
        recorded = orgs.request_total(session, org_id, until=trial_end)
        billed = session.scalar(
            select(func.coalesce(func.sum(UsageLedger.value), 0)).where(
                UsageLedger.org_id == org_id,
                UsageLedger.dimension == stack.settings.stripe_requests_dimension,
                UsageLedger.period_end <= trial_end,
            )
        )
    assert (recorded, billed) == (7, 3)
