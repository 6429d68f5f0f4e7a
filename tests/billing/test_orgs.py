"""The org data rules against real Postgres: billed elsewhere, orgs without billing."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from billing.db import orgs
from billing.db.models import Org


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
