"""The org workflow's decisions, as plain functions: no server, no clock, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from activities.models import FetchSubscriptionInput, UsagePlan
from billing.domain import (
    BillingPeriod,
    BillingProblem,
    BillingStatus,
    OrgBillingState,
    OrgBillingTuning,
    OrgProfile,
    RefusedAdoption,
    StripeEventSignal,
    SubscriptionSnapshot,
    SubscriptionStatus,
    UsagePeriodReport,
)
from billing.search_attributes import (
    BILLING_PROBLEM_KEY,
    BILLING_STATUS_KEY,
    ORG_ID_KEY,
    STRIPE_CUSTOMER_ID_KEY,
)
from workflows import decisions
from workflows.decisions import KEPT_USAGE_PERIODS, TRIAL_WILL_END, Refusal, UsageStep

TUNING = OrgBillingTuning(
    resync_interval_seconds=86400,
    usage_lead_seconds=3600,
    usage_grace_seconds=300,
    failed_retry_seconds=3600,
    max_history_events=2000,
    seen_events_limit=3,
)
LEAD = timedelta(seconds=TUNING.usage_lead_seconds)
GRACE = timedelta(seconds=TUNING.usage_grace_seconds)
DAY = timedelta(seconds=TUNING.resync_interval_seconds)
SEC = timedelta(seconds=1)
JAN = datetime(2026, 1, 15, tzinfo=UTC)
FEB = datetime(2026, 2, 15, tzinfo=UTC)
MAR = datetime(2026, 3, 15, tzinfo=UTC)
APR = datetime(2026, 4, 15, tzinfo=UTC)


def billed(
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    start: datetime | None = JAN,
    end: datetime | None = FEB,
    **changes: object,
) -> OrgBillingState:
    """An org billed through Stripe on subscription sub_1 of customer cus_1."""
    state = OrgBillingState(
        org_id=7,
        status=BillingStatus.of(status),
        stripe_customer_id="cus_1",
        stripe_subscription_id="sub_1",
        subscription_status=status,
        current_period_start=start,
        current_period_end=end,
    )
    return state.model_copy(update=changes)


def snapshot(
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    start: datetime | None = FEB,
    end: datetime | None = MAR,
    **changes: object,
) -> SubscriptionSnapshot:
    snap = SubscriptionSnapshot(
        id="sub_1",
        customer_id="cus_1",
        status=status,
        subscription_end=None,
        trial_end=None,
        current_period_start=start,
        current_period_end=end,
    )
    return snap.model_copy(update=changes)


def event(
    event_id: str = "evt_1",
    type: str = "customer.subscription.updated",
    created: int = 100,
    object_id: str = "sub_1",
    **changes: object,
) -> StripeEventSignal:
    signal = StripeEventSignal(event_id=event_id, type=type, created=created, object_id=object_id)
    return signal.model_copy(update=changes)


def periods(state: OrgBillingState, snap: SubscriptionSnapshot) -> list[tuple[datetime, datetime]]:
    return [(p.start, p.end) for p in decisions.ended_periods(state, snap)]


# Run length ---------------------------------------------------------------------------


def test_history_is_too_long_at_the_bound_or_when_temporal_suggests() -> None:
    assert not decisions.history_too_long(1999, False, TUNING)
    assert decisions.history_too_long(2000, False, TUNING)
    assert decisions.history_too_long(10, True, TUNING)


@pytest.mark.parametrize(
    ("status", "pending", "retry_allowed"),
    [
        (BillingStatus.PROVISIONING, True, False),
        (BillingStatus.PROVISIONING_FAILED, True, True),
        (BillingStatus.NOT_BILLED, False, True),
        (BillingStatus.TRIALING, False, False),
        (BillingStatus.CANCELED, False, False),
        (BillingStatus.INCOMPLETE_EXPIRED, False, False),
    ],
)
def test_provisioning_runs_first_and_again_only_for_an_org_stripe_does_not_bill(
    status: BillingStatus, pending: bool, retry_allowed: bool
) -> None:
    state = OrgBillingState(org_id=7, status=status)
    assert decisions.provisioning_pending(state) is pending
    assert decisions.retry_provisioning_allowed(state) is retry_allowed


def test_resync_is_due_when_never_synced_and_a_day_after_the_last() -> None:
    assert decisions.resync_due(billed(), TUNING, JAN)
    synced = billed(last_synced_at=JAN)
    assert not decisions.resync_due(synced, TUNING, JAN + DAY - timedelta(seconds=1))
    assert decisions.resync_due(synced, TUNING, JAN + DAY)


def test_resync_reads_the_subscription_else_the_customer_and_nothing_before_either() -> None:
    assert decisions.resync_read(billed()) == FetchSubscriptionInput(
        subscription_id="sub_1", customer_id="cus_1"
    )
    customer_only = billed(stripe_subscription_id=None)
    assert decisions.resync_read(customer_only) == FetchSubscriptionInput(customer_id="cus_1")
    assert decisions.resync_read(OrgBillingState(org_id=7)) is None


# Usage schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "billable"),
    [
        (SubscriptionStatus.TRIALING, True),
        (SubscriptionStatus.ACTIVE, True),
        (SubscriptionStatus.PAST_DUE, True),
        (SubscriptionStatus.UNPAID, True),
        (SubscriptionStatus.PAUSED, False),
        (SubscriptionStatus.CANCELED, False),
        (SubscriptionStatus.INCOMPLETE, False),
        (SubscriptionStatus.INCOMPLETE_EXPIRED, False),
    ],
)
def test_usage_is_billed_in_usage_statuses_only(status: SubscriptionStatus, billable: bool) -> None:
    assert decisions.billable_period(billed(status)) == ((JAN, FEB) if billable else None)


def test_no_billable_period_without_a_customer_or_a_known_period() -> None:
    assert decisions.billable_period(billed(stripe_customer_id=None)) is None
    assert decisions.billable_period(billed(start=None)) is None
    assert decisions.billable_period(billed(end=None)) is None
    assert decisions.billable_period(OrgBillingState(org_id=7)) is None
    with pytest.raises(AssertionError):
        decisions.current_period(billed(SubscriptionStatus.CANCELED))
    assert decisions.current_period(billed()) == (JAN, FEB)


def test_pre_end_report_is_owed_until_one_is_made_within_the_lead() -> None:
    state = billed()
    assert decisions.needs_pre_end_report(state, TUNING, JAN, FEB)
    entry = UsagePeriodReport(period_start=JAN, period_end=FEB)
    state.usage.append(entry)
    assert decisions.needs_pre_end_report(state, TUNING, JAN, FEB)
    entry.last_reported_at = FEB - LEAD - timedelta(seconds=1)  # before the window: usage grew
    assert decisions.needs_pre_end_report(state, TUNING, JAN, FEB)
    entry.last_reported_at = FEB - LEAD
    assert not decisions.needs_pre_end_report(state, TUNING, JAN, FEB)
    # Another period's report does not count for this one.
    assert decisions.needs_pre_end_report(state, TUNING, FEB, MAR)


def test_usage_is_quiet_strictly_before_retry_after() -> None:
    assert not decisions.usage_quiet(billed(), JAN)
    waiting = billed(usage_retry_after=JAN + timedelta(hours=1))
    assert decisions.usage_quiet(waiting, JAN)
    assert not decisions.usage_quiet(waiting, JAN + timedelta(hours=1))


def test_usage_step_over_the_period() -> None:
    state = billed()
    assert decisions.usage_step(state, TUNING, JAN + timedelta(days=3)) is UsageStep.NONE
    assert decisions.usage_step(state, TUNING, FEB - LEAD) is UsageStep.REPORT
    state.usage.append(
        UsagePeriodReport(period_start=JAN, period_end=FEB, last_reported_at=FEB - LEAD)
    )
    assert decisions.usage_step(state, TUNING, FEB - LEAD) is UsageStep.NONE
    assert decisions.usage_step(state, TUNING, FEB + GRACE - timedelta(seconds=1)) is (
        UsageStep.NONE
    )
    assert decisions.usage_step(state, TUNING, FEB + GRACE) is UsageStep.RESYNC


def test_a_refused_report_quiets_every_usage_step_and_no_period_means_none() -> None:
    quiet = billed(usage_retry_after=FEB + timedelta(hours=1))
    assert decisions.usage_step(quiet, TUNING, FEB + GRACE) is UsageStep.QUIET
    assert decisions.usage_step(quiet, TUNING, FEB + timedelta(hours=1)) is UsageStep.RESYNC
    canceled = billed(SubscriptionStatus.CANCELED)
    assert decisions.usage_step(canceled, TUNING, FEB + GRACE) is UsageStep.NONE


def test_renewal_unseen_while_stripe_still_shows_the_period_and_nothing_was_queued() -> None:
    state = billed()
    assert decisions.renewal_unseen(state, JAN)
    assert not decisions.renewal_unseen(billed(start=FEB, end=MAR), JAN)
    state.to_finalize.append(BillingPeriod(start=JAN, end=FEB))
    assert not decisions.renewal_unseen(state, JAN)


def test_next_wake_without_anything_scheduled_is_the_resync_interval() -> None:
    assert decisions.next_wake(OrgBillingState(org_id=7), TUNING, JAN) == DAY


def test_next_wake_is_the_next_resync_when_not_billable() -> None:
    state = billed(SubscriptionStatus.CANCELED, last_synced_at=JAN)
    assert decisions.next_wake(state, TUNING, JAN + timedelta(hours=1)) == DAY - timedelta(hours=1)


def test_next_wake_steps_through_the_period() -> None:
    now = FEB - timedelta(hours=12)
    state = billed(last_synced_at=now)
    assert decisions.next_wake(state, TUNING, now) == FEB - LEAD - now  # the lead window opens
    # Within the lead with the report owed: now (never less than a second).
    assert decisions.next_wake(state, TUNING, FEB - LEAD) == timedelta(seconds=1)
    state.usage.append(
        UsagePeriodReport(period_start=JAN, period_end=FEB, last_reported_at=FEB - LEAD)
    )
    assert decisions.next_wake(state, TUNING, FEB - LEAD) == LEAD + GRACE  # the renewal check
    state.to_finalize.append(BillingPeriod(start=JAN - DAY, end=JAN))
    assert decisions.next_wake(state, TUNING, FEB - LEAD) == timedelta(seconds=1)


def test_retry_after_holds_usage_wakes_but_not_the_resync() -> None:
    now = FEB + GRACE  # the renewal check is due
    retry_after = now + timedelta(hours=2)
    state = billed(last_synced_at=now - DAY + timedelta(hours=1), usage_retry_after=retry_after)
    assert decisions.next_wake(state, TUNING, now) == timedelta(hours=1)  # the re-sync
    state.last_synced_at = now
    assert decisions.next_wake(state, TUNING, now) == timedelta(hours=2)  # usage waits
    state.usage_retry_after = now  # the window has passed: no hold
    assert decisions.next_wake(state, TUNING, now) == timedelta(seconds=1)


def test_retry_after_never_synced_holds_every_wake() -> None:
    now = FEB + GRACE
    state = billed(usage_retry_after=now + timedelta(minutes=10))
    state.to_finalize.append(BillingPeriod(start=JAN, end=FEB))
    assert decisions.next_wake(state, TUNING, now) == timedelta(minutes=10)


# Periods owed a final report --------------------------------------------------------------


def test_a_renewal_owes_the_ended_period() -> None:
    assert periods(billed(), snapshot()) == [(JAN, FEB)]


def test_no_period_is_owed_while_stripe_shows_the_same_one() -> None:
    assert periods(billed(), snapshot(start=JAN, end=FEB)) == []
    # A stale read showing an older period owes nothing either.
    assert periods(billed(start=FEB, end=MAR), snapshot(start=JAN, end=FEB)) == []


def test_a_trial_ended_early_cuts_the_trial_period_short() -> None:
    trial_end = JAN + timedelta(days=5)
    state = billed(SubscriptionStatus.TRIALING)
    renewed = snapshot(start=trial_end, end=trial_end + timedelta(days=31))
    assert periods(state, renewed) == [(JAN, trial_end)]


def test_an_outage_owes_every_period_it_skipped_on_the_anchor_day() -> None:
    state = billed(start=datetime(2026, 1, 31, tzinfo=UTC), end=datetime(2026, 2, 28, tzinfo=UTC))
    renewed = snapshot(
        start=datetime(2026, 4, 30, tzinfo=UTC),
        end=datetime(2026, 5, 31, tzinfo=UTC),
        billing_cycle_anchor=datetime(2025, 12, 31, tzinfo=UTC),
    )
    assert periods(state, renewed) == [
        (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC)),
        (datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)),
        (datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 4, 30, tzinfo=UTC)),
    ]


def test_an_outage_without_an_anchor_steps_on_the_later_day() -> None:
    """A period clamped in February (30th -> 28th) does not move the anchor day."""
    jan30, feb28, mar30, apr30 = (
        datetime(2026, m, d, tzinfo=UTC) for m, d in ((1, 30), (2, 28), (3, 30), (4, 30))
    )
    renewed = snapshot(start=apr30, end=datetime(2026, 5, 30, tzinfo=UTC))
    assert periods(billed(start=jan30, end=feb28), renewed) == [
        (jan30, feb28),
        (feb28, mar30),
        (mar30, apr30),
    ]
    renewed = snapshot(start=APR, end=APR + timedelta(days=30))
    assert periods(billed(), renewed) == [(JAN, FEB), (FEB, MAR), (MAR, APR)]


def test_canceled_without_renewal_owes_usage_up_to_the_subscription_end() -> None:
    ended_at = JAN + timedelta(days=10)
    canceled = snapshot(SubscriptionStatus.CANCELED, start=JAN, end=FEB, subscription_end=ended_at)
    assert periods(billed(), canceled) == [(JAN, ended_at)]
    # Canceled at the period's end (or with no end known): the whole period.
    at_end = snapshot(SubscriptionStatus.CANCELED, start=JAN, end=FEB, subscription_end=MAR)
    assert periods(billed(), at_end) == [(JAN, FEB)]
    no_end = snapshot(SubscriptionStatus.CANCELED, start=JAN, end=FEB)
    assert periods(billed(), no_end) == [(JAN, FEB)]
    # Canceled at the very start: nothing was used.
    at_start = snapshot(SubscriptionStatus.CANCELED, start=JAN, end=FEB, subscription_end=JAN)
    assert periods(billed(), at_start) == []


def test_a_pause_owes_the_period_so_far() -> None:
    paused = snapshot(SubscriptionStatus.PAUSED, start=JAN, end=FEB)
    assert periods(billed(), paused) == [(JAN, FEB)]


def test_nothing_is_owed_unless_the_state_billed_usage_for_a_known_period() -> None:
    assert periods(billed(SubscriptionStatus.CANCELED), snapshot()) == []
    assert periods(billed(SubscriptionStatus.PAUSED), snapshot()) == []
    assert periods(billed(start=None), snapshot()) == []
    assert periods(billed(end=None), snapshot()) == []


def test_a_period_already_queued_is_not_queued_twice() -> None:
    state = billed()
    state.to_finalize.append(BillingPeriod(start=JAN, end=FEB))
    assert periods(state, snapshot(start=APR, end=APR + timedelta(days=30))) == [
        (FEB, MAR),
        (MAR, APR),
    ]


# Usage bookkeeping --------------------------------------------------------------------------


def test_a_report_is_kept_per_period_and_counts_add_up() -> None:
    state = billed()
    first = decisions.record_usage_report(
        state, JAN, FEB, UsagePlan(events=[], users=2, requests=10), 2, JAN + DAY
    )
    assert first == UsagePeriodReport(
        period_start=JAN,
        period_end=FEB,
        users=2,
        requests=10,
        meter_events_sent=2,
        last_reported_at=JAN + DAY,
    )
    skipped = UsagePlan(events=[], users=3, requests=12, skipped_reason="no usage price")
    decisions.record_usage_report(state, JAN, FEB, skipped, 1, JAN + 2 * DAY)
    again = decisions.record_usage_report(
        state, JAN, FEB, UsagePlan(events=[], users=3, requests=12), 0, JAN + 3 * DAY
    )
    assert (again.users, again.requests, again.meter_events_sent) == (3, 12, 3)
    assert again.skipped_reason == "no usage price"  # kept once given
    assert again.last_reported_at == JAN + 3 * DAY
    assert len(state.usage) == 1
    again.users = 99  # a copy: the state keeps its own
    assert state.usage[0].users == 3


def test_only_the_last_periods_are_kept() -> None:
    state = billed()
    starts = [JAN + timedelta(days=31 * i) for i in range(KEPT_USAGE_PERIODS + 2)]
    for start in starts:
        plan = UsagePlan(events=[], users=1, requests=1)
        decisions.record_usage_report(state, start, start + DAY, plan, 0, start)
    assert [u.period_start for u in state.usage] == starts[2:]


# Stripe events --------------------------------------------------------------------------


def test_a_subscription_event_is_keyed_and_read_by_its_object() -> None:
    plan = decisions.plan_event(billed(), event(object_id="sub_2"))
    assert plan.key == "sub_2"
    assert plan.fetch == FetchSubscriptionInput(subscription_id="sub_2")
    assert not plan.stale and not plan.late_trial_notice


def test_an_invoice_event_is_keyed_by_its_subscription() -> None:
    invoice = event(type="invoice.paid", object_id="in_1", subscription_id="sub_1")
    plan = decisions.plan_event(billed(), invoice)
    assert (plan.key, plan.fetch) == ("sub_1", FetchSubscriptionInput(subscription_id="sub_1"))


def test_a_customer_event_reads_the_customers_live_subscription() -> None:
    from_event = event(type="customer.updated", object_id="cus_2", customer_id="cus_2")
    plan = decisions.plan_event(billed(), from_event)
    assert (plan.key, plan.fetch) == ("cus_2", FetchSubscriptionInput(customer_id="cus_2"))
    bare = event(type="invoice.created", object_id="in_1")
    plan = decisions.plan_event(billed(), bare)
    assert (plan.key, plan.fetch) == ("cus_1", FetchSubscriptionInput(customer_id="cus_1"))


def test_an_event_naming_nothing_reads_nothing() -> None:
    plan = decisions.plan_event(OrgBillingState(org_id=7), event(type="invoice.created"))
    assert (plan.key, plan.fetch, plan.stale) == ("org", None, False)


def test_an_event_older_than_its_watermark_is_stale() -> None:
    state = billed(watermarks={"sub_1": 100, "sub_2": 500})
    assert decisions.plan_event(state, event(created=99)).stale
    assert not decisions.plan_event(state, event(created=100)).stale  # same second: applied
    # Watermarks are per subscription.
    assert not decisions.plan_event(state, event(created=99, object_id="sub_3")).stale


def test_a_late_trial_notice_counts_only_for_the_orgs_own_subscription() -> None:
    state = billed(watermarks={"sub_1": 100, "sub_2": 100})
    assert decisions.plan_event(state, event(type=TRIAL_WILL_END, created=50)).late_trial_notice
    other = event(type=TRIAL_WILL_END, created=50, object_id="sub_2")
    assert not decisions.plan_event(state, other).late_trial_notice
    fresh = decisions.plan_event(state, event(type=TRIAL_WILL_END, created=150))
    assert not fresh.late_trial_notice


def test_watermarks_only_move_forward() -> None:
    state = billed()
    decisions.advance_watermark(state, "sub_1", 100)
    decisions.advance_watermark(state, "sub_1", 90)
    decisions.advance_watermark(state, "cus_1", 5)
    assert state.watermarks == {"sub_1": 100, "cus_1": 5}


def test_seen_events_are_bounded_to_the_newest() -> None:
    state = billed()
    for n in range(5):
        decisions.remember(state, event(f"evt_{n}", type=f"type.{n}"), TUNING.seen_events_limit)
    assert state.seen_event_ids == ["evt_2", "evt_3", "evt_4"]
    assert (state.last_event_id, state.last_event_type) == ("evt_4", "type.4")


def test_a_trial_end_is_noted_once() -> None:
    state = billed(SubscriptionStatus.TRIALING)
    assert decisions.note_trial_will_end(state, None) is None
    assert decisions.note_trial_will_end(state, FEB) == FEB
    assert decisions.note_trial_will_end(state, FEB) is None  # redelivered
    assert decisions.note_trial_will_end(state, MAR) == MAR  # a new trial end
    assert state.trial_will_end_noted_for == MAR


# Adopting a Stripe read -------------------------------------------------------------------


def test_another_customers_subscription_is_refused() -> None:
    state = billed()
    foreign = snapshot(id="sub_9", customer_id="cus_9")
    assert decisions.refusal(state, foreign) is Refusal.FOREIGN_CUSTOMER
    assert decisions.foreign_customer_error(state, foreign) == (
        "subscription sub_9 belongs to customer cus_9, not to this org's cus_1; ignored"
    )
    # Runs recorded before the provable-adoption patch linked the first read.
    assert decisions.refusal(OrgBillingState(org_id=7), foreign, provable=False) is None


def test_an_org_without_a_customer_is_never_handed_one_by_a_read() -> None:
    dashboard = snapshot(id="sub_9", customer_id="cus_9")
    for status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED):
        state = OrgBillingState(org_id=7, status=status)
        assert decisions.refusal(state, dashboard) is Refusal.NO_CUSTOMER
        assert Refusal.NO_CUSTOMER in decisions.ADOPTION_REFUSALS
    reason = decisions.refusal_reason(Refusal.NO_CUSTOMER, state, dashboard)
    assert reason.startswith("subscription sub_9 of customer cus_9 not linked")


def test_a_marketplace_org_never_adopts_a_subscription() -> None:
    dashboard = snapshot(id="sub_9", customer_id="cus_9")
    marketplace = OrgBillingState(org_id=7, status=BillingStatus.NOT_BILLED)
    assert decisions.refusal(marketplace, dashboard) is Refusal.NOT_BILLED
    assert "marketplace" in decisions.refusal_reason(Refusal.NOT_BILLED, marketplace, dashboard)
    # Even one on the customer it had when Stripe billed it, before it moved.
    moved = billed(SubscriptionStatus.CANCELED).model_copy(
        update={"status": BillingStatus.NOT_BILLED}
    )
    assert decisions.refusal(moved, snapshot(id="sub_2")) is Refusal.NOT_BILLED
    assert Refusal.NOT_BILLED in decisions.ADOPTION_REFUSALS


def test_an_org_billed_elsewhere_never_adopts_a_subscription_whatever_its_status() -> None:
    """Its own subscription ended (or still runs to its period end): a live one made
    in the dashboard on its customer is refused, not taken as a replacement."""
    dashboard = snapshot(id="sub_2")
    ended = billed(SubscriptionStatus.CANCELED, billed_elsewhere=True)
    assert decisions.refusal(ended, dashboard) is Refusal.NOT_BILLED
    leaving = billed(billed_elsewhere=True)
    assert decisions.refusal(leaving, dashboard) is Refusal.NOT_BILLED
    # Not billed elsewhere, an ended subscription is replaced by a live one as before.
    assert decisions.refusal(billed(SubscriptionStatus.CANCELED), dashboard) is None
    # Its own subscription is still followed.
    assert decisions.refusal(ended, snapshot(SubscriptionStatus.CANCELED)) is None


def test_an_ended_subscription_of_an_org_that_may_be_billed_elsewhere_is_checked() -> None:
    canceled = snapshot(SubscriptionStatus.CANCELED)
    assert decisions.marketplace_end_seen(billed(billed_elsewhere=True), canceled)
    assert decisions.marketplace_end_seen(billed(marketplace_cancel_of="sub_1"), canceled)
    # Still live, another subscription, never billed elsewhere, or closed: not checked.
    assert not decisions.marketplace_end_seen(billed(billed_elsewhere=True), snapshot())
    assert not decisions.marketplace_end_seen(
        billed(billed_elsewhere=True), snapshot(SubscriptionStatus.CANCELED, id="sub_2")
    )
    assert not decisions.marketplace_end_seen(billed(), canceled)
    assert not decisions.marketplace_end_seen(
        billed(billed_elsewhere=True, closed_at=JAN), canceled
    )


def test_a_not_billed_org_follows_a_live_subscription_its_row_still_names() -> None:
    def org(**changes: object) -> OrgProfile:
        profile = OrgProfile(
            org_id=7,
            org_uid="u7",
            name="Labs",
            owner_email="a@labs.test",
            aws_account_id="123456789012",
            stripe_customer_id="cus_1",
            stripe_subscription_id="sub_1",
            subscription_status=SubscriptionStatus.ACTIVE,
        )
        return profile.model_copy(update=changes)

    assert decisions.live_subscription_unfollowed(org())
    assert not decisions.live_subscription_unfollowed(
        org(subscription_status=SubscriptionStatus.CANCELED)
    )
    assert not decisions.live_subscription_unfollowed(org(stripe_subscription_id=None))
    assert not decisions.live_subscription_unfollowed(org(aws_account_id=None))


def test_only_a_subscription_we_ended_for_a_marketplace_left_since_is_replaced() -> None:
    ended = snapshot(SubscriptionStatus.CANCELED)
    ours = billed(SubscriptionStatus.CANCELED, marketplace_cancel_of="sub_1")
    assert decisions.marketplace_left_after_end(ours, ended, billed_elsewhere=False)
    # Still billed elsewhere, still live, or canceled by the customer: not replaced.
    assert not decisions.marketplace_left_after_end(ours, ended, billed_elsewhere=True)
    assert not decisions.marketplace_left_after_end(ours, snapshot(), billed_elsewhere=False)
    theirs = billed(SubscriptionStatus.CANCELED)
    assert not decisions.marketplace_left_after_end(theirs, ended, billed_elsewhere=False)


def test_the_orgs_own_subscription_is_still_applied_to_a_marketplace_org() -> None:
    """Reads of the subscription the org already has are no adoption."""
    moved = billed().model_copy(update={"status": BillingStatus.NOT_BILLED})
    assert decisions.refusal(moved, snapshot(SubscriptionStatus.CANCELED)) is None


def test_another_subscription_of_the_orgs_customer_is_not_an_adoption_refusal() -> None:
    """Kept out (the org keeps its live one) but not recorded: it is the org's customer."""
    assert decisions.refusal(billed(), snapshot(id="sub_2")) is Refusal.OTHER_SUBSCRIPTION
    assert Refusal.OTHER_SUBSCRIPTION not in decisions.ADOPTION_REFUSALS


