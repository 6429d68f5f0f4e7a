"""The org data rules against real Postgres: billed elsewhere, orgs without billing,
membership history, and the org row following the newest Stripe read."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from activities.db_activities import DbActivities
from activities.models import SaveSubscriptionInput
from billing.config import Settings
from billing.db import orgs
from billing.db.models import Membership, Org, User
from billing.domain import MembershipRole, SubscriptionSnapshot, SubscriptionStatus


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


# Membership history ----------------------------------------------------------------------


def _at(day: int) -> datetime:
    return datetime(2026, 3, day, tzinfo=UTC)


def test_leaving_keeps_the_membership_as_history(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "history")
        orgs.add_member(session, org_id, "grace@example.com", at=_at(2))
        orgs.add_member(session, org_id, "alan@example.com", at=_at(3))
        orgs.remove_member(session, org_id, "alan@example.com", at=_at(10))
    with session_factory() as session:
        rows = session.execute(
            select(Membership.joined_at, Membership.left_at)
            .join(User, User.id == Membership.user_id)
            .where(Membership.org_id == org_id, User.email == "alan@example.com")
        ).all()
        assert [(r.joined_at, r.left_at) for r in rows] == [(_at(3), _at(10))]
        # Now: the owner and grace, everywhere members are counted or checked.
        assert orgs.member_count(session, org_id) == 2
        assert [m.email for m in orgs.list_members(session, org_id)] == [
            "owner@history.test",
            "grace@example.com",
        ]
        assert orgs.org_summary(session, org_id).members == 2
        alan = orgs.find_user(session, "alan@example.com")
        assert not orgs.is_member(session, org_id, alan.id)


def test_the_users_level_is_read_at_any_moment(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "level")
        owner_joined = orgs.get_org(session, org_id).created_at
        orgs.add_member(session, org_id, "grace@example.com", at=_at(2))
        orgs.add_member(session, org_id, "alan@example.com", at=_at(3))
        orgs.remove_member(session, org_id, "alan@example.com", at=_at(10))
    with session_factory() as session:
        level = [orgs.member_count_at(session, org_id, _at(day)) for day in (1, 2, 9, 10, 20)]
    # The owner joined when the org was made (now), after March 2026 in these days: 0 then.
    owner = 1 if owner_joined <= _at(1) else 0
    assert level == [owner, owner + 1, owner + 2, owner + 1, owner + 1]


def test_a_member_who_left_can_come_back_and_leave_again(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "again")
        orgs.add_member(session, org_id, "grace@example.com", at=_at(2))
        orgs.remove_member(session, org_id, "grace@example.com", at=_at(5))
        orgs.add_member(session, org_id, "grace@example.com", at=_at(8))
        with pytest.raises(orgs.ConflictError):
            orgs.add_member(session, org_id, "grace@example.com")
    with session_factory.begin() as session:
        assert orgs.member_count_at(session, org_id, _at(6)) < orgs.member_count_at(
            session, org_id, _at(9)
        )
        orgs.remove_member(session, org_id, "grace@example.com", at=_at(12))
        with pytest.raises(orgs.NotFoundError):
            orgs.remove_member(session, org_id, "grace@example.com")
    with session_factory() as session:
        count = session.scalar(
            select(func.count()).select_from(Membership).where(Membership.org_id == org_id)
        )
        assert count == 3  # the owner and grace's two stays


def test_a_member_cannot_leave_before_joining(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "order")
        orgs.add_member(session, org_id, "grace@example.com", at=_at(5))
        with pytest.raises(orgs.InvalidInputError, match="cannot leave before"):
            orgs.remove_member(session, org_id, "grace@example.com", at=_at(4))


def test_the_owner_cannot_leave(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "owned")
        with pytest.raises(orgs.ConflictError, match="owns org"):
            orgs.remove_member(session, org_id, "owner@owned.test")


# The org row follows the newest Stripe read -------------------------------------------


def _snapshot(status: SubscriptionStatus, end: datetime) -> SubscriptionSnapshot:
    return SubscriptionSnapshot(
        id="sub_stamp",
        customer_id="cus_stamp",
        status=status,
        subscription_end=end,
        trial_end=None,
        current_period_start=_at(1),
        current_period_end=end,
    )


def test_a_stale_read_never_overwrites_a_newer_one(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    with session_factory.begin() as session:
        org_id = _org(session, "stamped")
    db = DbActivities(session_factory, Settings.model_validate({"database_url": database_url}))
    newer = _snapshot(SubscriptionStatus.CANCELED, _at(20))
    older = _snapshot(SubscriptionStatus.ACTIVE, _at(31))
    first = db.save_subscription(
        SaveSubscriptionInput(org_id=org_id, subscription=newer, synced_at=_at(2))
    )
    assert {d.field for d in first} >= {"subscription_status", "subscription_end"}

    # The older read's activity woke up late (a retried attempt): it changes nothing.
    late = db.save_subscription(
        SaveSubscriptionInput(org_id=org_id, subscription=older, synced_at=_at(1))
    )

    assert late == []
    with session_factory() as session:
        row = orgs.get_org(session, org_id)
        assert (row.subscription_status, row.subscription_end) == ("canceled", _at(20))
        assert row.stripe_synced_at == _at(2)
    # A newer read (or the same one again) applies.
    again = db.save_subscription(
        SaveSubscriptionInput(org_id=org_id, subscription=older, synced_at=_at(3))
    )
    assert {d.field for d in again} == {"subscription_status", "subscription_end"}
    with session_factory() as session:
        assert orgs.get_org(session, org_id).subscription_status == "active"


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


def test_routing_facts_answer_each_pair_in_order_with_one_statement(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        first = _org(session, "first")
        second = _org(session, "second")
        orgs.save_customer(session, first, "cus_first")
    pairs: list[tuple[str | None, int | None]] = [
        ("cus_first", second),  # the customer's org, and another org that exists
        ("cus_unknown", first),
        (None, 2**31 - 1),  # no such org
        ("cus_first", None),
        (None, 0),  # not an id at all
        ("cus_first", first),  # the same pair twice: each gets its answer
        ("cus_first", first),
    ]
    with session_factory() as session:
        facts = orgs.routing_facts(session.connection(), pairs)
        assert orgs.routing_facts(session.connection(), []) == []

    assert [(f.org_for_customer, f.org_exists) for f in facts] == [
        (first, True),
        (None, True),
        (None, False),
        (first, False),
        (None, False),
        (first, True),
        (first, True),
    ]
    # The same answers as the one-at-a-time reads they replace.
    with session_factory() as session:
        for (customer, org_id), fact in zip(pairs, facts, strict=True):
            by_customer = orgs.org_id_for_customer(session, customer) if customer else None
            assert fact.org_for_customer == by_customer
            assert fact.org_exists == (org_id is not None and orgs.org_exists(session, org_id))
