"""What the `OrgBilling` workflow decides, as plain functions of (state, tuning, now).

The workflow class only orchestrates: it calls activities, waits, logs and
upserts search attributes. Every choice it makes between those steps is here,
so each rule can be read and unit-tested without a Temporal server. Nothing
here does I/O or reads a clock: `now` is always a parameter (the workflow passes
`workflow.now()`). Queries return answers; the few functions that change the
state say so and change only the in-memory `OrgBillingState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate

# Workflow code runs in the sandbox (which would catch a clock or I/O here);
# the shared types come from the worker's own modules.
with workflow.unsafe.imports_passed_through():
    from activities.models import FetchSubscriptionInput, UsagePlan
    from billing.domain import (
        LIVE_SUBSCRIPTION_STATUSES,
        BillingPeriod,
        BillingProblem,
        BillingStatus,
        FailedEvent,
        OrgBillingState,
        OrgBillingTuning,
        OrgProfile,
        RefusedAdoption,
        StripeEventSignal,
        SubscriptionSnapshot,
        SubscriptionStatus,
        UsagePeriodReport,
    )
    from billing.periods import periods_between
    from billing.search_attributes import (
        BILLING_PROBLEM_KEY,
        BILLING_STATUS_KEY,
        ORG_ID_KEY,
        STRIPE_CUSTOMER_ID_KEY,
    )

# Statuses in which Stripe bills metered usage: their periods get usage reports.
USAGE_STATUSES = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
    }
)
KEPT_USAGE_PERIODS = 12
TRIAL_WILL_END = "customer.subscription.trial_will_end"
# When the grace after a period's end has passed and Stripe still shows that
# period, look again this much later (Stripe renews a little after the end).
RENEWAL_RECHECK = timedelta(minutes=10)
# Refusals a person must fix in Stripe's dashboard or the settings: the key was
# rotated, revoked or restricted.
STRIPE_AUTH_ERRORS = frozenset({"StripeAuthenticationError", "StripePermissionError"})


# Run length ---------------------------------------------------------------------


def history_too_long(history_length: int, suggested: bool, tuning: OrgBillingTuning) -> bool:
    """Continue as new when Temporal suggests it or the run reached its own bound.

    The bound keeps replay cheap and lets tests exercise continue-as-new with a
    small `max_history_events`.
    """
    return suggested or history_length >= tuning.max_history_events


def provisioning_pending(state: OrgBillingState) -> bool:
    """A run starts by provisioning an org never provisioned, or whose last attempt failed."""
    return state.status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED)


def retry_provisioning_allowed(state: OrgBillingState) -> bool:
    """An operator's retry provisions again only an org Stripe does not bill yet.

    That is one whose attempt failed, or one billed elsewhere (the attempt
    re-checks that); an org with a subscription is never provisioned twice.
    """
    return state.status in (BillingStatus.NOT_BILLED, BillingStatus.PROVISIONING_FAILED)


def resync_due(state: OrgBillingState, tuning: OrgBillingTuning, now: datetime) -> bool:
    """A daily re-read from Stripe heals whatever a lost webhook left behind."""
    last = state.last_synced_at
    return last is None or now >= last + timedelta(seconds=tuning.resync_interval_seconds)


def resync_read(state: OrgBillingState) -> FetchSubscriptionInput | None:
    """What a re-sync re-reads from Stripe: the subscription, else the customer's live one.

    None when the org knows neither yet (still provisioning, or never billed).
    """
    if not (state.stripe_subscription_id or state.stripe_customer_id):
        return None
    return FetchSubscriptionInput(
        subscription_id=state.stripe_subscription_id, customer_id=state.stripe_customer_id
    )


# Usage schedule -----------------------------------------------------------------


def billable_period(state: OrgBillingState) -> tuple[datetime, datetime] | None:
    """The current period if Stripe bills usage for it, else None.

    Only a subscription in a usage status, with a customer to report for and a
    known period, is owed usage reports.
    """
    start, end = state.current_period_start, state.current_period_end
    if (
        state.subscription_status in USAGE_STATUSES
        and state.stripe_customer_id is not None
        and start is not None
        and end is not None
    ):
        return start, end
    return None


def current_period(state: OrgBillingState) -> tuple[datetime, datetime]:
    """The current period of a state `billable_period` accepted."""
    period = billable_period(state)
    assert period is not None, "no billable period"
    return period


def usage_entry(state: OrgBillingState, start: datetime) -> UsagePeriodReport | None:
    """The report kept for the period starting at `start`, if any."""
    return next((u for u in state.usage if u.period_start == start), None)


def needs_pre_end_report(
    state: OrgBillingState, tuning: OrgBillingTuning, start: datetime, end: datetime
) -> bool:
    """A period is reported once within the lead before its end (and again if that was earlier).

    The pre-end report lets Stripe's invoice include the period's usage; one
    made before the lead window started does not count, usage has grown since.
    """
    entry = usage_entry(state, start)
    lead = timedelta(seconds=tuning.usage_lead_seconds)
    return entry is None or entry.last_reported_at is None or entry.last_reported_at < end - lead


def usage_quiet(state: OrgBillingState, now: datetime) -> bool:
    """After Stripe refused a usage report, usage work waits until `usage_retry_after`.

    So a refusal is retried later instead of spinning.
    """
    retry_after = state.usage_retry_after
    return retry_after is not None and now < retry_after


class UsageStep(Enum):
    """What the usage schedule asks for at one wake (ended periods come after it)."""

    QUIET = "quiet"  # a refused report holds all usage work back, ended periods too
    RESYNC = "resync"  # the period ended over a grace ago: re-read Stripe to see the renewal
    REPORT = "report"  # within the lead before the end: the pre-end report is due
    NONE = "none"  # nothing for the current period


def usage_step(state: OrgBillingState, tuning: OrgBillingTuning, now: datetime) -> UsageStep:
    """Decide the current period's usage work at `now`.

    Past the period's end plus the grace, Stripe has renewed: a re-read shows the
    new period and queues the old one's final report (see `ended_periods`).
    Within the lead before the end, the period is reported once before Stripe
    invoices it.
    """
    if usage_quiet(state, now):
        return UsageStep.QUIET
    period = billable_period(state)
    if period is None:
        return UsageStep.NONE
    start, end = period
    if now >= end + timedelta(seconds=tuning.usage_grace_seconds):
        return UsageStep.RESYNC
    lead = timedelta(seconds=tuning.usage_lead_seconds)
    if now >= end - lead and needs_pre_end_report(state, tuning, start, end):
        return UsageStep.REPORT
    return UsageStep.NONE


def renewal_unseen(state: OrgBillingState, start: datetime) -> bool:
    """After an overdue re-read: Stripe still shows the period starting at `start`.

    Then nothing was queued and the usage work waits `RENEWAL_RECHECK` instead of
    re-reading at every wake.
    """
    return state.current_period_start == start and not state.to_finalize


def next_wake(state: OrgBillingState, tuning: OrgBillingTuning, now: datetime) -> timedelta:
    """How long the run loop sleeps when no signal wakes it.

    It wakes for the daily re-sync, the start of the lead window, a pre-end
    report still owed, the period's end plus the grace, ended periods owed a
    final report, and failed events due for a retry. After a refused usage
    report, usage wakes wait for `usage_retry_after`; the daily re-sync and the
    event retries do not. Never less than a second.
    """
    candidates: list[datetime] = []
    if state.last_synced_at is not None:
        candidates.append(state.last_synced_at + timedelta(seconds=tuning.resync_interval_seconds))
    period = billable_period(state)
    if period is not None:
        start, end = period
        lead = timedelta(seconds=tuning.usage_lead_seconds)
        grace = timedelta(seconds=tuning.usage_grace_seconds)
        if now < end - lead:
            candidates.append(end - lead)
        elif needs_pre_end_report(state, tuning, start, end):
            candidates.append(now)
        candidates.append(end + grace)
    if state.to_finalize:
        candidates.append(now)
    retry_after = state.usage_retry_after
    if retry_after is not None and retry_after > now:
        resync_at = candidates[0] if state.last_synced_at is not None else None
        candidates = [max(c, retry_after) for c in candidates]
        if resync_at is not None:
            candidates.append(resync_at)
    # Failed events are retried on their own schedule, whatever holds usage back.
    candidates.extend(f.retry_at for f in state.failed_events)
    if not candidates:
        return timedelta(seconds=tuning.resync_interval_seconds)
    return max(min(candidates) - now, timedelta(seconds=1))


def ended_periods(state: OrgBillingState, snapshot: SubscriptionSnapshot) -> list[BillingPeriod]:
    """The periods a fresh read of the same subscription shows to be over, not yet queued.

    Each is owed a final usage report. A renewal ends the old period; a trial
    ended early (or a reset anchor) cuts it short, and periods a worker outage
    skipped over entirely come after it, stepped on the billing anchor day. A
    cancel (or pause) without renewal ends it at the subscription's end, since
    Stripe bills usage up to there. Nothing is owed unless the state was in a
    usage status with a known period.
    """
    old_start, old_end = state.current_period_start, state.current_period_end
    if old_start is None or old_end is None or state.subscription_status not in USAGE_STATUSES:
        return []
    owed: list[tuple[datetime, datetime]] = []
    new_start = snapshot.current_period_start
    if new_start is not None and new_start > old_start:
        owed.append((old_start, min(old_end, new_start)))
        if new_start > old_end:
            anchor = snapshot.billing_cycle_anchor
            anchor_day = anchor.day if anchor else max(old_end.day, new_start.day)
            owed.extend(periods_between(old_end, new_start, anchor_day))
    elif snapshot.status not in USAGE_STATUSES:
        ended = min(old_end, snapshot.subscription_end or old_end)
        if ended > old_start:
            owed.append((old_start, ended))
    queued = {p.start for p in state.to_finalize}
    periods: list[BillingPeriod] = []
    for start, end in owed:
        if start not in queued:
            queued.add(start)
            periods.append(BillingPeriod(start=start, end=end))
    return periods


def record_usage_report(
    state: OrgBillingState,
    start: datetime,
    end: datetime,
    plan: UsagePlan,
    sent: int,
    now: datetime,
) -> UsagePeriodReport:
    """Changes the state: keep what a report sent for the period; returns a copy of its entry.

    Only the last `KEPT_USAGE_PERIODS` periods are kept, so the state (carried
    across continue-as-new) stays small.
    """
    entry = usage_entry(state, start)
    if entry is None:
        entry = UsagePeriodReport(period_start=start, period_end=end)
        state.usage.append(entry)
        del state.usage[: max(0, len(state.usage) - KEPT_USAGE_PERIODS)]
    entry.users = plan.users
    entry.requests = plan.requests
    entry.meter_events_sent += sent
    entry.skipped_reason = plan.skipped_reason or entry.skipped_reason
    entry.last_reported_at = now
    return entry.model_copy()


def backoff(attempts: int, initial_seconds: int, max_seconds: int) -> timedelta:
    """The wait before retry number `attempts` (1 for the first): doubling, capped."""
    exponent = min(max(attempts, 1) - 1, 32)
    return timedelta(seconds=min(initial_seconds * 2**exponent, max_seconds))


def usage_refused(
    state: OrgBillingState, kind: str | None, tuning: OrgBillingTuning, now: datetime
) -> timedelta:
    """Changes the state: Stripe refused usage work; retry it soon, and say why.

    Time does not fix a revoked key or a missing meter, but a person does, and
    the period's invoice finalizes about an hour after its end: the work is
    retried on a short backoff (never paused for hours) while the problem shows
    in the state and in `BillingProblem`. Returns the wait.
    """
    state.usage_failures += 1
    state.usage_problem = (
        BillingProblem.STRIPE_AUTH
        if kind in STRIPE_AUTH_ERRORS
        else BillingProblem.USAGE_REPORT_FAILING
    )
    wait = backoff(
        state.usage_failures, tuning.usage_retry_initial_seconds, tuning.usage_retry_max_seconds
    )
    state.usage_retry_after = now + wait
    return wait


def usage_recovered(state: OrgBillingState, error_prefix: str) -> bool:
    """Changes the state: usage work went through; forget its failures.

    The kept error is cleared too when it was usage's (it starts with
    `error_prefix`). Returns whether there was anything to forget.
    """
    if not state.usage_failures and state.usage_problem is None:
        return False
    state.usage_failures = 0
    state.usage_problem = None
    state.usage_retry_after = None
    if state.last_error and state.last_error.startswith(error_prefix):
        state.last_error = None
    return True


def same_period(state: OrgBillingState, start: datetime, end: datetime) -> bool:
    """After a re-read: Stripe confirms the period starting at `start` and ending at `end`.

    A trial ended early, a cancel, a pause or a reset anchor change it; then the
    report meant for it is not made (the period that ended is queued for its
    final report instead).
    """
    return billable_period(state) == (start, end)


# Stripe events --------------------------------------------------------------------


@dataclass(frozen=True)
class EventPlan:
    """How one Stripe event is handled, decided before anything is read from Stripe."""

    # The watermark the event is ordered by: its subscription, else its customer.
    key: str
    # An event older than the newest applied one for its key changes nothing.
    stale: bool
    # A stale "trial will end" notice of the org's own subscription still counts.
    late_trial_notice: bool
    # What to re-read from Stripe; None when the event names nothing to read.
    fetch: FetchSubscriptionInput | None


def plan_event(state: OrgBillingState, event: StripeEventSignal) -> EventPlan:
    """Key, staleness and the re-read of an event.

    Events are only hints: the workflow re-reads the subscription they name
    (by id, else the customer's live one). Stripe delivers out of order, so
    each key keeps the `created` of the newest event applied and older ones
    are skipped.
    """
    sub_id = event.subscription_id
    if sub_id is None and event.type.startswith("customer.subscription."):
        sub_id = event.object_id
    key = sub_id or event.customer_id or state.stripe_customer_id or "org"
    stale = event.created < state.watermarks.get(key, 0)
    customer_id = None if sub_id else (event.customer_id or state.stripe_customer_id)
    fetch = (
        None
        if sub_id is None and customer_id is None
        else FetchSubscriptionInput(subscription_id=sub_id, customer_id=customer_id)
    )
    return EventPlan(
        key=key,
        stale=stale,
        late_trial_notice=(
            stale and event.type == TRIAL_WILL_END and sub_id == state.stripe_subscription_id
        ),
        fetch=fetch,
    )


def advance_watermark(
    state: OrgBillingState, key: str, created: int, cap: int | None = None
) -> None:
    """Changes the state: an applied event moves its key's watermark forward, never back.

    With a `cap` (see `watermark_cap`) the watermark never passes it, whatever
    the event's `created` says.
    """
    value = max(created, state.watermarks.get(key, 0))
    state.watermarks[key] = value if cap is None else min(value, cap)


def watermark_cap(snapshot: SubscriptionSnapshot, now: datetime) -> int:
    """The latest time a watermark may say after reading `snapshot`, in Unix seconds.

    A signed test-mode event may be dated in a test clock's simulated future, or
    anywhere: its `created` must not make every later real event look stale. No
    real event is newer than Stripe's own clock at the read: the test clock's
    time for an object on one (which may lag the wall clock or run ahead of
    it), else the time of the read. A read recorded without it falls back to
    now or the object's current period start, whichever is later. A cap a
    little low only costs a re-read of a redelivered event.
    """
    if snapshot.read_at is not None:
        return int(snapshot.read_at.timestamp())
    moments = [now]
    if snapshot.current_period_start is not None:
        moments.append(snapshot.current_period_start)
    return int(max(moments).timestamp())


def cap_watermarks(state: OrgBillingState, keys: list[str], cap: int) -> None:
    """Changes the state: a fresh read brings watermarks past `cap` back to it.

    So one written before the cap existed heals at the next re-sync.
    """
    for key in keys:
        if state.watermarks.get(key, 0) > cap:
            state.watermarks[key] = cap


def event_failed(
    state: OrgBillingState,
    event: StripeEventSignal,
    key: str,
    error: str,
    tuning: OrgBillingTuning,
    now: datetime,
) -> StripeEventSignal | None:
    """Changes the state: keep a failed event for a retry with backoff; it stays unseen.

    One failed event is kept per watermark key, the newest: its re-read covers
    the older one, which is returned (to be marked seen) when it is replaced.
    """
    existing = next((f for f in state.failed_events if f.key == key), None)
    attempts, covered = 1, None
    if existing is not None:
        state.failed_events.remove(existing)
        attempts = existing.attempts + 1
        if existing.event.event_id != event.event_id:
            if existing.event.created > event.created:
                event, covered = existing.event, event
            else:
                covered = existing.event
    wait = backoff(attempts, tuning.event_retry_initial_seconds, tuning.event_retry_max_seconds)
    state.failed_events.append(
        FailedEvent(event=event, key=key, attempts=attempts, retry_at=now + wait, error=error)
    )
    return covered


def due_failed_event(state: OrgBillingState, now: datetime) -> FailedEvent | None:
    """The failed event due for a retry first, if any (it stays kept until it goes through)."""
    due = [f for f in state.failed_events if f.retry_at <= now]
    return min(due, key=lambda f: f.retry_at) if due else None


def next_event_retry(state: OrgBillingState, now: datetime) -> timedelta | None:
    """How long until the next failed event is due (never less than a second), if any."""
    if not state.failed_events:
        return None
    first = min(f.retry_at for f in state.failed_events)
    return max(first - now, timedelta(seconds=1))


def event_resolved_by_id(state: OrgBillingState, event_id: str) -> None:
    """Changes the state: a kept failed event turned out to be seen already; drop it."""
    state.failed_events = [f for f in state.failed_events if f.event.event_id != event_id]


def event_resolved(state: OrgBillingState, key: str) -> list[StripeEventSignal]:
    """Changes the state: an event of `key` went through; failed ones of the key are covered.

    Returns them, to be marked seen.
    """
    covered = [f.event for f in state.failed_events if f.key == key]
    state.failed_events = [f for f in state.failed_events if f.key != key]
    return covered


def remember(state: OrgBillingState, event: StripeEventSignal, limit: int) -> None:
    """Changes the state: keep the event id for dedupe, bounded to the newest `limit`.

    Stripe redelivers for days; the bound keeps the state small, and the
    watermarks catch the redeliveries older than it.
    """
    seen = state.seen_event_ids
    seen.append(event.event_id)
    del seen[: max(0, len(seen) - limit)]
    state.last_event_id = event.event_id
    state.last_event_type = event.type


def note_trial_will_end(state: OrgBillingState, trial_end: datetime | None) -> datetime | None:
    """Changes the state: note a trial end once, however often Stripe redelivers the notice.

    Returns the trial end if it is newly noted (the hook for a notice), else None.
    """
    if trial_end is None or state.trial_will_end_noted_for == trial_end:
        return None
    state.trial_will_end_noted_for = trial_end
    return trial_end


# Adopting a Stripe read -------------------------------------------------------------


class Refusal(Enum):
    """Why a fresh Stripe read is not applied to the org."""

    # The subscription belongs to another customer: never another org's, whatever
    # an event's metadata said.
    FOREIGN_CUSTOMER = "foreign customer"
    # Another subscription of the org, while ours still bills (or the other is dead).
    OTHER_SUBSCRIPTION = "other subscription"
    # The org is billed through a marketplace: Stripe never bills it as well.
    NOT_BILLED = "not billed through Stripe"
    # The org has no customer yet: only provisioning finds or makes the org's own.
    NO_CUSTOMER = "no customer of its own"


# Refusals of something that is not provably the org's: recorded, never applied.
ADOPTION_REFUSALS = frozenset({Refusal.FOREIGN_CUSTOMER, Refusal.NOT_BILLED, Refusal.NO_CUSTOMER})
# How many refused adoptions the state keeps (the `stripe_events` log keeps all).
KEPT_REFUSALS = 10


def refusal(
    state: OrgBillingState, snapshot: SubscriptionSnapshot, *, provable: bool = True
) -> Refusal | None:
    """Whether a snapshot may be applied; None means yes.

    Only what is provably the org's is linked to it: a subscription of the
    customer the org already has (provisioning finds or makes that customer by
    `org_uid` and `source`). An event's metadata proves nothing (anyone can
    type an org id in the dashboard), so an org without a customer, or billed
    through a marketplace (whatever its status, e.g. while its own subscription
    runs to its period end), is never handed a subscription by an event. A
    different subscription of the org's own customer replaces ours only when
    ours no longer bills and the new one does (made elsewhere, e.g. after a
    cancel); otherwise the org keeps the one it has.

    `provable=False` is the rule of runs recorded before it (the patch
    `provable-adoption`), which linked the first subscription any read named.
    """
    if state.stripe_customer_id and snapshot.customer_id != state.stripe_customer_id:
        return Refusal.FOREIGN_CUSTOMER
    if provable and snapshot.id != state.stripe_subscription_id:
        if state.status is BillingStatus.NOT_BILLED or state.billed_elsewhere:
            return Refusal.NOT_BILLED
        if not state.stripe_customer_id:
            return Refusal.NO_CUSTOMER
    if state.stripe_subscription_id and snapshot.id != state.stripe_subscription_id:
        current_live = state.subscription_status in LIVE_SUBSCRIPTION_STATUSES
        if current_live or snapshot.status not in LIVE_SUBSCRIPTION_STATUSES:
            return Refusal.OTHER_SUBSCRIPTION
    return None


def foreign_customer_error(state: OrgBillingState, snapshot: SubscriptionSnapshot) -> str:
    """The error kept in the state when a read names another customer's subscription."""
    return (
        f"subscription {snapshot.id} belongs to customer {snapshot.customer_id}, "
        f"not to this org's {state.stripe_customer_id}; ignored"
    )


