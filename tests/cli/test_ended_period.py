"""`orgs show`: the last ended period, picked from the workflow's state (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime

from billing.domain import OrgBillingState, UsagePeriodReport
from tooling.cli.render import ended_period_fields, last_ended_period


def _at(month: int, day: int = 1) -> datetime:
    return datetime(2031, month, day, 9, 15, tzinfo=UTC)


def _report(start: datetime, end: datetime, users: int, requests: int) -> UsagePeriodReport:
    return UsagePeriodReport(
        period_start=start, period_end=end, users=users, requests=requests, last_reported_at=end
    )


def test_the_newest_period_that_ended_not_the_current_one() -> None:
    state = OrgBillingState(
        org_id=1,
        current_period_start=_at(4),
        current_period_end=_at(5),
        usage=[
            _report(_at(4), _at(5), 9, 9),  # running
            _report(_at(2), _at(3), 1, 10),
            _report(_at(3), _at(4), 3, 320),
        ],
    )

    ended = last_ended_period(state)

    assert ended is not None and (ended.users, ended.requests) == (3, 320)


def test_no_ended_period_before_the_first_renewal() -> None:
    assert last_ended_period(OrgBillingState(org_id=1)) is None
    running = OrgBillingState(
        org_id=1, current_period_start=_at(3), usage=[_report(_at(3), _at(4), 2, 5)]
    )
    assert last_ended_period(running) is None


def test_the_rows_show_the_invoice_or_why_there_is_none() -> None:
    report = _report(_at(3), _at(4), 3, 320)
    invoice = {"id": "in_1", "total": 6720, "currency": "usd", "status": "paid"}

    billed = ended_period_fields(report, invoice)
    missing = ended_period_fields(report, "none yet (Stripe creates it at the period end)")

    assert billed["period"] == "2031-03-01 09:15 UTC → 2031-04-01 09:15 UTC"
    assert (billed["users"], billed["requests"]) == (3, 320)
    assert billed["invoice"] == "in_1  $67.20  paid"
    assert missing["invoice"].startswith("none yet")