def test_refused_adoptions_are_kept_newest_last_and_bounded() -> None:
    state = billed()
    for n in range(decisions.KEPT_REFUSALS + 3):
        decisions.note_refusal(
            state, RefusedAdoption(at=JAN, reason=f"r{n}", subscription_id=f"sub_{n}")
        )
    kept = [r.reason for r in state.refused_adoptions]
    assert len(kept) == decisions.KEPT_REFUSALS
    assert kept[0] == "r3" and kept[-1] == f"r{decisions.KEPT_REFUSALS + 2}"


def test_the_orgs_own_subscription_is_applied() -> None:
    assert decisions.refusal(billed(), snapshot()) is None
    assert decisions.refusal(billed(), snapshot(SubscriptionStatus.CANCELED)) is None


def test_another_subscription_replaces_ours_only_when_ours_is_over_and_it_bills() -> None:
    other_live = snapshot(id="sub_2")
    other_dead = snapshot(SubscriptionStatus.INCOMPLETE_EXPIRED, id="sub_2")
    assert decisions.refusal(billed(), other_live) is Refusal.OTHER_SUBSCRIPTION
    assert decisions.refusal(billed(SubscriptionStatus.PAUSED), other_live) is (
        Refusal.OTHER_SUBSCRIPTION
    )
    canceled = billed(SubscriptionStatus.CANCELED)
    assert decisions.refusal(canceled, other_dead) is Refusal.OTHER_SUBSCRIPTION
    assert decisions.refusal(canceled, other_live) is None


