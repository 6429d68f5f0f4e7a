"""Usage lands in the right period, with the right values.

A report that is not a period's final one confirms the period with Stripe
first (a change whose webhook was lost can have ended it early); no meter event
is timestamped at or after a confirmed period end; requests recorded ahead of
the report time wait for a later report; the users level is the one at each
period's end, also for periods caught up after an outage.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from temporalio.api.enums.v1 import EventType

from billing.constants import org_workflow_id
from billing.db import orgs
from billing.db.models import UsageLedger
from tests.factories.live import LiveStack
from tests.factories.stack import capture_history, counted, eventually
from tests.workflows.test_usage import (
    REQUESTS,
    USERS,
    active,
    at,
    invoice_quantities,
    ledger,
    period_of,
    provisioned,
    record,
    report_now,
)

pytestmark = pytest.mark.asyncio
DAY = 86400


def lose_webhooks(stack: LiveStack) -> None:
    for endpoint in stack.stripe.v1.webhook_endpoints.list().data:
        stack.stripe.v1.webhook_endpoints.delete(endpoint.id)


def join(stack: LiveStack, org_id: int, email: str, when: int) -> None:
    with stack.session_factory.begin() as session:
        orgs.add_member(session, org_id, email, at=at(when))


def leave(stack: LiveStack, org_id: int, email: str, when: int) -> None:
    with stack.session_factory.begin() as session:
        orgs.remove_member(session, org_id, email, at=at(when))


async def test_a_report_confirms_the_period_a_lost_webhook_ended_early(stack: LiveStack) -> None:
    state = await provisioned(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    trial_start, trial_end = period_of(stack, sub_id)
    lose_webhooks(stack)
    record(stack, org_id, 3, trial_start + 3600)
    await stack.advance(trial_start + 5 * DAY)
    stack.stripe.v1.subscriptions.update(sub_id, {"trial_end": "now"})
    ended_at, _ = period_of(stack, sub_id)
    assert ended_at < trial_end  # the workflow still believes in the whole trial
    record(stack, org_id, 4, ended_at + 3600)
    await stack.advance(ended_at + 2 * 3600)

    result = await report_now(stack, org_id)

    # The report is for the period Stripe bills now, with what it holds so far.
    [report] = result.periods
    assert (report.period_start, report.requests) == (at(ended_at), 4)
    new_rows = ledger(stack, org_id, ended_at)
    assert all(at(ended_at) <= r.event_timestamp <= at(ended_at + 2 * 3600) for r in new_rows)

    # The trial gets its final report, cut at its real end, with its own requests.
    async def trial_rows() -> list[UsageLedger]:
        return ledger(stack, org_id, trial_start)

    rows = await eventually(
        trial_rows, lambda rs: len(rs) == 2 and all(r.status == "sent" for r in rs)
    )
    assert sum(r.value for r in rows if r.dimension == REQUESTS) == 3
    assert {r.period_end for r in rows} == {at(ended_at)}
    assert all(r.event_timestamp < at(ended_at) for r in rows)
    await capture_history(
        stack.client,
        org_workflow_id(org_id),
        "period_confirmed_before_report",
        pick=counted(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED),
    )


async def test_requests_recorded_ahead_of_the_report_are_not_billed_early(
    stack: LiveStack,
) -> None:
    state = await active(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    now = stack.clock_time()
    record(stack, org_id, 5, now - 60)
    record(stack, org_id, 7, now + 2 * DAY)  # a timestamp the clock has not reached

    first = await report_now(stack, org_id)

    [report] = first.periods
    assert report.requests == 5
    start, _ = period_of(stack, sub_id)
    sent = [r for r in ledger(stack, org_id, start) if r.dimension == REQUESTS]
    assert [r.value for r in sent] == [5]
    assert all(r.event_timestamp <= at(now) for r in sent)
    # The period's final report bills the rest, once their time has come.
    _, end = period_of(stack, sub_id)
    await stack.advance(end + 300)

    async def requests() -> list[UsageLedger]:
        return [r for r in ledger(stack, org_id, start) if r.dimension == REQUESTS]

    await eventually(
        requests, lambda rs: sum(r.value for r in rs) == 12 and all(r.status == "sent" for r in rs)
    )
    await stack.advance(end + 2 * 3600)
    assert invoice_quantities(stack, sub_id, start) == {USERS: 1, REQUESTS: 12}


async def test_users_are_reported_as_of_each_periods_end_after_an_outage(
    stack: LiveStack,
) -> None:
    state = await provisioned(stack)
    org_id, sub_id = state.org_id, state.stripe_subscription_id
    assert sub_id
    p1_start, p1_end = period_of(stack, sub_id)
    join(stack, org_id, "grace@example.com", p1_start + DAY)
    join(stack, org_id, "alan@example.com", p1_start + 2 * DAY)

    await stack.worker.stop()
    await stack.advance(p1_end + DAY)
    p2_start, p2_end = period_of(stack, sub_id)
    assert p2_start == p1_end
    leave(stack, org_id, "alan@example.com", p2_start + 2 * DAY)
    await stack.advance(p2_end + 300)
    join(stack, org_id, "ada@example.com", p2_end + 60)
    join(stack, org_id, "edsger@example.com", p2_end + 120)
    await stack.worker.start()  # four members now: the owner, grace, ada and edsger

    async def users() -> dict[int, list[tuple[int, str, datetime]]]:
        return {
            start: [
                (r.value, r.status, r.event_timestamp)
                for r in ledger(stack, org_id, start)
                if r.dimension == USERS
            ]
            for start in (p1_start, p2_start)
        }

    found = await eventually(
        users,
        lambda rows: all(rows[s] and rows[s][-1][1] == "sent" for s in (p1_start, p2_start)),
    )
    # The owner, grace and alan at the trial's end; alan left during the second period.
    assert found[p1_start] == [(3, "sent", at(p1_end - 1))]
    assert found[p2_start] == [(2, "sent", at(p2_end - 1))]
