"""Usage reaches Stripe exactly once per period: invoices carry the right quantities."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity

from activities.db_activities import DbActivities
from activities.models import MeterEventToSend, PlanUsageInput
from activities.stripe_activities import StripeActivities
from billing.config import Settings
from billing.constants import REPORT_USAGE_UPDATE, org_workflow_id
from billing.db import orgs
from billing.db.models import UsageLedger
from billing.domain import BillingStatus, LedgerStatus, OrgBillingState, UsageReportResult
from billing.orchestration import RETRY_PROVISIONING, query_state, start_org_workflow
from billing.stripe_gateway import MeterOutcome, StripeGateway, make_stripe_client
from billing.stripe_keys import meter_identifier
from tests.factories.live import LiveStack
from tests.factories.stack import create_org, eventually, wait_for_status

pytestmark = pytest.mark.asyncio
USERS = "additional_users"
REQUESTS = "additional_requests"


class CrashAfterSend(StripeActivities):
    """The meter event reached Stripe, then the worker died before the ledger knew."""

    crashed: ClassVar[list[str]] = []

    @activity.defn(name="stripe_send_meter_event")
    async def send_meter_event(self, event: MeterEventToSend) -> MeterOutcome:
        outcome = await super().send_meter_event(event)
        if event.dimension == REQUESTS and not self.crashed:
            self.crashed.append(event.identifier)
            raise RuntimeError("worker lost after sending a meter event")
        return outcome


def crashing_after_send(settings: Settings) -> StripeActivities:
    CrashAfterSend.crashed.clear()
    return CrashAfterSend(
        StripeGateway(
            make_stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base),
            settings,
        ),
        settings,
    )


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


async def provisioned(stack: LiveStack) -> OrgBillingState:
    """A trialing org with a working card."""
    org_id = create_org(stack.session_factory)
    await start_org_workflow(
        stack.client, stack.settings.temporal_task_queue, org_id, signal=RETRY_PROVISIONING
    )
    state = await wait_for_status(stack.client, org_id, {BillingStatus.TRIALING})
    assert state.stripe_customer_id
    stack.attach_card(state.stripe_customer_id, "pm_card_visa")
    await stack.settled(org_id)
    return state


async def active(stack: LiveStack) -> OrgBillingState:
    """An org past its trial, in its first paid period (usage in a trial is not billed)."""
    state = await provisioned(stack)
    assert state.trial_end
    await stack.advance(int(state.trial_end.timestamp()) + 2 * 3600)
    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    await stack.settled(state.org_id)
    return state


def meter_total(stack: LiveStack, customer_id: str, event_name: str, start: int, end: int) -> float:
    meter = next(
        m for m in stack.stripe.v1.billing.meters.list().data if m.event_name == event_name
    )
    summaries = stack.stripe.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer_id, "start_time": start, "end_time": end}
    )
    return float(sum(s.aggregated_value for s in summaries.data))


def add_members(stack: LiveStack, org_id: int, *emails: str) -> None:
    with stack.session_factory.begin() as session:
        for email in emails:
            orgs.add_member(session, org_id, email)


def remove_member(stack: LiveStack, org_id: int, email: str) -> None:
    with stack.session_factory.begin() as session:
        orgs.remove_member(session, org_id, email)


def record(stack: LiveStack, org_id: int, count: int, when: int) -> None:
    with stack.session_factory.begin() as session:
        orgs.record_requests(session, org_id, count, at(when))


def ledger(stack: LiveStack, org_id: int, period_start: int) -> list[UsageLedger]:
    with stack.session_factory() as session:
        return list(
            session.scalars(
                select(UsageLedger)
                .where(UsageLedger.org_id == org_id, UsageLedger.period_start == at(period_start))
                .order_by(UsageLedger.dimension, UsageLedger.seq)
            )
        )


def period_of(stack: LiveStack, sub_id: str) -> tuple[int, int]:
    item = stack.subscription(sub_id)["items"].data[0]
    return int(item.current_period_start), int(item.current_period_end)


async def finish_period(stack: LiveStack, org_id: int, sub_id: str) -> tuple[int, int]:
    """Cross the period end, let the final report land, then let the invoice finalize."""
    start, end = period_of(stack, sub_id)
    await stack.advance(end + 300)

    def reported(rows: list[UsageLedger]) -> bool:
        dims = {r.dimension for r in rows}
        return dims >= {USERS} and all(r.status == "sent" for r in rows)

    async def rows() -> list[UsageLedger]:
        return ledger(stack, org_id, start)

    await eventually(rows, reported, timeout=30)
    await stack.advance(end + 2 * 3600)
    return start, end


def invoice_quantities(stack: LiveStack, sub_id: str, period_start: int) -> dict[str, int]:
    """Metered quantities billed for the period starting at `period_start`."""
    prices = {
        stack.settings.stripe_users_price_id: USERS,
        stack.settings.stripe_requests_price_id: REQUESTS,
    }
    found: dict[str, int] = {}
    for invoice in stack.stripe.v1.invoices.list({"subscription": sub_id, "limit": 100}).data:
        data = invoice.to_dict()
        if data["status"] == "draft":
            continue
        for line in data["lines"]["data"]:
            price = line["pricing"]["price_details"]["price"]
            if price in prices and line["period"]["start"] == period_start:
                found[prices[price]] = line["quantity"]
    return found


async def test_a_trial_and_two_paid_periods_are_each_reported_and_billed_exactly(
    stack: LiveStack,
) -> None:
    state = await provisioned(stack)
    org_id, sub_id, customer = state.org_id, state.stripe_subscription_id, state.stripe_customer_id
    assert sub_id and customer
    t0 = stack.clock_time()
    add_members(stack, org_id, "grace@example.com", "alan@example.com")
    record(stack, org_id, 10, t0 + 86400)
    record(stack, org_id, 5, t0 + 20 * 86400)

    # The trial: reported to the meters, not billed (Stripe bills no usage in a trial).
    trial_start, trial_end = await finish_period(stack, org_id, sub_id)
    assert meter_total(stack, customer, REQUESTS, trial_start, trial_end) == 15
    assert meter_total(stack, customer, USERS, trial_start, trial_end) == 3
    assert invoice_quantities(stack, sub_id, trial_start) == {}

    p1_start, _ = period_of(stack, sub_id)
    assert p1_start == trial_end
    record(stack, org_id, 8, p1_start + 86400)
    record(stack, org_id, 100, p1_start - 60)  # the trial's, already reported: never again
    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, p1_start) == {USERS: 3, REQUESTS: 8}

    p2_start, _ = period_of(stack, sub_id)
    remove_member(stack, org_id, "alan@example.com")
    record(stack, org_id, 7, p2_start + 86400)
    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, p2_start) == {USERS: 2, REQUESTS: 7}

    state = await query_state(stack.client, org_id)
    reported = {u.period_start: (u.users, u.requests) for u in state.usage}
    assert reported[at(p1_start)] == (3, 8)
    assert reported[at(p2_start)] == (2, 7)

    # One run per period, each with a small history.
    histories = [
        await stack.client.get_workflow_handle(
            org_workflow_id(org_id), run_id=wf.run_id
        ).fetch_history()
        async for wf in stack.client.list_workflows(f"WorkflowId = '{org_workflow_id(org_id)}'")
    ]
    assert len(histories) == 4
    # (each change also writes entitlement and notifications: one activity)
    assert max(len(h.events) for h in histories) < 200


async def report_now(stack: LiveStack, org_id: int) -> UsageReportResult:
    handle = stack.client.get_workflow_handle(org_workflow_id(org_id))
    result: UsageReportResult = await handle.execute_update(
        REPORT_USAGE_UPDATE, result_type=UsageReportResult
    )
    return result


async def test_later_requests_are_sent_as_a_delta_and_nothing_twice(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    now = stack.clock_time()
    record(stack, org_id, 10, now)

    first = await report_now(stack, org_id)
    assert first.meter_events_sent == 2  # users level, requests 10
    record(stack, org_id, 5, now)
    second = await report_now(stack, org_id)
    assert second.meter_events_sent == 1  # requests +5; users unchanged
    third = await report_now(stack, org_id)
    assert third.meter_events_sent == 0

    start, _ = period_of(stack, sub_id)
    requests = [r for r in ledger(stack, org_id, start) if r.dimension == REQUESTS]
    assert [(r.seq, r.value, r.status) for r in requests] == [(1, 10, "sent"), (2, 5, "sent")]
    assert requests[0].identifier == meter_identifier(
        org_id,
        REQUESTS,
        at(start),
        1,
        source=stack.settings.billing_source,
        org_uid=stack.org(org_id).uid,
    )

    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 15}


def earlier_report(
    stack: LiveStack, org_id: int, customer: str, period: tuple[int, int], when: int
) -> list[str]:
    """What a version before the environment tag left: meter events under
    `{org_id}:{dimension}:{period_start}:{seq}`, requests 10 marked sent, the users
    level sent to Stripe but still `pending` (the worker died before the ledger knew)."""
    start, end = period
    rows = [(REQUESTS, 10, LedgerStatus.SENT), (USERS, 1, LedgerStatus.PENDING)]
    identifiers = []
    with stack.session_factory.begin() as session:
        for dimension, value, status in rows:
            identifier = f"{org_id}:{dimension}:{start}:1"
            stack.stripe.v1.billing.meter_events.create(
                {
                    "event_name": dimension,
                    "payload": {"stripe_customer_id": customer, "value": str(value)},
                    "identifier": identifier,
                    "timestamp": when,
                }
            )
            session.add(
                UsageLedger(
                    org_id=org_id,
                    dimension=dimension,
                    period_start=at(start),
                    period_end=at(end),
                    seq=1,
                    identifier=identifier,
                    value=value,
                    event_timestamp=at(when),
                    status=status,
                )
            )
            identifiers.append(identifier)
    return identifiers


async def test_a_period_reported_under_the_old_identifier_format_is_never_reported_again(
    stack: LiveStack,
) -> None:
    state = await active(stack)
    org_id, sub_id, customer = state.org_id, state.stripe_subscription_id, state.stripe_customer_id
    assert sub_id and customer
    start, end = period_of(stack, sub_id)
    now = stack.clock_time()
    record(stack, org_id, 10, now)
    old_requests, old_users = earlier_report(stack, org_id, customer, (start, end), now)
    record(stack, org_id, 5, now)

    result = await report_now(stack, org_id)

    # The pending old row went again under its own identifier (Stripe: already
    # counted); only the 5 new requests are new, under the current format.
    assert result.meter_events_sent == 2
    assert stack.emulator.state.stats["meter_events_duplicate"] >= 1
    rows = [
        (r.dimension, r.seq, r.value, r.status, r.identifier) for r in ledger(stack, org_id, start)
    ]
    current = meter_identifier(
        org_id,
        REQUESTS,
        at(start),
        2,
        source=stack.settings.billing_source,
        org_uid=stack.org(org_id).uid,
    )
    assert rows == [
        (REQUESTS, 1, 10, "sent", old_requests),
        (REQUESTS, 2, 5, "sent", current),
        (USERS, 1, 1, "sent", old_users),
    ]
    identifiers = [str(e["identifier"]) for e in stack.emulator.state.meter_events]
    accepted = [i for i in identifiers if f":{start}:" in i]
    assert sorted(accepted) == sorted([old_requests, old_users, current])
    assert meter_total(stack, customer, REQUESTS, start, end) == 15

    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 15}


@pytest.mark.stripe_activities.with_args(crashing_after_send)
async def test_a_crash_between_send_and_ledger_does_not_double_count(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    record(stack, org_id, 12, stack.clock_time())

    await report_now(stack, org_id)

    assert len(CrashAfterSend.crashed) == 1
    # The retry carried the same identifier (and idempotency key): Stripe kept one event.
    stats = stack.emulator.state.stats
    assert stats["meter_events_duplicate"] + stats["idempotent_replays"] >= 1
    start, _ = period_of(stack, sub_id)
    assert all(r.status == "sent" for r in ledger(stack, org_id, start))
    await finish_period(stack, org_id, sub_id)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 12}


async def test_emulator_faults_during_reporting_still_bill_right(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    add_members(stack, org_id, "grace@example.com")
    record(stack, org_id, 9, stack.clock_time() + 3600)
    start, end = period_of(stack, sub_id)

    stack.emulator.set_faults(error_rate_429=0.4, error_rate_500=0.2)
    try:
        await stack.advance(end + 300)

        async def rows() -> list[UsageLedger]:
            return ledger(stack, org_id, start)

        await eventually(
            rows, lambda rs: len(rs) == 2 and all(r.status == "sent" for r in rs), timeout=60
        )
    finally:
        stack.emulator.clear_faults()
    await stack.advance(end + 2 * 3600)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 2, REQUESTS: 9}


async def test_periods_missed_during_an_outage_are_caught_up(stack: LiveStack) -> None:
    state = await provisioned(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id and state.stripe_customer_id
    p1_start, p1_end = period_of(stack, sub_id)
    record(stack, org_id, 10, p1_start + 3600)

    await stack.worker.stop()
    await stack.advance(p1_end + 86400)
    _, p2_end = period_of(stack, sub_id)
    record(stack, org_id, 4, p1_end + 3600)
    await stack.advance(p2_end + 300)
    p3_start, _ = period_of(stack, sub_id)
    assert p3_start == p2_end
    await stack.worker.start()

    async def sent() -> dict[int, list[tuple[str, int, str]]]:
        return {
            start: [(r.dimension, r.value, r.status) for r in ledger(stack, org_id, start)]
            for start in (p1_start, p1_end)
        }

    await eventually(
        sent,
        lambda rows: (
            rows[p1_start] == [(REQUESTS, 10, "sent"), (USERS, 1, "sent")]
            and rows[p1_end] == [(REQUESTS, 4, "sent"), (USERS, 1, "sent")]
        ),
        timeout=30,
    )
    for start, end, expected in ((p1_start, p1_end, 10), (p1_end, p2_end, 4)):
        assert meter_total(stack, state.stripe_customer_id, REQUESTS, start, end) == expected


JANUARY = datetime(2026, 1, 1, tzinfo=UTC)
FEBRUARY = datetime(2026, 2, 1, tzinfo=UTC)


def january_org(
    session_factory: sessionmaker[Session], database_url: str, requests_at: datetime
) -> tuple[DbActivities, int]:
    """The DB activities and a new org with 3 requests at `requests_at` (January's period)."""
    db = DbActivities(session_factory, Settings.model_validate({"database_url": database_url}))
    org_id = create_org(session_factory)
    with session_factory.begin() as session:
        orgs.record_requests(session, org_id, 3, requests_at)
    return db, org_id


async def test_a_row_left_pending_long_ago_is_sent_inside_stripes_window(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    """A crash left a mid-period report pending; the clock moved 35 days past it, not past
    the period: the row goes out again, same identifier and value, timestamp moved forward."""
    db, org_id = january_org(session_factory, database_url, JANUARY + timedelta(hours=1))
    start, end = JANUARY, FEBRUARY

    def plan_at(report_time: datetime) -> list[MeterEventToSend]:
        return db.plan_usage(
            PlanUsageInput(
                org_id=org_id,
                customer_id="cus_x",
                period_start=start,
                period_end=end,
                report_time=report_time,
            )
        ).events

    crashed = plan_at(start + timedelta(hours=2))  # planned, never sent
    assert {e.timestamp for e in crashed} == {start + timedelta(hours=2)}
    now = end + timedelta(days=5)
    resent = plan_at(now)

    assert [(e.identifier, e.value) for e in resent] == [(e.identifier, e.value) for e in crashed]
    for event in resent:
        assert now - timedelta(days=35) < event.timestamp < end
    with session_factory() as session:
        rows = session.scalars(select(UsageLedger).where(UsageLedger.org_id == org_id)).all()
        assert {r.event_timestamp for r in rows} == {e.timestamp for e in resent}
        assert {r.status for r in rows} == {"pending"}


async def test_a_period_older_than_stripe_accepts_is_skipped_with_its_reason(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    db, org_id = january_org(session_factory, database_url, JANUARY + timedelta(days=2))
    start, end = JANUARY, FEBRUARY
    plan_input = PlanUsageInput(
        org_id=org_id,
        customer_id="cus_x",
        period_start=start,
        period_end=end,
        report_time=end + timedelta(days=40),
    )

    plan = db.plan_usage(plan_input)

    assert plan.events == []
    assert plan.skipped_reason and "35 days" in plan.skipped_reason
    with session_factory() as session:
        rows = session.scalars(select(UsageLedger).where(UsageLedger.org_id == org_id)).all()
        assert {(r.dimension, r.status) for r in rows} == {
            (USERS, "skipped"),
            (REQUESTS, "skipped"),
        }
        assert all(r.reason == plan.skipped_reason for r in rows)
    # Asking again neither sends nor records anything new.
    again = db.plan_usage(plan_input)
    assert again.events == []
    with session_factory() as session:
        mine = select(UsageLedger).where(UsageLedger.org_id == org_id)
        assert len(session.scalars(mine).all()) == 2


async def test_a_trial_ended_early_is_reported_up_to_its_real_end(stack: LiveStack) -> None:
    state = await provisioned(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id and state.stripe_customer_id
    trial_start, trial_end = period_of(stack, sub_id)
    record(stack, org_id, 6, stack.clock_time())
    await stack.advance(trial_start + 5 * 86400)

    stack.stripe.v1.subscriptions.update(sub_id, {"trial_end": "now"})
    ended_at, _ = period_of(stack, sub_id)
    assert ended_at < trial_end

    async def trial_rows() -> list[UsageLedger]:
        return ledger(stack, org_id, trial_start)

    rows = await eventually(
        trial_rows, lambda rs: len(rs) == 2 and all(r.status == "sent" for r in rs)
    )
    # The report covers the trial as it really was, and its events sit inside it.
    assert {r.period_end for r in rows} == {at(ended_at)}
    assert all(r.event_timestamp < at(ended_at) for r in rows)
    assert meter_total(stack, state.stripe_customer_id, REQUESTS, trial_start, ended_at) == 6
    latest = await query_state(stack.client, org_id)
    assert latest.last_error is None


async def test_usage_up_to_a_cancellation_at_period_end_is_reported(stack: LiveStack) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id and state.stripe_customer_id
    start, end = period_of(stack, sub_id)
    record(stack, org_id, 4, start + 86400)
    stack.stripe.v1.subscriptions.update(sub_id, {"cancel_at_period_end": True})
    await stack.settled(org_id)
    record(stack, org_id, 3, end - 600)  # in the last hour: after any pre-end report

    await stack.advance(end + 60)

    async def rows() -> list[UsageLedger]:
        return ledger(stack, org_id, start)

    await eventually(
        rows,
        lambda rs: (
            sum(r.value for r in rs if r.dimension == REQUESTS) == 7
            and all(r.status == "sent" for r in rs)
        ),
    )
    assert meter_total(stack, state.stripe_customer_id, REQUESTS, start, end) == 7
    final = await wait_for_status(stack.client, org_id, {BillingStatus.CANCELED})
    assert final.to_finalize == []