def test_adopting_a_read_follows_stripe() -> None:
    state = billed(SubscriptionStatus.TRIALING)
    snap = snapshot(
        SubscriptionStatus.PAST_DUE,
        id="sub_2",
        subscription_end=APR,
        trial_end=FEB,
        pause_collection=True,
    )
    decisions.adopt(state, snap)
    assert state.stripe_subscription_id == "sub_2"
    assert state.subscription_status is SubscriptionStatus.PAST_DUE
    assert state.status is BillingStatus.PAST_DUE
    assert (state.current_period_start, state.current_period_end) == (FEB, MAR)
    assert (state.subscription_end, state.trial_end, state.pause_collection) == (APR, FEB, True)


# Search attributes -----------------------------------------------------------------------


def test_search_attributes_name_the_customer_once_known() -> None:
    fresh = OrgBillingState(org_id=7)
    assert decisions.wanted_attributes(fresh) == {"OrgId": "7", "BillingStatus": "provisioning"}
    assert decisions.attribute_updates(decisions.wanted_attributes(fresh)) == [
        ORG_ID_KEY.value_set("7"),
        BILLING_STATUS_KEY.value_set("provisioning"),
    ]
    wanted = decisions.wanted_attributes(billed())
    assert wanted == {"OrgId": "7", "BillingStatus": "active", "StripeCustomerId": "cus_1"}
    assert decisions.attribute_updates(wanted) == [
        ORG_ID_KEY.value_set("7"),
        BILLING_STATUS_KEY.value_set("active"),
        STRIPE_CUSTOMER_ID_KEY.value_set("cus_1"),
    ]


