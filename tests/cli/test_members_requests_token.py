"""`billing members`, `billing requests record` and `billing token`, with their errors."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing.auth import TokenRules, decode_token
from billing.db.models import Membership, RequestLog, User
from billing.db.orgs import find_user
from stripe_emulator.server import EmulatorServer
from tests.cli.conftest import JWT_SECRET, Invoke, assert_clean_error

FROM_HOME_SECRET = "from-home-secret-of-at-least-32-bytes"


def _rules(secret: str = JWT_SECRET) -> TokenRules:
    """What the CLI mints with when only the secret is set: the documented defaults."""
    return TokenRules(
        secret=secret, audience="org-billing", issuer="org-billing", max_ttl=timedelta(hours=1)
    )


def _org(invoke: Invoke, name: str = "Acme", email: str = "ada@acme.test") -> int:
    result = invoke("orgs", "create", "--name", name, "--owner-email", email, "--json")
    assert result.exit_code == 0, result.output
    org_id: int = json.loads(result.stdout)["org"]["id"]
    return org_id


# members ---------------------------------------------------------------------------


def test_add_and_remove_a_member(invoke: Invoke) -> None:
    org_id = _org(invoke)

    added = invoke(
        "members", "add", str(org_id), "--email", "Grace@Acme.test", "--name", "Grace Hopper"
    )
    removed = invoke("members", "remove", str(org_id), "--email", "grace@acme.test", "--json")

    assert added.exit_code == 0, added.output
    assert "grace@acme.test" in added.stdout and "2 members" in added.stdout
    assert removed.exit_code == 0, removed.output
    assert json.loads(removed.stdout) == {
        "org_id": org_id,
        "email": "grace@acme.test",
        "removed": True,
        "members": 1,
    }


def test_removing_a_member_keeps_the_history_and_they_can_come_back(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    org_id = _org(invoke)
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")
    assert invoke("members", "remove", str(org_id), "--email", "grace@acme.test").exit_code == 0

    back = invoke("members", "add", str(org_id), "--email", "grace@acme.test", "--json")
    shown = invoke("orgs", "show", str(org_id), "--json")

    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout)["members"] == 2
    assert json.loads(shown.stdout)["org"]["members"] == 2
    with session_factory() as session:
        stays = session.execute(
            select(Membership.joined_at, Membership.left_at)
            .join(User, User.id == Membership.user_id)
            .where(Membership.org_id == org_id, User.email == "grace@acme.test")
            .order_by(Membership.joined_at)
        ).all()
    assert len(stays) == 2
    assert stays[0].left_at is not None and stays[0].left_at <= stays[1].joined_at
    assert stays[1].left_at is None


def _role(session_factory: sessionmaker[Session], org_id: int, email: str) -> str:
    with session_factory() as session:
        user = find_user(session, email)
        role = session.scalar(
            select(Membership.role).where(
                Membership.org_id == org_id, Membership.user_id == user.id
            )
        )
    return str(role)


def test_add_a_billing_admin(invoke: Invoke, session_factory: sessionmaker[Session]) -> None:
    org_id = _org(invoke)

    admin = invoke(
        "members",
        "add",
        str(org_id),
        "--email",
        "bill@acme.test",
        "--role",
        "billing_admin",
        "--json",
    )
    plain = invoke("members", "add", str(org_id), "--email", "pat@acme.test")
    shown = invoke("orgs", "show", str(org_id), "--json")

    assert admin.exit_code == 0, admin.output
    assert json.loads(admin.stdout) == {
        "org_id": org_id,
        "email": "bill@acme.test",
        "role": "billing_admin",
        "previous_role": None,
        "members": 2,
    }
    assert plain.exit_code == 0 and "as member" in plain.stdout
    assert _role(session_factory, org_id, "bill@acme.test") == "billing_admin"
    assert _role(session_factory, org_id, "pat@acme.test") == "member"
    roles = {m["email"]: m["role"] for m in json.loads(shown.stdout)["members"]}
    assert roles == {
        "ada@acme.test": "owner",
        "bill@acme.test": "billing_admin",
        "pat@acme.test": "member",
    }


@pytest.mark.parametrize(
    ("role", "message"),
    [
        ("owner", "exactly one owner"),
        ("admin", "'admin' is not a role; use member or billing_admin"),
    ],
)
def test_a_role_that_cannot_be_granted_is_refused(invoke: Invoke, role: str, message: str) -> None:
    org_id = _org(invoke)

    result = invoke("members", "add", str(org_id), "--email", "eve@acme.test", "--role", role)

    assert_clean_error(result, message)
    listed = invoke("orgs", "show", str(org_id), "--json")
    assert [m["email"] for m in json.loads(listed.stdout)["members"]] == ["ada@acme.test"]


def test_a_user_can_belong_to_two_orgs(invoke: Invoke) -> None:
    first, second = _org(invoke, "Acme"), _org(invoke, "Globex", "hank@globex.test")

    assert invoke("members", "add", str(first), "--email", "pat@example.test").exit_code == 0
    assert invoke("members", "add", str(second), "--email", "pat@example.test").exit_code == 0


def test_adding_a_member_twice_is_refused(invoke: Invoke) -> None:
    org_id = _org(invoke)
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")

    result = invoke("members", "add", str(org_id), "--email", "grace@acme.test")

    assert_clean_error(result, f"already a member of org {org_id} (role member)")


def test_a_current_member_is_granted_billing_admin_and_back(invoke: Invoke) -> None:
    org_id = _org(invoke)
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")

    granted = invoke(
        "members", "add", str(org_id), "--email", "grace@acme.test", "--role", "billing_admin"
    )

    assert granted.exit_code == 0, granted.output
    assert f"grace@acme.test is now billing_admin of org {org_id} (was member)" in granted.stdout
    members = json.loads(invoke("orgs", "show", str(org_id), "--json").stdout)["members"]
    assert {m["email"]: m["role"] for m in members} == {
        "ada@acme.test": "owner",
        "grace@acme.test": "billing_admin",
    }
    back = invoke("members", "add", str(org_id), "--email", "grace@acme.test", "--json")
    assert json.loads(back.stdout)["previous_role"] == "billing_admin"
    assert len(json.loads(invoke("orgs", "show", str(org_id), "--json").stdout)["members"]) == 2


def test_the_owner_keeps_their_role_when_added_again(invoke: Invoke) -> None:
    org_id = _org(invoke)

    result = invoke(
        "members", "add", str(org_id), "--email", "ada@acme.test", "--role", "billing_admin"
    )

    assert_clean_error(result, f"already a member of org {org_id} (role owner)")


def test_the_owner_cannot_be_removed(invoke: Invoke) -> None:
    org_id = _org(invoke)

    result = invoke("members", "remove", str(org_id), "--email", "ada@acme.test")

    assert_clean_error(result, "owns org", "cannot be removed")


def test_member_errors_name_what_is_missing(invoke: Invoke) -> None:
    org_id = _org(invoke)
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")
    other = _org(invoke, "Globex", "hank@globex.test")

    assert_clean_error(
        invoke("members", "add", "999999", "--email", "x@y.test"), "Org 999999 does not exist"
    )
    assert_clean_error(
        invoke("members", "remove", "999999", "--email", "x@y.test"), "Org 999999 does not exist"
    )
    assert_clean_error(
        invoke("members", "remove", str(org_id), "--email", "nobody@acme.test"),
        "No user has the email nobody@acme.test",
    )
    assert_clean_error(
        invoke("members", "remove", str(other), "--email", "grace@acme.test"),
        f"grace@acme.test is not a member of org {other}",
    )


# requests --------------------------------------------------------------------------


def test_record_requests_at_a_time(invoke: Invoke, session_factory: sessionmaker[Session]) -> None:
    org_id = _org(invoke)

    first = invoke(
        "requests", "record", str(org_id), "--count", "5", "--at", "2025-03-01T10:00:00+02:00"
    )
    naive = invoke(
        "requests", "record", str(org_id), "--count", "7", "--at", "2025-03-02T10:00:00", "--json"
    )
    now = invoke("requests", "record", str(org_id), "--count", "1")

    assert first.exit_code == 0, first.output
    assert json.loads(naive.stdout)["total"] == 12
    assert now.exit_code == 0 and "13 in total" in now.stdout
    with session_factory() as session:
        times = list(session.scalars(select(RequestLog.occurred_at).order_by(RequestLog.id)))
    assert times[0] == datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    assert times[1] == datetime(2025, 3, 2, 10, 0, tzinfo=UTC)


def test_record_requests_a_duration_ago_on_the_test_clock(
    invoke: Invoke,
    session_factory: sessionmaker[Session],
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
) -> None:
    org_id = _org(invoke)
    clock = stripe_client.v1.test_helpers.test_clocks.create({"frozen_time": 1927530900})
    env = {
        "STRIPE_API_BASE": emulator.url,
        "STRIPE_SECRET_KEY": "sk_test_cli",
        "STRIPE_TEST_CLOCK": clock.id,
    }

    now = invoke("requests", "record", str(org_id), "--count", "3", env=env)
    ago = invoke("requests", "record", str(org_id), "--count", "4", "--at", "-1d2h", env=env)
    wrong = invoke("requests", "record", str(org_id), "--count", "4", "--at", "-soon", env=env)

    assert now.exit_code == 0, now.output
    assert ago.exit_code == 0, ago.output
    assert_clean_error(wrong, "not a duration")
    with session_factory() as session:
        times = list(session.scalars(select(RequestLog.occurred_at).order_by(RequestLog.id)))
    clock_now = datetime.fromtimestamp(1927530900, UTC)
    assert times == [clock_now, clock_now - timedelta(days=1, hours=2)]


def test_record_requests_refuses_bad_input(invoke: Invoke) -> None:
    org_id = _org(invoke)

    assert_clean_error(invoke("requests", "record", str(org_id), "--count", "0"), "at least 1")
    assert_clean_error(invoke("requests", "record", str(org_id), "--count", "-3"), "at least 1")
    assert_clean_error(
        invoke("requests", "record", str(org_id), "--count", "2", "--at", "yesterday"),
        "not an ISO 8601 time",
    )
    assert_clean_error(
        invoke("requests", "record", "999999", "--count", "2"), "Org 999999 does not exist"
    )


def test_prune_deletes_only_requests_no_report_can_bill(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    org_id = _org(invoke)
    now = datetime.now(UTC)
    for days in (400, 100, 70, 10):
        at = (now - timedelta(days=days)).isoformat()
        recorded = invoke("requests", "record", str(org_id), "--count", str(days), "--at", at)
        assert recorded.exit_code == 0, recorded.output

    too_soon = invoke("requests", "prune", "--older-than-days", "30")
    pruned = invoke("requests", "prune", "--batch-size", "1", "--json")

    assert_clean_error(too_soon, "may still be billed", "keep at least 66 days")
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["deleted"] == 2  # 400 and 100 days, one per batch
    with session_factory() as session:
        left = sorted(session.scalars(select(RequestLog.count)))
    assert left == [10, 70]


# token -----------------------------------------------------------------------------


def test_token_for_a_member(invoke: Invoke) -> None:
    org_id = _org(invoke)
    invoke("members", "add", str(org_id), "--email", "grace@acme.test")

    result = invoke("token", str(org_id), "--email", "grace@acme.test")

    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = decode_token(_rules(), token)
    assert claims.org_id == org_id
    assert claims.user_id > 0


def test_token_carries_audience_issuer_and_a_bounded_lifetime(invoke: Invoke) -> None:
    org_id = _org(invoke)
    env = {
        "AUTH_JWT_AUDIENCE": "console",
        "AUTH_JWT_ISSUER": "accounts",
        "AUTH_JWT_MAX_TTL_SECONDS": "900",
    }

    default = invoke("token", str(org_id), "--email", "ada@acme.test", env=env)
    short = invoke("token", str(org_id), "--email", "ada@acme.test", "--ttl-minutes", "5", env=env)

    assert default.exit_code == 0, default.output
    payload = jwt.decode(
        default.stdout.strip(),
        JWT_SECRET,
        algorithms=["HS256"],
        audience="console",
        issuer="accounts",
    )
    assert payload["exp"] - payload["iat"] == 900  # an hour, cut to the maximum
    assert abs(payload["iat"] - time.time()) < 10
    short_payload = jwt.decode(
        short.stdout.strip(), JWT_SECRET, algorithms=["HS256"], audience="console"
    )
    assert short_payload["exp"] - short_payload["iat"] == 300


def test_token_longer_than_the_maximum_is_refused(invoke: Invoke) -> None:
    org_id = _org(invoke)

    result = invoke("token", str(org_id), "--email", "ada@acme.test", "--ttl-minutes", "61")

    assert_clean_error(result, "AUTH_JWT_MAX_TTL_SECONDS", "3600 s")
    assert result.stdout == ""


def test_token_refuses_a_secret_shorter_than_32_bytes(invoke: Invoke) -> None:
    org_id = _org(invoke)

    result = invoke(
        "token", str(org_id), "--email", "ada@acme.test", env={"AUTH_JWT_SECRET": "cli-test-secret"}
    )

    assert_clean_error(result, "AUTH_JWT_SECRET is 15 bytes long", "at least 32 bytes")
    assert result.stdout == ""


def test_token_refused_for_a_non_member(invoke: Invoke) -> None:
    acme = _org(invoke)
    _org(invoke, "Globex", "hank@globex.test")

    result = invoke("token", str(acme), "--email", "hank@globex.test")

    assert_clean_error(result, f"hank@globex.test is not a member of org {acme}")


def test_token_needs_a_secret(invoke: Invoke) -> None:
    org_id = _org(invoke)

    result = invoke("token", str(org_id), "--email", "ada@acme.test", env={"AUTH_JWT_SECRET": None})

    assert_clean_error(result, "AUTH_JWT_SECRET")


def test_settings_come_from_the_dev_home(invoke: Invoke, cli_home: object) -> None:
    """A second terminal with the same home needs no exports: `settings.env` is read."""
    from pathlib import Path

    from tooling.home import write_settings_file

    assert isinstance(cli_home, Path)
    write_settings_file(cli_home, {"AUTH_JWT_SECRET": FROM_HOME_SECRET})
    org_id = _org(invoke)

    from_home = invoke(
        "token", str(org_id), "--email", "ada@acme.test", env={"AUTH_JWT_SECRET": None}
    )
    env_wins = invoke("token", str(org_id), "--email", "ada@acme.test")

    assert decode_token(_rules(FROM_HOME_SECRET), from_home.stdout.strip()).org_id == org_id
    assert decode_token(_rules(), env_wins.stdout.strip()).org_id == org_id


def test_record_requests_refuses_a_closed_org(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    from billing.db import orgs

    org_id = _org(invoke)
    with session_factory.begin() as session:
        orgs.close_org(session, org_id)

    refused = invoke("requests", "record", str(org_id), "--count", "5")

    assert_clean_error(refused, "was closed")
    with session_factory() as session:
        assert session.scalar(select(RequestLog.id).where(RequestLog.org_id == org_id)) is None