def refusal_reason(refused: Refusal, state: OrgBillingState, snapshot: SubscriptionSnapshot) -> str:
    """One sentence for the log and the state: what was not linked, and why."""
    if refused is Refusal.FOREIGN_CUSTOMER:
        return foreign_customer_error(state, snapshot)
    named = f"subscription {snapshot.id} of customer {snapshot.customer_id}"
    if refused is Refusal.NOT_BILLED:
        return f"{named} not linked: the org is billed through a marketplace"
    if refused is Refusal.NO_CUSTOMER:
        return (
            f"{named} not linked: the org has no customer yet, and only provisioning "
            "links one (found by org_uid and source)"
        )
    return f"{named} not linked: {refused.value}"


def note_refusal(state: OrgBillingState, refused: RefusedAdoption) -> None:
    """Changes the state: keep a refused adoption, bounded to the newest `KEPT_REFUSALS`."""
    kept = state.refused_adoptions
    kept.append(refused)
    del kept[: max(0, len(kept) - KEPT_REFUSALS)]


def adopt(state: OrgBillingState, snapshot: SubscriptionSnapshot) -> None:
    """Changes the state: it follows the snapshot (Stripe is the source of truth)."""
    state.stripe_subscription_id = snapshot.id
    state.stripe_customer_id = snapshot.customer_id
    state.subscription_status = snapshot.status
    state.subscription_end = snapshot.subscription_end
    state.trial_end = snapshot.trial_end
    state.current_period_start = snapshot.current_period_start
    state.current_period_end = snapshot.current_period_end
    state.pause_collection = snapshot.pause_collection
    state.status = BillingStatus.of(snapshot.status)