def test_a_solved_problem_is_unset_and_an_unknown_one_never_shown() -> None:
    state = billed()
    wanted = decisions.wanted_attributes(state, BillingProblem.STRIPE_AUTH)
    assert wanted["BillingProblem"] == "stripe_auth"
    assert decisions.attribute_updates(wanted)[-1] == BILLING_PROBLEM_KEY.value_set("stripe_auth")
    solved = decisions.wanted_attributes(state)
    assert "BillingProblem" not in solved
    assert decisions.attribute_updates(solved, wanted)[-1] == BILLING_PROBLEM_KEY.value_unset()
    # Never shown, never unset: the upsert is the one saved histories have.
    assert decisions.attribute_updates(solved, solved) == decisions.attribute_updates(solved)
    assert len(decisions.attribute_updates(solved)) == 3


# Problems -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        (
            OrgBillingState(org_id=7, status=BillingStatus.PROVISIONING_FAILED),
            "provisioning_failed",
        ),
        (billed(usage_problem=BillingProblem.STRIPE_AUTH), "stripe_auth"),
        (billed(usage_problem=BillingProblem.USAGE_REPORT_FAILING), "usage_report_failing"),
        (billed(SubscriptionStatus.PAST_DUE), "payment_failed"),
        (billed(SubscriptionStatus.UNPAID), "payment_failed"),
        (billed(), None),
        (billed(SubscriptionStatus.CANCELED), None),
        (OrgBillingState(org_id=7, status=BillingStatus.NOT_BILLED), None),
    ],
)
def test_the_problem_shown_is_the_one_a_person_must_fix(
    state: OrgBillingState, problem: str | None
) -> None:
    found = decisions.billing_problem(state)
    assert (found.value if found else None) == problem


