"""Adopting the orgs the legacy implementation billed: `billing adopt` and the backfill.

The console's existing orgs have a Stripe customer and subscription made by
the implementation this one replaces: customer metadata `orgId`, `orgUid` and
`source` (one of `BILLING_LEGACY_SOURCES`), and meter events with its own
identifiers (`requests-{orgId}-{timestamp}`). For every org with a
subscription id and no running workflow, adoption:

1. proves the customer is the org's (ours by `org_uid`/`source`, or the legacy
   implementation's by `orgUid`/`source`), else refuses and says why;
2. adds the current metadata keys the customer lacks (`org_id`, `org_uid`,
   `source`), never changing or removing a key it has;
3. reads what the requests meter already holds for the customer in the current
   period (Stripe's meter event summary) and records it in the usage ledger as
   reported (sequence 0 of the period, status `sent`, never sent again): the
   workflow's reports send only the period's requests above it, so no request
   is billed twice across the switch;
4. starts the org's workflow, which links the existing subscription (a
   workflow a webhook started, waiting after it refused the customer, is asked
   to provision again).

Steps 3 and 2 run in that order: until `org_uid` is on the customer, the
workflow's provisioning does not take it for the org's, so no usage report
runs before the record of what was already reported is in place.

With `dry_run`, every read is made and the same report is returned, and
nothing is written to Stripe, the database or Temporal. See
docs/legacy-adoption.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Literal

import stripe
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from billing.config import Settings
from billing.constants import org_workflow_id
from billing.db import orgs
from billing.db.models import Org, UsageLedger
from billing.domain import (
    BillingStatus,
    LedgerStatus,
    OrgProfile,
    SubscriptionSnapshot,
    SubscriptionStatus,
)
from billing.orchestration import (
    query_state,
    start_org_workflow,
    start_provisioning,
    tuning_of,
)
from billing.stripe_gateway import StripeGateway
from billing.stripe_keys import environment_tag, params_digest

log = logging.getLogger(__name__)

# Statuses whose current period Stripe bills metered usage for (as the workflow's).
_USAGE_STATUSES = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
    }
)
# Stripe accepts meter events up to 5 minutes ahead: the summary reaches that far.
_FUTURE_WINDOW = timedelta(minutes=5)
SEED_SEQ = 0
SEED_REASON = "reported before adoption (Stripe's meter event summary for the customer)"

Outcome = Literal["adopted", "would_adopt", "skipped", "refused"]


class AdoptionLine(BaseModel):
    """What adoption did (or, in a dry run, would do) for one org."""

    org_id: int
    outcome: Outcome
    reason: str | None = None
    customer_id: str | None = None
    subscription_id: str | None = None
    # The customer's metadata keys added (or to add), each with its value.
    metadata_added: dict[str, str] = Field(default_factory=dict)
    period_start: datetime | None = None
    period_end: datetime | None = None
    # Requests the meter already holds for the customer in the current period.
    requests_already_reported: int | None = None
    # Of those, what the usage ledger records as reported (or would): the rest
    # were already in the ledger.
    requests_recorded_as_reported: int = 0
    workflow_started: bool = False
    # The org's workflow was running, waiting to provision (it refused the customer
    # before adoption); it is asked to provision again instead of started.
    workflow_waiting: bool = False


class AdoptionReport(BaseModel):
    dry_run: bool
    orgs: list[AdoptionLine]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for line in self.orgs if line.outcome == outcome)


def candidates(session: Session) -> list[int]:
    """Orgs with a subscription id that no workflow of ours ever synced, in id order.

    A workflow stamps `stripe_synced_at` whenever it writes a Stripe read to
    the row; the legacy implementation never does. So an org once adopted, or
    provisioned here, is not looked at again, also after its workflow finished
    (a closed org stays closed). Those with a running workflow are skipped, and
    orgs the console closed are never adopted.
    """
    return list(
        session.scalars(
            select(Org.id)
            .where(
                Org.stripe_subscription_id.is_not(None),
                Org.stripe_synced_at.is_(None),
                Org.closed_at.is_(None),
            )
            .order_by(Org.id)
        )
    )


def seed_identifier(org_id: int, dimension: str, period_start: datetime, tag: str) -> str:
    """The ledger row's identifier (never sent to Stripe, unique like the others)."""
    return f"adopted:{org_id}:{dimension}:{int(period_start.timestamp())}:{tag}"


