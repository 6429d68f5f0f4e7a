"""CLI input that cannot be stored: one sentence, exit code 1, nothing written."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from billing.db.models import Membership, Org, RequestLog, User
from tests.cli.conftest import Invoke, assert_clean_error
from tests.factories.orgs import make_org


def _rows(session_factory: sessionmaker[Session]) -> tuple[int, ...]:
    with session_factory() as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in (Org, User, Membership, RequestLog)
        )


def _refused(invoke: Invoke, session_factory: sessionmaker[Session], *args: str) -> str:
    before = _rows(session_factory)
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert_clean_error(result)
    assert _rows(session_factory) == before
    return result.stderr


LONG = "x" * 256


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--name", LONG, "--owner-email", "a@b.test"), "at most 255"),
        (("--name", "Acme\x00", "--owner-email", "a@b.test"), "control characters"),
        (("--name", "Acme", "--owner-email", "a" * 320 + "@b.test"), "at most 320"),
        (("--name", "Acme", "--owner-email", "a\x00@b.test"), "control characters"),
        (("--name", "Acme", "--owner-email", "a@b.test", "--owner-first-name", LONG), "at most"),
        (("--name", "Acme", "--owner-email", "a@b.test", "--aws-account-id", LONG), "at most"),
    ],
)
def test_orgs_create_refuses_what_cannot_be_stored(
    invoke: Invoke, session_factory: sessionmaker[Session], args: tuple[str, ...], fragment: str
) -> None:
    assert fragment in _refused(invoke, session_factory, "orgs", "create", *args)


def test_members_add_refuses_long_and_nul_input(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    org = make_org(session_factory)
    _refused(invoke, session_factory, "members", "add", str(org.id), "--email", "m\x00@b.test")
    _refused(
        invoke,
        session_factory,
        "members",
        "add",
        str(org.id),
        "--email",
        "m@b.test",
        "--name",
        "A " + LONG,
    )


@pytest.mark.parametrize("org_id", ["2147483648", "99999999999999999999999", "0"])
def test_org_ids_beyond_the_column_are_unknown_orgs(
    invoke: Invoke, session_factory: sessionmaker[Session], org_id: str
) -> None:
    for args in (
        ("orgs", "show", org_id),
        ("requests", "record", org_id, "--count", "1"),
        ("members", "add", org_id, "--email", "m@b.test"),
    ):
        assert "org" in _refused(invoke, session_factory, *args).lower()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--count", "2147483648"), "between 1 and"),
        (("--count", "1", "--at", "0001-01-01T00:00:00Z"), "outside any billing period"),
        (("--count", "1", "--at", "9999-12-31T00:00:00Z"), "outside any billing period"),
        (("--count", "1", "--at", ""), "--at is empty"),
        (("--count", "1", "--at", "   "), "--at is empty"),
    ],
)
def test_requests_record_refuses_counts_and_times_out_of_range(
    invoke: Invoke, session_factory: sessionmaker[Session], extra: tuple[str, ...], fragment: str
) -> None:
    org = make_org(session_factory)
    stderr = _refused(invoke, session_factory, "requests", "record", str(org.id), *extra)
    assert fragment in stderr