def test_failed_events_are_a_problem_below_failing_usage() -> None:
    state = billed(SubscriptionStatus.PAST_DUE)
    decisions.event_failed(state, event(), "sub_1", "403", TUNING, JAN)
    assert decisions.billing_problem(state) is BillingProblem.EVENT_FAILED
    state.usage_problem = BillingProblem.STRIPE_AUTH
    assert decisions.billing_problem(state) is BillingProblem.STRIPE_AUTH


# Refused usage reports ---------------------------------------------------------------------

RETRY = TUNING.model_copy(
    update={"usage_retry_initial_seconds": 30, "usage_retry_max_seconds": 300}
)


def test_backoff_doubles_up_to_its_maximum() -> None:
    assert [decisions.backoff(n, 30, 300).total_seconds() for n in range(1, 7)] == [
        30,
        60,
        120,
        240,
        300,
        300,
    ]
    assert decisions.backoff(10_000, 30, 300) == timedelta(seconds=300)
    assert decisions.backoff(0, 30, 300) == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("StripeAuthenticationError", BillingProblem.STRIPE_AUTH),
        ("StripePermissionError", BillingProblem.STRIPE_AUTH),
        ("StripeInvalidRequestError", BillingProblem.USAGE_REPORT_FAILING),
        (None, BillingProblem.USAGE_REPORT_FAILING),
    ],
)
def test_a_refused_report_is_retried_soon_whatever_refused_it(
    kind: str | None, problem: BillingProblem
) -> None:
    state = billed()
    now = FEB + GRACE
    assert decisions.usage_refused(state, kind, RETRY, now) == timedelta(seconds=30)
    assert state.usage_problem is problem
    assert state.usage_retry_after == now + timedelta(seconds=30)
    # Within the hour Stripe leaves before finalizing the invoice: retried again and again.
    assert decisions.usage_refused(state, kind, RETRY, now) == timedelta(seconds=60)
    assert state.usage_failures == 2
    assert decisions.usage_step(state, RETRY, now + timedelta(seconds=60)) is UsageStep.RESYNC