# Moving to a cloud marketplace ---------------------------------------------------------


def marketplace_cancel(
    state: OrgBillingState, snapshot: SubscriptionSnapshot, billed_elsewhere: bool
) -> bool | None:
    """After a re-read: whether to ask Stripe to end the subscription at its period end.

    True when the org is now billed through AWS or Azure while its own Stripe
    subscription still bills past the current period: it ends at the period's
    end, whose usage gets its final report as for any cancel, so the org is
    never billed in two places. False when the org left the marketplace again
    before that end and the cancel was ours: Stripe billing goes on. None:
    nothing to change.
    """
    if snapshot.id != state.stripe_subscription_id:
        return None
    if snapshot.status not in LIVE_SUBSCRIPTION_STATUSES:
        return None
    period_end = snapshot.current_period_end
    if billed_elsewhere:
        ends_in_time = snapshot.cancel_at is not None and (
            period_end is None or snapshot.cancel_at <= period_end
        )
        return None if ends_in_time else True
    if state.marketplace_cancel_of == snapshot.id and snapshot.cancel_at is not None:
        return False
    return None


def marketplace_end_seen(state: OrgBillingState, snapshot: SubscriptionSnapshot) -> bool:
    """After applying a read: the org's own subscription has ended, and the org may be
    billed through a marketplace (it was when last read, or we ended it for that).

    Then the org row is read again: still billed elsewhere, the org is
    `not_billed` (entitled, paid through AWS or Azure), not `canceled`.
    """
    return (
        snapshot.id == state.stripe_subscription_id
        and snapshot.status not in LIVE_SUBSCRIPTION_STATUSES
        and state.closed_at is None
        and (state.billed_elsewhere or state.marketplace_cancel_of == snapshot.id)
    )