def ledger_total(session: Session, org_id: int, dimension: str, period_start: datetime) -> int:
    """What the usage ledger counts as reported for the period (every row, as the plan does)."""
    total = session.scalar(
        select(func.coalesce(func.sum(UsageLedger.value), 0)).where(
            UsageLedger.org_id == org_id,
            UsageLedger.dimension == dimension,
            UsageLedger.period_start == period_start,
        )
    )
    return int(total or 0)


def record_reported(
    session: Session,
    *,
    org_id: int,
    org_uid: str,
    settings: Settings,
    period_start: datetime,
    period_end: datetime,
    value: int,
    at: datetime,
) -> bool:
    """The ledger row of usage reported before adoption; False if the period has one."""
    dimension = settings.stripe_requests_dimension
    tag = environment_tag(settings.billing_source, org_uid)
    statement = (
        insert(UsageLedger)
        .values(
            org_id=org_id,
            dimension=dimension,
            period_start=period_start,
            period_end=period_end,
            seq=SEED_SEQ,
            identifier=seed_identifier(org_id, dimension, period_start, tag),
            value=value,
            event_timestamp=min(max(at, period_start), period_end - timedelta(seconds=1)),
            status=LedgerStatus.SENT.value,
            reason=SEED_REASON,
            sent_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing()
        .returning(UsageLedger.id)
    )
    return session.execute(statement).scalar() is not None


WorkflowStanding = Literal["none", "unprovisioned", "running"]


async def workflow_standing(client: Client, org_id: int) -> tuple[WorkflowStanding, str | None]:
    """Whether the org has no running workflow, one that waits to provision, or one that bills.

    A webhook about a legacy subscription starts the org's workflow before any
    adoption; its provisioning refuses the customer (not provably the org's
    until adopted) and waits: such a workflow is adopted like a missing one.
    """
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    try:
        described = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return "none", None
        raise
    if described.status != WorkflowExecutionStatus.RUNNING:
        return "none", None
    try:
        state = await query_state(client, org_id)
    except (RPCError, WorkflowQueryFailedError) as err:
        return "running", f"its workflow is running and did not answer ({err})"
    if state.status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED):
        return "unprovisioned", None
    return "running", "its workflow is running"