def test_a_report_that_goes_through_clears_the_usage_problem_only() -> None:
    state = billed(last_error="usage report: revoked key")
    assert not decisions.usage_recovered(state, "usage report")
    decisions.usage_refused(state, "StripeAuthenticationError", RETRY, FEB)
    assert decisions.usage_recovered(state, "usage report")
    assert (state.usage_failures, state.usage_problem, state.usage_retry_after) == (0, None, None)
    assert state.last_error is None
    other = billed(last_error="event evt_1: no such subscription")
    decisions.usage_refused(other, None, RETRY, FEB)
    assert decisions.usage_recovered(other, "usage report")
    assert other.last_error == "event evt_1: no such subscription"


def test_the_period_is_confirmed_only_when_stripe_shows_the_same_one() -> None:
    assert decisions.same_period(billed(), JAN, FEB)
    assert not decisions.same_period(billed(start=JAN + DAY), JAN, FEB)  # trial ended early
    assert not decisions.same_period(billed(end=FEB - DAY), JAN, FEB)  # anchor reset
    assert not decisions.same_period(billed(SubscriptionStatus.CANCELED), JAN, FEB)


# Failed events ----------------------------------------------------------------------------

EVENTS = TUNING.model_copy(
    update={"event_retry_initial_seconds": 30, "event_retry_max_seconds": 600}
)