def live_subscription_unfollowed(org: OrgProfile) -> bool:
    """At a `not_billed` org's re-sync: the org row still names a live Stripe
    subscription of ours (as the last read wrote it) while the org is billed
    elsewhere. Provisioning then follows it and ends it at its period end."""
    return (
        org.billed_elsewhere
        and org.stripe_subscription_id is not None
        and org.subscription_status in LIVE_SUBSCRIPTION_STATUSES
    )


def marketplace_left_after_end(
    state: OrgBillingState, snapshot: SubscriptionSnapshot, billed_elsewhere: bool
) -> bool:
    """At provisioning: the subscription the org row names has ended, and it was this
    workflow that ended it because the org moved to a marketplace, which the org has
    left since. Then a new subscription bills it (one the customer canceled is never
    replaced on our own)."""
    return (
        not billed_elsewhere
        and snapshot.status not in LIVE_SUBSCRIPTION_STATUSES
        and state.marketplace_cancel_of == snapshot.id
    )


# Problems ------------------------------------------------------------------------------


def billing_problem(state: OrgBillingState) -> BillingProblem | None:
    """What needs a person, the most pressing first; None when nothing does.

    Failing provisioning bills nothing; a refused usage report loses usage when
    the invoice finalizes; a failed event leaves the row behind Stripe; a
    failed payment waits on the customer (or support).
    """
    if state.status == BillingStatus.PROVISIONING_FAILED:
        return BillingProblem.PROVISIONING_FAILED
    if state.usage_problem is not None:
        return state.usage_problem
    if state.failed_events:
        return BillingProblem.EVENT_FAILED
    if state.status in (BillingStatus.PAST_DUE, BillingStatus.UNPAID):
        return BillingProblem.PAYMENT_FAILED
    return None


