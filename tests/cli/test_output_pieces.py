"""Pure pieces of the CLI output: the ended period in `orgs show`, advance waits, ready table."""

from __future__ import annotations

from datetime import UTC, datetime

from billing.domain import BillingPeriod, OrgBillingState, UsagePeriodReport
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


def test_an_advance_waits_for_no_renewal_of_a_subscription_that_ended_on_the_way() -> None:
    from billing.domain import BillingStatus, SubscriptionStatus
    from tooling.cli.emulator import _final_report_done

    renewal = _at(4)
    canceled = OrgBillingState(
        org_id=2,
        status=BillingStatus.CANCELED,
        subscription_status=SubscriptionStatus.CANCELED,
        current_period_start=_at(3),
        usage=[_report(_at(3), _at(3, 16), 1, 0)],
    )
    still_owed = canceled.model_copy(
        update={"to_finalize": [BillingPeriod(start=_at(3), end=_at(3, 16))]}
    )
    waiting = OrgBillingState(org_id=1, status=BillingStatus.ACTIVE, current_period_start=_at(3))
    renewed = waiting.model_copy(
        update={"current_period_start": renewal, "usage": [_report(_at(3), renewal, 3, 320)]}
    )

    assert _final_report_done(canceled, renewal)
    assert not _final_report_done(still_owed, renewal)
    assert not _final_report_done(waiting, renewal)
    assert _final_report_done(renewed, renewal)


def test_the_ready_table_suggests_creating_orgs_only_on_a_new_home() -> None:
    from billing.problems import PROBLEM_ORGS_QUERY, RUNNING_ORGS_QUERY
    from tooling.devstack import KnownOrg, try_commands, workflows_link

    fresh = try_commands([])
    restarted = try_commands([KnownOrg(7, "Acme", "ada@acme.test"), KnownOrg(8, "Globex", None)])

    assert fresh[0].startswith("orgs create")
    assert not any(c.startswith("orgs create") for c in restarted)
    assert "orgs show 7" in restarted and "token 7 --email ada@acme.test" in restarted
    assert fresh[-1] == restarted[-1] == "emulator advance --to period-end"
    assert workflows_link("http://127.0.0.1:8233", "default", RUNNING_ORGS_QUERY) == (
        "http://127.0.0.1:8233/namespaces/default/workflows?query="
        "ExecutionStatus%3D%22Running%22%20AND%20WorkflowType%3D%22OrgBilling%22"
    )
    assert workflows_link("http://127.0.0.1:8233", "default", PROBLEM_ORGS_QUERY) == (
        "http://127.0.0.1:8233/namespaces/default/workflows?query="
        "ExecutionStatus%3D%22Running%22%20AND%20WorkflowType%3D%22OrgBilling%22"
        "%20AND%20BillingProblem%20IS%20NOT%20NULL"
    )
