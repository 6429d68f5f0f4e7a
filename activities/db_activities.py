"""Activities that read and write Postgres. Only the org's workflow calls them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import ParamSpec, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import (
    MarkSentInput,
    MeterEventToSend,
    OrgPage,
    PlanUsageInput,
    SaveCustomerInput,
    SaveSubscriptionInput,
    UsagePlan,
)
from billing.config import Settings
from billing.db.models import Membership, Org, RequestLog, UsageLedger, User
from billing.domain import FieldDifference, LedgerStatus, MembershipRole, OrgProfile
from billing.stripe_keys import meter_identifier

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# Stripe accepts meter events up to 35 days old; keep a margin for the send itself.
METER_EVENT_MAX_AGE = timedelta(days=35) - timedelta(minutes=10)


def _fmt(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def conflicts_are_final(fn: Callable[P, R]) -> Callable[P, R]:
    """A unique-constraint conflict (a Stripe id already on another org) is no outage:
    retrying cannot fix it, so it is raised non-retryable for the workflow to show."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except IntegrityError as err:
            raise ApplicationError(
                f"conflicting billing data: {err.orig}", type="Conflict", non_retryable=True
            ) from err

    return wrapper


class DbActivities:
    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self._sessions = session_factory
        self._settings = settings

    @activity.defn(name="db_load_org")
    def load_org(self, org_id: int) -> OrgProfile:
        """The org and its owner, as Stripe needs them."""
        with self._sessions() as session:
            org = session.get(Org, org_id)
            if org is None:
                raise ApplicationError(
                    f"Org {org_id} does not exist.", type="OrgNotFound", non_retryable=True
                )
            owner = session.scalars(
                select(User)
                .join(Membership, Membership.user_id == User.id)
                .where(Membership.org_id == org_id, Membership.role == MembershipRole.OWNER)
            ).first()
            if owner is None:
                raise ApplicationError(
                    f"Org {org_id} has no owner: add one before it can be billed.",
                    type="OrgWithoutOwner",
                    non_retryable=True,
                )
            return OrgProfile(
                org_id=org.id,
                org_uid=org.uid,
                name=org.name,
                owner_email=owner.email,
                owner_first_name=owner.first_name,
                owner_last_name=owner.last_name,
                aws_account_id=org.aws_account_id,
                azure_subscription_id=org.azure_subscription_id,
                stripe_customer_id=org.stripe_customer_id,
                stripe_subscription_id=org.stripe_subscription_id,
            )

    @activity.defn(name="db_save_customer")
    @conflicts_are_final
    def save_customer(self, data: SaveCustomerInput) -> None:
        """Recorded as soon as it exists, so webhooks can route by customer id."""
        with self._sessions.begin() as session:
            org = session.get(Org, data.org_id, with_for_update=True)
            if org is None:
                raise ApplicationError(
                    f"Org {data.org_id} does not exist.", type="OrgNotFound", non_retryable=True
                )
            org.stripe_customer_id = data.customer_id

    @activity.defn(name="db_save_subscription")
    @conflicts_are_final
    def save_subscription(self, data: SaveSubscriptionInput) -> list[FieldDifference]:
        """Bring the org row in line with Stripe; return what differed."""
        sub = data.subscription
        with self._sessions.begin() as session:
            org = session.get(Org, data.org_id, with_for_update=True)
            if org is None:
                raise ApplicationError(
                    f"Org {data.org_id} does not exist.", type="OrgNotFound", non_retryable=True
                )
            wanted: dict[str, object] = {
                "stripe_customer_id": sub.customer_id,
                "stripe_subscription_id": sub.id,
                "subscription_status": sub.status,
                "subscription_end": sub.subscription_end,
            }
            diffs: list[FieldDifference] = []
            for field, value in wanted.items():
                before = getattr(org, field)
                if _fmt(before) != _fmt(value):
                    diffs.append(
                        FieldDifference(field=field, before=_fmt(before), after=_fmt(value))
                    )
                    setattr(org, field, value)
            if diffs:
                log.info(
                    "org row updated from Stripe",
                    extra={"org_id": data.org_id, "fields": [d.field for d in diffs]},
                )
            return diffs

    @activity.defn(name="db_orgs_without_billing")
    def orgs_without_billing(self, page: OrgPage) -> list[int]:
        """Org ids with no Stripe subscription and no marketplace billing, in id order."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Org.id)
                    .where(
                        Org.stripe_subscription_id.is_(None),
                        Org.aws_account_id.is_(None),
                        Org.azure_subscription_id.is_(None),
                        Org.id > page.after_id,
                    )
                    .order_by(Org.id)
                    .limit(page.limit)
                )
            )

    @activity.defn(name="db_plan_usage")
    def plan_usage(self, data: PlanUsageInput) -> UsagePlan:
        """Write the meter events this report needs as `pending` ledger rows.

        Requests are sent as the delta over what the ledger already holds for the
        period; users as the level when it changed. Rows left `pending` by a crash
        are returned again with their original identifier and value.
        """
        s = self._settings
        start, end = data.period_start, data.period_end
        timestamp = min(max(data.report_time, start), end - timedelta(seconds=1))
        with self._sessions.begin() as session:
            users = (
                session.scalar(
                    select(func.count())
                    .select_from(Membership)
                    .where(Membership.org_id == data.org_id)
                )
                or 0
            )
            requests = (
                session.scalar(
                    select(func.coalesce(func.sum(RequestLog.count), 0)).where(
                        RequestLog.org_id == data.org_id,
                        RequestLog.occurred_at >= start,
                        RequestLog.occurred_at < end,
                    )
                )
                or 0
            )
            # Every row counts as reported, skipped ones too: what Stripe refused is
            # never re-sent.
            rows = list(
                session.scalars(
                    select(UsageLedger)
                    .where(UsageLedger.org_id == data.org_id, UsageLedger.period_start == start)
                    .order_by(UsageLedger.seq)
                    .with_for_update()
                )
            )
            next_seq = {
                dim: max([r.seq for r in rows if r.dimension == dim], default=0) + 1
                for dim in (s.stripe_users_dimension, s.stripe_requests_dimension)
            }
            new_rows: list[UsageLedger] = []
            requests_dim = s.stripe_requests_dimension
            delta = int(requests) - sum(r.value for r in rows if r.dimension == requests_dim)
            if delta > 0:
                new_rows.append(
                    self._row(data, requests_dim, next_seq[requests_dim], delta, timestamp)
                )
            users_dim = s.stripe_users_dimension
            last_users = [r for r in rows if r.dimension == users_dim]
            if not last_users or last_users[-1].value != users:
                new_rows.append(
                    self._row(data, users_dim, next_seq[users_dim], int(users), timestamp)
                )

            too_old = data.report_time - METER_EVENT_MAX_AGE
            skipped_reason: str | None = None
            to_send: list[UsageLedger] = []
            for row in [r for r in rows if r.status == LedgerStatus.PENDING] + new_rows:
                if row.event_timestamp < too_old:
                    skipped_reason = (
                        f"period {start.isoformat()}..{end.isoformat()} ended more than 35 days"
                        " before the report; Stripe no longer accepts its meter events"
                    )
                    row.status = LedgerStatus.SKIPPED
                    row.reason = skipped_reason
                else:
                    to_send.append(row)
            session.add_all(new_rows)
            if skipped_reason:
                log.warning(
                    "usage skipped", extra={"org_id": data.org_id, "reason": skipped_reason}
                )
            return UsagePlan(
                events=[
                    MeterEventToSend(
                        identifier=row.identifier,
                        dimension=row.dimension,
                        event_name=row.dimension,
                        customer_id=data.customer_id,
                        value=row.value,
                        timestamp=row.event_timestamp,
                    )
                    for row in to_send
                ],
                users=int(users),
                requests=int(requests),
                skipped_reason=skipped_reason,
            )

    @staticmethod
    def _row(
        data: PlanUsageInput, dimension: str, seq: int, value: int, timestamp: datetime
    ) -> UsageLedger:
        return UsageLedger(
            org_id=data.org_id,
            dimension=dimension,
            period_start=data.period_start,
            period_end=data.period_end,
            seq=seq,
            identifier=meter_identifier(data.org_id, dimension, data.period_start, seq),
            value=value,
            event_timestamp=timestamp,
            status=LedgerStatus.PENDING,
        )

    @activity.defn(name="db_mark_usage_sent")
    def mark_usage_sent(self, data: MarkSentInput) -> None:
        with self._sessions.begin() as session:
            for row in session.scalars(
                select(UsageLedger).where(UsageLedger.identifier.in_(data.identifiers))
            ):
                row.status = LedgerStatus.SENT
                row.sent_at = datetime.now(UTC)