def provisioning_refused(state: OrgBillingState) -> bool:
    """Provisioning stopped on a refused adoption (the row's customer is not the org's).

    The refusal it stopped on is the newest, made while provisioning (no
    subscription, no event), and its reason is the error kept.
    """
    if state.status != BillingStatus.PROVISIONING_FAILED or not state.refused_adoptions:
        return False
    last = state.refused_adoptions[-1]
    return (
        last.subscription_id is None and last.event_id is None and last.reason == state.last_error
    )


# Search attributes ------------------------------------------------------------------


def wanted_attributes(
    state: OrgBillingState, problem: BillingProblem | None = None
) -> dict[str, str]:
    """The search attributes the org's workflow should show (the customer once known).

    `BillingProblem` only while there is one. The workflow upserts only when
    this changes, so a run does not fill its history with identical upserts.
    """
    wanted = {
        ORG_ID_KEY.name: str(state.org_id),
        BILLING_STATUS_KEY.name: state.status.value,
    }
    if state.stripe_customer_id:
        wanted[STRIPE_CUSTOMER_ID_KEY.name] = state.stripe_customer_id
    if problem is not None:
        wanted[BILLING_PROBLEM_KEY.name] = problem.value
    return wanted


def attribute_updates(
    wanted: dict[str, str], shown: dict[str, str] | None = None
) -> list[SearchAttributeUpdate[str]]:
    """The upsert that sets `wanted` over what is `shown`: every key, in the order the
    saved histories have, and `BillingProblem` unset once it is solved."""
    updates = [
        ORG_ID_KEY.value_set(wanted[ORG_ID_KEY.name]),
        BILLING_STATUS_KEY.value_set(wanted[BILLING_STATUS_KEY.name]),
    ]
    if STRIPE_CUSTOMER_ID_KEY.name in wanted:
        updates.append(STRIPE_CUSTOMER_ID_KEY.value_set(wanted[STRIPE_CUSTOMER_ID_KEY.name]))
    if BILLING_PROBLEM_KEY.name in wanted:
        updates.append(BILLING_PROBLEM_KEY.value_set(wanted[BILLING_PROBLEM_KEY.name]))
    elif shown is not None and BILLING_PROBLEM_KEY.name in shown:
        updates.append(BILLING_PROBLEM_KEY.value_unset())
    return updates
