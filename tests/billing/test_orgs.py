"""The org data rules against real Postgres: billed elsewhere, orgs without billing."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from billing.db import orgs
from billing.db.models import Org
from billing.domain import MembershipRole


def _org(session: Session, name: str, *, aws: str | None = None, azure: str | None = None) -> int:
    org = orgs.create_org_with_owner(
        session,
        name=name,
        owner_email=f"owner@{name}.test",
        aws_account_id=aws,
        azure_subscription_id=azure,
    )
    return org.id


def test_billed_elsewhere_is_the_same_rule_in_python_and_in_sql(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        plain = _org(session, "plain")
        aws = _org(session, "aws", aws="123456789012")
        azure = _org(session, "azure", azure="sub-1")
        both = _org(session, "both", aws="1", azure="2")
    with session_factory() as session:
        in_sql = set(session.scalars(select(Org.id).where(Org.billed_elsewhere)))
        in_python = {org.id for org in session.scalars(select(Org)) if org.billed_elsewhere}
        profiles = {
            org_id
            for org_id in (plain, aws, azure, both)
            if orgs.org_profile(session, org_id).billed_elsewhere
        }
    assert in_sql == in_python == profiles == {aws, azure, both}


def test_orgs_without_billing_pages_through_orgs_to_provision(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        first, second, third = (_org(session, f"org{i}") for i in range(3))
        _org(session, "aws", aws="123456789012")
        subscribed = orgs.get_org(session, _org(session, "subscribed"))
        subscribed.stripe_subscription_id = "sub_123"
    with session_factory() as session:
        assert orgs.orgs_without_billing(session) == [first, second, third]
        assert orgs.orgs_without_billing(session, limit=2) == [first, second]
        assert orgs.orgs_without_billing(session, after_id=second, limit=2) == [third]


def test_the_billed_elsewhere_expression_matches_the_partial_index(
    session_factory: sessionmaker[Session],
) -> None:
    """Postgres proves `NOT (aws IS NOT NULL OR azure IS NOT NULL)` implies the index's
    `aws IS NULL AND azure IS NULL`, so the backfill's query can read only the index."""
    query = select(Org.id).where(Org.stripe_subscription_id.is_(None), ~Org.billed_elsewhere)
    with session_factory() as session, session.begin():
        sql = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(session.scalars(text(f"EXPLAIN {sql}")))
    assert "ix_orgs_without_billing" in plan, plan


def test_roles_are_owner_billing_admin_and_member_with_exactly_one_owner(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "roles")
        admin = orgs.add_member(
            session, org_id, "admin@roles.test", role=MembershipRole.BILLING_ADMIN
        )
        member = orgs.add_member(session, org_id, "member@roles.test")
        owner = orgs.find_user(session, "owner@roles.test")
    with session_factory() as session:
        assert orgs.member_role(session, org_id, owner.id) == MembershipRole.OWNER
        assert orgs.member_role(session, org_id, admin.id) == MembershipRole.BILLING_ADMIN
        assert orgs.member_role(session, org_id, member.id) == MembershipRole.MEMBER
        assert orgs.member_role(session, org_id + 1, member.id) is None
        assert orgs.member_role(session, org_id, 2**31 - 1) is None
    # The database keeps the rules too, whoever writes to it.
    for statement in (
        f"UPDATE memberships SET role = 'admin' WHERE user_id = {member.id}",
        f"UPDATE memberships SET role = 'owner' WHERE user_id = {admin.id}",
    ):
        with pytest.raises(IntegrityError), session_factory.begin() as session:
            session.execute(text(statement))


@pytest.mark.parametrize(
    ("role", "message"), [("owner", "exactly one owner"), ("root", "'root' is not a role")]
)
def test_only_member_and_billing_admin_can_be_granted(
    session_factory: sessionmaker[Session], role: str, message: str
) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, f"grant-{role}")
        with pytest.raises(orgs.InvalidInputError, match=message):
            orgs.add_member(session, org_id, "eve@grant.test", role=role)  # type: ignore[arg-type]
        members = [m.email for m in orgs.list_members(session, org_id)]
        assert members == [f"owner@grant-{role}.test"]
