"""Orgs, users and memberships, written straight to the database for API tests."""

from __future__ import annotations

import itertools
import random
import uuid

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from billing.db.models import Membership, Org, User
from billing.domain import SubscriptionStatus

# Org ids far above the sequence, different in every run: the Temporal dev
# server outlives the per-test TRUNCATE, so `org-billing-{id}` must not repeat.
_org_ids = itertools.count(random.randrange(10_000_000, 1_000_000_000, 1000))


def unused_org_id() -> int:
    """An org id no test in this session has used (for orgs that must not exist)."""
    return next(_org_ids)


def make_org(
    session_factory: sessionmaker[Session],
    *,
    org_id: int | None = None,
    name: str = "Acme",
    stripe_customer_id: str | None = None,
    stripe_subscription_id: str | None = None,
    subscription_status: SubscriptionStatus = SubscriptionStatus.TRIALING,
    aws_account_id: str | None = None,
) -> Org:
    """An org row with a fresh, session-unique id (unless one is given)."""
    with session_factory.begin() as session:
        org = Org(
            id=org_id if org_id is not None else unused_org_id(),
            name=name,
            stripe_customer_id=stripe_customer_id,
            stripe_subscription_id=stripe_subscription_id,
            subscription_status=subscription_status,
            aws_account_id=aws_account_id,
        )
        session.add(org)
    return org


def make_user(session_factory: sessionmaker[Session], *, email: str | None = None) -> User:
    with session_factory.begin() as session:
        user = User(email=email or f"user-{uuid.uuid4().hex[:10]}@example.com")
        session.add(user)
    return user


def add_member(
    session_factory: sessionmaker[Session], org_id: int, user_id: int, *, role: str = "member"
) -> None:
    with session_factory.begin() as session:
        session.add(Membership(org_id=org_id, user_id=user_id, role=role))


def remove_member(session_factory: sessionmaker[Session], org_id: int, user_id: int) -> None:
    with session_factory.begin() as session:
        session.execute(
            delete(Membership).where(Membership.org_id == org_id, Membership.user_id == user_id)
        )


def make_org_with_member(
    session_factory: sessionmaker[Session], *, role: str = "member", **org_fields: object
) -> tuple[Org, User]:
    """An org and one user who is a member of it (`role`: member, billing_admin, owner)."""
    org = make_org(session_factory, **org_fields)  # type: ignore[arg-type]
    user = make_user(session_factory)
    add_member(session_factory, org.id, user.id, role=role)
    return org, user
