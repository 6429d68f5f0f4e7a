"""The database schema. `orgs` keeps the seed's columns exactly."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from billing.domain import (
    LedgerStatus,
    MembershipRole,
    SubscriptionStatus,
    is_billed_elsewhere,
)


class Base(DeclarativeBase):
    pass


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


def _string_enum(enum: type[StrEnum], name: str, length: int) -> Enum:
    """A VARCHAR column holding the enum's values; the CHECK constraint is the migration's."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        length=length,
        values_callable=_values,
        validate_strings=True,
    )


def _one_of(column: str, enum: type[StrEnum]) -> str:
    """The CHECK constraint's text: `column IN ('a', 'b')`."""
    return f"{column} IN ({', '.join(repr(value) for value in _values(enum))})"


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(
        String(36), unique=True, nullable=False, default=lambda: str(uuid.uuid4())
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    subscription_status: Mapped[SubscriptionStatus] = mapped_column(
        _string_enum(SubscriptionStatus, "subscription_status", 32),
        nullable=False,
        default=SubscriptionStatus.TRIALING,
        server_default=SubscriptionStatus.TRIALING.value,
    )
    subscription_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    aws_account_id: Mapped[str | None] = mapped_column(String(255))
    azure_subscription_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )
    # When the org's workflow decided the Stripe read now in the row: an older
    # read (a retried activity that woke up late) never overwrites a newer one.
    stripe_synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The entitlement rule's answer (billing/entitlement.py), written by the org's
    # workflow whenever it changes: entitled until `access_until` when that is set.
    entitled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=True, server_default=text("true")
    )
    access_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the org was closed (the service API's DELETE): its rows stay for audit,
    # it takes no usage, and its workflow ends its subscription (ORG_CLOSE_CANCELS).
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    memberships: Mapped[list[Membership]] = relationship(back_populates="org")

    @hybrid_property
    def billed_elsewhere(self) -> bool:
        """Billed by a cloud marketplace, not by us: `org.billed_elsewhere` in Python,
        `Org.billed_elsewhere` in a query, one expression for both."""
        return is_billed_elsewhere(self.aws_account_id, self.azure_subscription_id)

    __table_args__ = (
        # Orgs that still need billing: the backfill pages through this index. The
        # text is the migration's; Postgres matches it to `orgs.orgs_without_billing`'s
        # `stripe_subscription_id IS NULL AND NOT Org.billed_elsewhere`.
        Index(
            "ix_orgs_without_billing",
            "id",
            postgresql_where=text(
                "stripe_subscription_id IS NULL AND aws_account_id IS NULL "
                "AND azure_subscription_id IS NULL"
            ),
        ),
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True, nullable=False)
    first_name: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    last_name: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    # The console's own id of the user (the service API's `user_external_id`, a
    # JWKS token's `sub`); None if the console never named it.
    external_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    memberships: Mapped[list[Membership]] = relationship(back_populates="user")

    __table_args__ = (
        Index(
            "uq_users_external_id",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
        ),
    )


class Membership(Base):
    """A user's stay in an org, from `joined_at` until `left_at` (None: still a member).

    Leaving keeps the row, so the users meter can report the level as of any
    period's end; a user who comes back gets a new row.
    """

    __tablename__ = "memberships"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    role: Mapped[MembershipRole] = mapped_column(
        _string_enum(MembershipRole, "membership_role", 16),
        nullable=False,
        default=MembershipRole.MEMBER,
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    joined_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    left_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    org: Mapped[Org] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship(back_populates="memberships")

    __table_args__ = (
        # One current membership per user and org; past ones are history.
        Index(
            "uq_memberships_org_user_current",
            "org_id",
            "user_id",
            unique=True,
            postgresql_where=text("left_at IS NULL"),
        ),
        Index("ix_memberships_org_joined", "org_id", "joined_at"),
        CheckConstraint(_one_of("role", MembershipRole), name="ck_memberships_role"),
        Index(
            "uq_memberships_one_owner",
            "org_id",
            unique=True,
            postgresql_where=text(f"role = '{MembershipRole.OWNER.value}'"),
        ),
        Index("ix_memberships_user", "user_id"),
    )


class RequestLog(Base):
    """Requests an org made: what the requests meter counts. The host app appends."""

    __tablename__ = "request_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    count: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # The id a usage item was sent with through the service API (unique per org),
    # so a repeated item is recognised; rows written otherwise leave it empty.
    item_id: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        CheckConstraint("count > 0", name="ck_request_log_count_positive"),
        Index(
            "uq_request_log_org_item",
            "org_id",
            "item_id",
            unique=True,
            postgresql_where=text("item_id IS NOT NULL"),
        ),
        # A period's sum is an index-only scan; BRIN finds old rows for retention.
        Index(
            "ix_request_log_org_time_count",
            "org_id",
            "occurred_at",
            postgresql_include=["count"],
        ),
        Index("ix_request_log_occurred_brin", "occurred_at", postgresql_using="brin"),
    )


class UsageLedger(Base):
    """One meter event per row: written `pending` before it is sent, `sent` after.

    The identifier is deterministic, so a retry re-sends the same one and Stripe
    deduplicates; a `pending` row found on retry is sent again, never re-counted.
    """

    __tablename__ = "usage_ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    dimension: Mapped[str] = mapped_column(String(64), nullable=False)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    identifier: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status: Mapped[LedgerStatus] = mapped_column(
        _string_enum(LedgerStatus, "ledger_status", 16),
        nullable=False,
        default=LedgerStatus.PENDING,
    )
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("org_id", "dimension", "period_start", "seq", name="uq_usage_ledger_seq"),
        CheckConstraint(_one_of("status", LedgerStatus), name="ck_usage_ledger_status"),
        Index("ix_usage_ledger_org_period", "org_id", "period_start"),
    )


class StripeEventLog(Base):
    """Every webhook received, and what became of it (signalled, unroutable, ignored)."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128), nullable=False)
    created: Mapped[int] = mapped_column(BigInteger, nullable=False)
    object_id: Mapped[str | None] = mapped_column(String(255))
    org_id: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        Index("ix_stripe_events_org", "org_id", "created"),
        Index("ix_stripe_events_outcome", "outcome", "received_at"),
    )


class StripeRequestBudget(Base):
    """The next free slot of an environment's Stripe request budget (billing/stripe_budget.py).

    One row per budget name, updated by every Stripe request of every worker
    process; `paused_until` is set when Stripe answered 429.
    """

    __tablename__ = "stripe_request_budget"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    paused_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NotificationStatus(StrEnum):
    """A notification in the outbox: `pending` until delivered, or `failed` when given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Notification(Base):
    """The outbox of notifications to the console (docs/notifications.md).

    Written by the org's workflow (the id is stable per change, so a rewrite is
    a no-op); delivered in `position` order per org by the worker's delivery loop.
    """

    __tablename__ = "notifications"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The order of writing: delivery follows it per org.
    position: Mapped[int] = mapped_column(BigInteger, Identity(), nullable=False)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[NotificationStatus] = mapped_column(
        _string_enum(NotificationStatus, "notification_status", 16),
        nullable=False,
        default=NotificationStatus.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("position", name="uq_notifications_position"),
        CheckConstraint(_one_of("status", NotificationStatus), name="ck_notifications_status"),
        Index("ix_notifications_org_position", "org_id", "position"),
        Index(
            "ix_notifications_pending",
            "org_id",
            "position",
            postgresql_where=text("status = 'pending'"),
        ),
    )
