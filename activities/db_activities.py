"""Activities that read and write Postgres. Only the org's workflow calls them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import ParamSpec, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.models import (
    AdoptionRefusalInput,
    MarkSentInput,
    MeterEventToSend,
    OrgPage,
    PlanUsageInput,
    PublishInput,
    SaveCustomerInput,
    SaveSubscriptionInput,
    UsagePlan,
)
from billing.config import Settings
from billing.db import event_log, notifications, orgs
from billing.db.models import UsageLedger
from billing.domain import FieldDifference, LedgerStatus, OrgProfile
from billing.stripe_keys import meter_identifier

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# Stripe accepts meter events up to 35 days old; keep a margin for the send itself.
METER_EVENT_MAX_AGE = timedelta(days=35) - timedelta(minutes=10)


def data_errors_are_final(fn: Callable[P, R]) -> Callable[P, R]:
    """Failures retrying cannot fix are raised non-retryable, for the workflow to show:
    a missing org, an org without an owner, and a unique-constraint conflict (a
    Stripe id already on another org)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except orgs.OrgNotFoundError as err:
            raise ApplicationError(str(err), type="OrgNotFound", non_retryable=True) from None
        except orgs.OrgWithoutOwnerError as err:
            raise ApplicationError(str(err), type="OrgWithoutOwner", non_retryable=True) from None
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
    @data_errors_are_final
    def load_org(self, org_id: int) -> OrgProfile:
        """The org and its owner, as Stripe needs them."""
        with self._sessions() as session:
            return orgs.org_profile(session, org_id)

    @activity.defn(name="db_save_customer")
    @data_errors_are_final
    def save_customer(self, data: SaveCustomerInput) -> None:
        """Recorded as soon as it exists, so webhooks can route by customer id."""
        with self._sessions.begin() as session:
            orgs.save_customer(session, data.org_id, data.customer_id)

    @activity.defn(name="db_save_subscription")
    @data_errors_are_final
    def save_subscription(self, data: SaveSubscriptionInput) -> list[FieldDifference]:
        """Bring the org row in line with Stripe; return what differed."""
        with self._sessions.begin() as session:
            diffs = orgs.save_subscription(
                session, data.org_id, data.subscription, synced_at=data.synced_at
            )
        if diffs:
            log.info(
                "org row updated from Stripe",
                extra={"org_id": data.org_id, "fields": [d.field for d in diffs]},
            )
        return diffs

    @activity.defn(name="db_record_adoption_refusal")
    def record_adoption_refusal(self, data: AdoptionRefusalInput) -> None:
        """A `stripe_events` row with outcome `adoption_refused` and the reason."""
        refusal = data.refusal
        with self._sessions.begin() as session:
            event_log.record_adoption_refusal(
                session,
                org_id=data.org_id,
                event_id=refusal.event_id,
                event_type=data.event_type,
                created=data.event_created or int(refusal.at.timestamp()),
                object_id=refusal.subscription_id or refusal.customer_id,
                detail=refusal.reason,
            )
        log.warning("adoption refused", extra={"org_id": data.org_id, "reason": refusal.reason})

    @activity.defn(name="db_publish_billing")
    @data_errors_are_final
    def publish_billing(self, data: PublishInput) -> int:
        """The row's `entitled`/`access_until` (when changed) and the notifications, together.

        Notifications go to the outbox only when `BILLING_NOTIFY_URL` is set; the
        worker's delivery loop sends them. Returns how many were new (a retried
        attempt finds its ids already there).
        """
        added = 0
        with self._sessions.begin() as session:
            if data.row_changed:
                orgs.save_entitlement(
                    session,
                    data.org_id,
                    entitled=data.published.entitled,
                    access_until=data.published.access_until,
                )
            if self._settings.billing_notify_url and data.notifications:
                added = notifications.enqueue(session, data.notifications)
        if added:
            log.info(
                "notifications recorded",
                extra={"org_id": data.org_id, "types": [n.type.value for n in data.notifications]},
            )
        return added

    @activity.defn(name="db_orgs_without_billing")
    def orgs_without_billing(self, page: OrgPage) -> list[int]:
        """Org ids with no Stripe subscription and no marketplace billing, in id order."""
        with self._sessions() as session:
            return orgs.orgs_without_billing(session, after_id=page.after_id, limit=page.limit)

    @activity.defn(name="db_plan_usage")
    def plan_usage(self, data: PlanUsageInput) -> UsagePlan:
        """Write the meter events this report needs as `pending` ledger rows.

        Requests are sent as the delta over what the ledger already holds for the
        period, counting those up to the report time only (a request recorded
        with a later timestamp is billed by a later report); users as the level
        at the events' timestamp, from the membership history, when it changed.
        Every event is timestamped inside the period, before its end. Rows left
        `pending` by a crash are returned again with their original identifier
        and value (and a timestamp moved back inside the period if it was cut
        short since, or forward into the 35 days Stripe accepts if the clock
        moved on since).
        """
        s = self._settings
        start, end = data.period_start, data.period_end
        last_second = end - timedelta(seconds=1)
        timestamp = min(max(data.report_time, start), last_second)
        with self._sessions.begin() as session:
            uid = orgs.org_uid(session, data.org_id)
            users = orgs.member_count_at(session, data.org_id, timestamp)
            requests = orgs.request_total(
                session, data.org_id, since=start, until=end, through=data.report_time
            )
            # Every row counts as reported, skipped ones too: what Stripe refused is
            # never re-sent. Rows are found by (org, period), whatever the format of
            # their identifier: a period partly reported under the earlier format
            # continues with the next seq and is never reported again.
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
            delta = requests - sum(r.value for r in rows if r.dimension == requests_dim)
            if delta > 0:
                new_rows.append(
                    self._row(data, uid, requests_dim, next_seq[requests_dim], delta, timestamp)
                )
            users_dim = s.stripe_users_dimension
            last_users = [r for r in rows if r.dimension == users_dim]
            if not last_users or last_users[-1].value != users:
                new_rows.append(
                    self._row(data, uid, users_dim, next_seq[users_dim], users, timestamp)
                )

            too_old = data.report_time - METER_EVENT_MAX_AGE
            skipped_reason: str | None = None
            to_send: list[UsageLedger] = []
            for row in [r for r in rows if r.status == LedgerStatus.PENDING] + new_rows:
                if row.event_timestamp > last_second:
                    row.event_timestamp = last_second
                    row.period_end = end
                if too_old <= last_second and row.event_timestamp < too_old:
                    # A row left pending long ago, in a period Stripe still takes:
                    # moved forward into Stripe's window, still inside its period
                    # (in seq order, so the last users level stays the last).
                    row.event_timestamp = too_old
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
                users=users,
                requests=requests,
                skipped_reason=skipped_reason,
            )

    def _row(
        self,
        data: PlanUsageInput,
        org_uid: str,
        dimension: str,
        seq: int,
        value: int,
        timestamp: datetime,
    ) -> UsageLedger:
        """A new ledger row, its identifier in the current format (older rows keep theirs)."""
        return UsageLedger(
            org_id=data.org_id,
            dimension=dimension,
            period_start=data.period_start,
            period_end=data.period_end,
            seq=seq,
            identifier=meter_identifier(
                data.org_id,
                dimension,
                data.period_start,
                seq,
                source=self._settings.billing_source,
                org_uid=org_uid,
            ),
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
