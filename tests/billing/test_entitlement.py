"""The entitlement rule (billing/entitlement.py): every status, and properties over all inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain import BillingStatus, OrgBillingState
from billing.entitlement import (
    FLAGGED_REASONS,
    EntitlementReason,
    decide,
    next_change,
    of_row,
    of_state,
)

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)
DAY = timedelta(days=1)

times = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
)
maybe_times = st.none() | times
statuses = st.sampled_from(list(BillingStatus))
grace_days = st.integers(min_value=0, max_value=60)


@pytest.mark.parametrize(
    ("status", "entitled", "reason"),
    [
        (BillingStatus.TRIALING, True, EntitlementReason.TRIALING),
        (BillingStatus.ACTIVE, True, EntitlementReason.ACTIVE),
        (BillingStatus.NOT_BILLED, True, EntitlementReason.NOT_BILLED),
        (BillingStatus.INCOMPLETE, True, EntitlementReason.INCOMPLETE),
        (BillingStatus.PROVISIONING, True, EntitlementReason.PROVISIONING),
        (BillingStatus.PROVISIONING_FAILED, True, EntitlementReason.PROVISIONING_FAILED),
        (BillingStatus.UNPAID, False, EntitlementReason.UNPAID),
        (BillingStatus.PAUSED, False, EntitlementReason.PAUSED),
        (BillingStatus.INCOMPLETE_EXPIRED, False, EntitlementReason.INCOMPLETE_EXPIRED),
        (BillingStatus.CANCELED, False, EntitlementReason.CANCELED),
        (BillingStatus.CLOSED, False, EntitlementReason.CLOSED),
    ],
)
def test_each_status_without_dates(
    status: BillingStatus, entitled: bool, reason: EntitlementReason
) -> None:
    answer = decide(status, now=NOW)
    assert (answer.entitled, answer.reason, answer.status) == (entitled, reason, status)
    assert answer.grace_until is None


def test_past_due_is_entitled_for_the_grace_after_the_first_failure() -> None:
    failed = NOW - 3 * DAY
    inside = decide(BillingStatus.PAST_DUE, now=NOW, grace_days=7, payment_failed_at=failed)
    assert inside.entitled and inside.reason is EntitlementReason.PAST_DUE_GRACE
    assert inside.grace_until == inside.access_until == failed + 7 * DAY
    after = decide(BillingStatus.PAST_DUE, now=failed + 7 * DAY, payment_failed_at=failed)
    assert not after.entitled and after.reason is EntitlementReason.PAST_DUE_GRACE_OVER
    assert not decide(BillingStatus.PAST_DUE, now=NOW, grace_days=0, payment_failed_at=NOW).entitled


def test_canceled_is_entitled_until_the_paid_period_ends() -> None:
    end = NOW + 5 * DAY
    answer = decide(BillingStatus.CANCELED, now=NOW, current_period_end=end, subscription_end=NOW)
    assert answer.entitled and answer.reason is EntitlementReason.CANCELED_PAID_PERIOD
    assert answer.access_until == end
    assert next_change(answer, NOW) == end
    over = decide(BillingStatus.CANCELED, now=end, current_period_end=end)
    assert not over.entitled and over.reason is EntitlementReason.CANCELED
    assert next_change(over, end) is None


def test_canceled_during_the_trial_keeps_access_until_the_trial_s_end() -> None:
    """The trial counts as the period it was granted: Stripe keeps the trial as the
    current period of a subscription canceled during it, and access runs to its end."""
    trial_end = NOW + 10 * DAY
    state = OrgBillingState(
        org_id=1,
        status=BillingStatus.CANCELED,
        trial_end=trial_end,
        current_period_start=NOW - 20 * DAY,
        current_period_end=trial_end,
        subscription_end=NOW,  # canceled at once, today
    )
    answer = of_state(state, NOW, grace_days=7)
    assert answer.entitled and answer.reason is EntitlementReason.CANCELED_PAID_PERIOD
    assert answer.access_until == answer.trial_end == trial_end
    assert next_change(answer, NOW) == trial_end
    just_before = of_state(state, trial_end - timedelta(seconds=1), grace_days=7)
    assert just_before.entitled
    over = of_state(state, trial_end, grace_days=7)
    assert not over.entitled and over.reason is EntitlementReason.CANCELED
    # The row, written by the workflow, gives the same answer when the workflow cannot.
    row = of_row(
        BillingStatus.CANCELED,
        access_until=answer.access_until,
        subscription_end=NOW,
        now=NOW,
        grace_days=7,
    )
    assert (row.entitled, row.reason, row.access_until) == (True, answer.reason, trial_end)


def test_a_past_due_row_without_access_until_counts_the_grace_from_now() -> None:
    row = of_row(
        BillingStatus.PAST_DUE, access_until=None, subscription_end=None, now=NOW, grace_days=7
    )
    assert row.entitled and row.reason is EntitlementReason.PAST_DUE_GRACE
    assert row.grace_until == row.access_until == NOW + 7 * DAY


def test_trialing_and_active_are_open_ended_whatever_their_dates() -> None:
    for status in (BillingStatus.TRIALING, BillingStatus.ACTIVE):
        answer = decide(
            status, now=NOW, trial_end=NOW - DAY, subscription_end=NOW - DAY, current_period_end=NOW
        )
        assert answer.entitled and answer.reason.value == status.value
        assert answer.access_until is None and answer.trial_end == NOW - DAY
        assert next_change(answer, NOW) is None


def test_the_row_gives_back_the_workflow_s_answer() -> None:
    failed = NOW - 2 * DAY
    live = decide(BillingStatus.PAST_DUE, now=NOW, grace_days=7, payment_failed_at=failed)
    row = of_row(
        BillingStatus.PAST_DUE,
        access_until=live.access_until,
        subscription_end=None,
        now=NOW,
        grace_days=7,
    )
    assert row == live
    canceled = of_row(
        BillingStatus.CANCELED,
        access_until=NOW + DAY,
        subscription_end=NOW - DAY,
        now=NOW,
        grace_days=7,
    )
    assert canceled.entitled and canceled.access_until == NOW + DAY


@given(
    status=st.sampled_from([BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED]),
    now=times,
    grace=grace_days,
    trial_end=maybe_times,
    period_end=maybe_times,
    sub_end=maybe_times,
    failed=maybe_times,
)
def test_provisioning_states_are_always_entitled_and_flagged(
    status: BillingStatus,
    now: datetime,
    grace: int,
    trial_end: datetime | None,
    period_end: datetime | None,
    sub_end: datetime | None,
    failed: datetime | None,
) -> None:
    answer = decide(
        status,
        now=now,
        grace_days=grace,
        trial_end=trial_end,
        current_period_end=period_end,
        subscription_end=sub_end,
        payment_failed_at=failed,
    )
    assert answer.entitled
    assert answer.reason in FLAGGED_REASONS


@given(
    status=statuses,
    now=times,
    grace=grace_days,
    period_end=maybe_times,
    sub_end=maybe_times,
    failed=maybe_times,
)
def test_only_provisioning_is_flagged_and_never_entitled_statuses_stay_so(
    status: BillingStatus,
    now: datetime,
    grace: int,
    period_end: datetime | None,
    sub_end: datetime | None,
    failed: datetime | None,
) -> None:
    answer = decide(
        status,
        now=now,
        grace_days=grace,
        current_period_end=period_end,
        subscription_end=sub_end,
        payment_failed_at=failed,
    )
    assert (answer.reason in FLAGGED_REASONS) == (
        status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED)
    )
    if status in (BillingStatus.UNPAID, BillingStatus.PAUSED, BillingStatus.INCOMPLETE_EXPIRED):
        assert not answer.entitled
    if status in (BillingStatus.TRIALING, BillingStatus.ACTIVE, BillingStatus.NOT_BILLED):
        assert answer.entitled
    # An entitlement that ends says when; one that ended is not pending.
    change = next_change(answer, now)
    assert change is None or (answer.entitled and change > now)


@given(failed=times, now=times, later=st.timedeltas(min_value=timedelta(0)), grace=grace_days)
def test_past_due_grace_is_monotone_in_time(
    failed: datetime, now: datetime, later: timedelta, grace: int
) -> None:
    """Once the grace is over it stays over: a later look never restores access."""
    first = decide(BillingStatus.PAST_DUE, now=now, grace_days=grace, payment_failed_at=failed)
    try:
        then = now + later
    except OverflowError:
        return
    second = decide(BillingStatus.PAST_DUE, now=then, grace_days=grace, payment_failed_at=failed)
    assert first.grace_until == second.grace_until == failed + timedelta(days=grace)
    if not first.entitled:
        assert not second.entitled
    assert first.entitled == (now < failed + timedelta(days=grace))


@given(failed=times, now=times, grace=grace_days, more=st.integers(min_value=0, max_value=30))
def test_a_longer_grace_never_takes_access_away(
    failed: datetime, now: datetime, grace: int, more: int
) -> None:
    shorter = decide(BillingStatus.PAST_DUE, now=now, grace_days=grace, payment_failed_at=failed)
    longer = decide(
        BillingStatus.PAST_DUE, now=now, grace_days=grace + more, payment_failed_at=failed
    )
    assert longer.entitled or not shorter.entitled


@given(
    now=times,
    period_end=maybe_times,
    sub_end=maybe_times,
    later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)),
)
def test_canceled_access_ends_once_and_for_all(
    now: datetime, period_end: datetime | None, sub_end: datetime | None, later: timedelta
) -> None:
    first = decide(
        BillingStatus.CANCELED, now=now, current_period_end=period_end, subscription_end=sub_end
    )
    second = decide(
        BillingStatus.CANCELED,
        now=now + later,
        current_period_end=period_end,
        subscription_end=sub_end,
    )
    if not first.entitled:
        assert not second.entitled
    if first.entitled:
        assert first.access_until is not None and now < first.access_until