def test_a_failed_event_is_kept_unseen_and_retried_with_backoff() -> None:
    state = billed()
    assert decisions.event_failed(state, event("evt_1"), "sub_1", "403", EVENTS, JAN) is None
    [kept] = state.failed_events
    assert (kept.event.event_id, kept.attempts, kept.retry_at) == ("evt_1", 1, JAN + 30 * SEC)
    assert "evt_1" not in state.seen_event_ids
    assert decisions.due_failed_event(state, JAN + 29 * SEC) is None
    assert decisions.next_event_retry(state, JAN) == 30 * SEC
    due = decisions.due_failed_event(state, JAN + 30 * SEC)
    assert due is not None and due.event.event_id == "evt_1"
    assert state.failed_events  # kept until it goes through
    decisions.event_failed(state, event("evt_1"), "sub_1", "403", EVENTS, JAN + 30 * SEC)
    [again] = state.failed_events
    assert (again.attempts, again.retry_at) == (2, JAN + 90 * SEC)
    assert decisions.next_event_retry(state, JAN + 90 * SEC) == SEC  # never less than a second


def test_one_failed_event_is_kept_per_object_the_newest() -> None:
    state = billed()
    decisions.event_failed(state, event("evt_1", created=100), "sub_1", "403", EVENTS, JAN)
    covered = decisions.event_failed(
        state, event("evt_2", created=200), "sub_1", "403", EVENTS, JAN
    )
    assert covered is not None and covered.event_id == "evt_1"
    older = decisions.event_failed(state, event("evt_0", created=50), "sub_1", "403", EVENTS, JAN)
    assert older is not None and older.event_id == "evt_0"
    decisions.event_failed(state, event("evt_9", object_id="sub_9"), "sub_9", "403", EVENTS, JAN)
    assert [(f.key, f.event.event_id, f.attempts) for f in state.failed_events] == [
        ("sub_1", "evt_2", 3),
        ("sub_9", "evt_9", 1),
    ]
    resolved = decisions.event_resolved(state, "sub_1")
    assert [e.event_id for e in resolved] == ["evt_2"]
    assert [f.key for f in state.failed_events] == ["sub_9"]
    decisions.event_resolved_by_id(state, "evt_9")
    assert state.failed_events == []
    assert decisions.next_event_retry(state, JAN) is None