class Adopter:
    """Adoption of legacy orgs, one at a time; built by the CLI (the composition root)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        gateway: StripeGateway,
        temporal: Client,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._gateway = gateway
        self._temporal = temporal
        self._requests_meter: str | None = None

    async def adopt_all(self, *, dry_run: bool) -> AdoptionReport:
        with self._sessions() as session:
            org_ids = candidates(session)
        lines = []
        for org_id in org_ids:
            line = await self.adopt(org_id, dry_run=dry_run)
            if line.outcome != "skipped":
                log.info(
                    "org adoption",
                    extra={"org_id": org_id, "outcome": line.outcome, "reason": line.reason},
                )
            lines.append(line)
        return AdoptionReport(dry_run=dry_run, orgs=lines)

    async def adopt(self, org_id: int, *, dry_run: bool) -> AdoptionLine:
        standing, why = await workflow_standing(self._temporal, org_id)
        if standing == "running":
            return AdoptionLine(org_id=org_id, outcome="skipped", reason=why)
        try:
            with self._sessions() as session:
                org = orgs.org_profile(session, org_id)
        except (orgs.OrgNotFoundError, orgs.OrgWithoutOwnerError) as err:
            return AdoptionLine(org_id=org_id, outcome="refused", reason=str(err))
        line = AdoptionLine(
            org_id=org_id,
            outcome="would_adopt" if dry_run else "adopted",
            customer_id=org.stripe_customer_id,
            subscription_id=org.stripe_subscription_id,
            workflow_waiting=standing == "unprovisioned",
        )
        try:
            return await self._adopt(org, line, dry_run=dry_run)
        except stripe.StripeError as err:
            line.outcome = "refused"
            line.reason = f"Stripe answered: {err.user_message or err.__class__.__name__}"
            return line

    async def _adopt(self, org: OrgProfile, line: AdoptionLine, *, dry_run: bool) -> AdoptionLine:
        assert org.stripe_subscription_id is not None
        if org.billed_elsewhere:
            # Its workflow would not bill it (not_billed) and never link the subscription.
            return _refused(
                line,
                "the org is billed through a marketplace (AWS or Azure id): its legacy "
                f"subscription {org.stripe_subscription_id} must be ended in Stripe, not adopted",
            )
        try:
            sub = await self._gateway.get_subscription(org.stripe_subscription_id)
        except stripe.InvalidRequestError:
            return _refused(line, f"subscription {org.stripe_subscription_id} is not in Stripe")
        customer_id = org.stripe_customer_id or sub.customer_id
        line.customer_id = customer_id
        if sub.customer_id != customer_id:
            return _refused(
                line,
                f"subscription {sub.id} belongs to customer {sub.customer_id}, "
                f"not to the org's {customer_id}",
            )
        metadata = await self._gateway.customer_metadata(customer_id)
        if metadata is None:
            return _refused(line, f"customer {customer_id} is deleted in Stripe")
        if not (
            self._gateway.is_the_orgs(metadata, org)
            or self._gateway.is_legacy_customer_of(metadata, org)
        ):
            return _refused(
                line,
                f"customer {customer_id} is not provably the org's: its metadata names neither "
                f"org_uid nor orgUid {org.org_uid!r} with a known source",
            )
        wanted = self._current_metadata(org)
        conflicts = [
            key for key in ("org_id", "org_uid") if key in metadata and metadata[key] != wanted[key]
        ]
        if conflicts:
            names = ", ".join(f"{key}={metadata[key]!r}" for key in conflicts)
            return _refused(line, f"customer {customer_id} names another org ({names})")
        line.metadata_added = {k: v for k, v in wanted.items() if k not in metadata}
        reported = await self._already_reported(org, customer_id, sub, line)
        if dry_run:
            return line
        # The usage already reported first: the metadata makes the customer provably
        # the org's, and a waiting workflow may link it (and report) at once.
        if reported:
            assert line.period_start is not None and line.period_end is not None
            with self._sessions.begin() as session:
                record_reported(
                    session,
                    org_id=org.org_id,
                    org_uid=org.org_uid,
                    settings=self._settings,
                    period_start=line.period_start,
                    period_end=line.period_end,
                    value=reported,
                    at=sub.read_at or datetime.now(UTC),
                )
        if line.metadata_added:
            await self._gateway.add_customer_metadata(
                customer_id,
                line.metadata_added,
                idempotency_key=(
                    f"customer-adopt-{self._settings.billing_source}-{org.org_id}-"
                    f"{org.org_uid}-{params_digest(line.metadata_added)}"
                ),
            )
        if line.workflow_waiting:
            # Signal-with-start: the waiting workflow provisions again now.
            await start_provisioning(self._temporal, self._settings, org.org_id)
        else:
            await start_org_workflow(
                self._temporal,
                self._settings.temporal_task_queue,
                org.org_id,
                signal=None,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                tuning=tuning_of(self._settings),
            )
        line.workflow_started = True
        return line

    def _current_metadata(self, org: OrgProfile) -> dict[str, str]:
        return {
            "org_id": str(org.org_id),
            "org_uid": org.org_uid,
            "source": self._settings.billing_source,
        }

    async def _already_reported(
        self, org: OrgProfile, customer_id: str, sub: SubscriptionSnapshot, line: AdoptionLine
    ) -> int:
        """Fill in the period and what Stripe holds for it; returns what the ledger lacks."""
        start, end = sub.current_period_start, sub.current_period_end
        if sub.status not in _USAGE_STATUSES or start is None or end is None:
            return 0
        line.period_start, line.period_end = start, end
        if self._requests_meter is None:
            self._requests_meter = await self._gateway.meter_id(
                self._settings.stripe_requests_dimension
            )
        if self._requests_meter is None:
            line.requests_already_reported = 0
            return 0
        now = sub.read_at or datetime.now(UTC)
        held = await self._gateway.reported_usage(
            self._requests_meter, customer_id, start, min(end, now + _FUTURE_WINDOW)
        )
        line.requests_already_reported = held
        with self._sessions() as session:
            in_ledger = ledger_total(
                session, org.org_id, self._settings.stripe_requests_dimension, start
            )
        line.requests_recorded_as_reported = max(0, held - in_ledger)
        return line.requests_recorded_as_reported


def _refused(line: AdoptionLine, reason: str) -> AdoptionLine:
    line.outcome = "refused"
    line.reason = reason
    line.metadata_added = {}
    return line


def metadata_summary(keys: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in keys.items()) or "none"