def test_failed_event_retries_wake_the_loop_even_while_usage_waits() -> None:
    now = FEB + GRACE
    state = billed(last_synced_at=now, usage_retry_after=now + timedelta(hours=2))
    decisions.event_failed(state, event(), "sub_1", "403", EVENTS, now)
    assert decisions.next_wake(state, EVENTS, now) == 30 * SEC


# Watermark cap ------------------------------------------------------------------------------


def test_the_watermark_cap_is_stripes_clock_at_the_read() -> None:
    snap = snapshot(start=FEB, end=MAR)
    # A test clock's time, ahead of the wall clock or behind it.
    assert decisions.watermark_cap(snap.model_copy(update={"read_at": APR}), MAR) == int(
        APR.timestamp()
    )
    behind = snap.model_copy(update={"read_at": FEB + DAY})
    assert decisions.watermark_cap(behind, MAR) == int((FEB + DAY).timestamp())
    # Without the read's clock: now, or the period start if later.
    assert decisions.watermark_cap(snap, JAN) == int(FEB.timestamp())
    assert decisions.watermark_cap(snap, MAR) == int(MAR.timestamp())
    assert decisions.watermark_cap(snapshot(start=None, end=None), JAN) == int(JAN.timestamp())


def test_an_event_dated_far_ahead_moves_its_watermark_only_to_the_cap() -> None:
    state = billed()
    cap = int(FEB.timestamp())
    decisions.advance_watermark(state, "sub_1", 2**53, cap)
    assert state.watermarks["sub_1"] == cap
    # A real event after it is not stale.
    assert not decisions.plan_event(state, event(created=cap)).stale
    decisions.advance_watermark(state, "sub_1", cap - 10, cap)
    assert state.watermarks["sub_1"] == cap  # still never back


def test_a_read_heals_watermarks_past_its_cap() -> None:
    state = billed(watermarks={"sub_1": 2**53, "cus_1": 5, "sub_2": 2**53})
    decisions.cap_watermarks(state, ["sub_1", "cus_1", "sub_3"], 1000)
    assert state.watermarks == {"sub_1": 1000, "cus_1": 5, "sub_2": 2**53}


# Moving to a marketplace ------------------------------------------------------------------


def test_an_org_moved_to_a_marketplace_ends_its_subscription_at_period_end() -> None:
    state = billed()
    live = snapshot(start=JAN, end=FEB)
    assert decisions.marketplace_cancel(state, live, billed_elsewhere=True) is True
    trialing = snapshot(SubscriptionStatus.TRIALING, start=JAN, end=FEB)
    assert decisions.marketplace_cancel(state, trialing, billed_elsewhere=True) is True
    # A cancel later than the period end would let Stripe renew: end it at the period's end.
    later = live.model_copy(update={"cancel_at": MAR})
    assert decisions.marketplace_cancel(state, later, billed_elsewhere=True) is True
    ending = live.model_copy(update={"cancel_at": FEB})
    assert decisions.marketplace_cancel(state, ending, billed_elsewhere=True) is None
    ended = snapshot(SubscriptionStatus.CANCELED, start=JAN, end=FEB)
    assert decisions.marketplace_cancel(state, ended, billed_elsewhere=True) is None
    other = live.model_copy(update={"id": "sub_2"})
    assert decisions.marketplace_cancel(state, other, billed_elsewhere=True) is None
    assert decisions.marketplace_cancel(state, live, billed_elsewhere=False) is None


def test_back_from_the_marketplace_in_time_only_our_cancel_is_taken_back() -> None:
    ending = snapshot(start=JAN, end=FEB, cancel_at=FEB)
    ours = billed(marketplace_cancel_of="sub_1")
    assert decisions.marketplace_cancel(ours, ending, billed_elsewhere=False) is False
    # A cancel the customer asked for is theirs.
    assert decisions.marketplace_cancel(billed(), ending, billed_elsewhere=False) is None
    # Too late: the subscription ended.
    ended = ending.model_copy(update={"status": SubscriptionStatus.CANCELED})
    assert decisions.marketplace_cancel(ours, ended, billed_elsewhere=False) is None
