"""`OrgBilling`: the one writer of an org's billing state.

Signal handlers only queue; the run loop provisions, applies Stripe events (each
re-read from Stripe, deduplicated by id, ordered by a per-subscription
watermark), re-syncs daily, reports usage per billing period and continues as
new at each period and whenever Temporal suggests it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.db_activities import DbActivities
    from activities.models import (
        EnsureSubscriptionInput,
        FetchSubscriptionInput,
        PlanUsageInput,
        SaveCustomerInput,
        SaveSubscriptionInput,
    )
    from activities.stripe_activities import StripeActivities
    from billing.constants import (
        ORG_BILLING_WORKFLOW,
        RECONCILE_UPDATE,
        REPORT_USAGE_UPDATE,
        RESYNC_SIGNAL,
        RETRY_PROVISIONING_SIGNAL,
        STATE_QUERY,
        STRIPE_EVENT_SIGNAL,
    )
    from billing.domain import (
        LIVE_SUBSCRIPTION_STATUSES,
        BillingPeriod,
        BillingStatus,
        FieldDifference,
        OrgBillingInput,
        OrgBillingState,
        ReconcileResult,
        StripeEventSignal,
        SubscriptionSnapshot,
        SubscriptionStatus,
        UsagePeriodReport,
        UsageReportResult,
    )
    from billing.periods import periods_between
    from billing.search_attributes import BILLING_STATUS_KEY, ORG_ID_KEY, STRIPE_CUSTOMER_ID_KEY

from workflows.calls import (
    Refused,
    db_activity,
    send_meter_events,
    stripe_activity,
    unless_refused,
)

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
# Patch ids (workflow.patched): runs recorded before a change keep replaying.
NOT_BILLED_RECHECK = "not-billed-recheck"


@workflow.defn(name=ORG_BILLING_WORKFLOW)
class OrgBillingWorkflow:
    @workflow.init
    def __init__(self, input: OrgBillingInput) -> None:
        self._tuning = input.tuning
        self._state = input.state or OrgBillingState(org_id=input.org_id)
        self._pending: deque[StripeEventSignal] = deque(input.pending_events)
        self._retry_requested = input.retry_requested
        self._resync_requested = input.resync_requested
        self._lock = asyncio.Lock()
        self._period_rolled = False
        self._last_attributes: dict[str, str] = {}

    # Handlers: record only, the run loop acts. --------------------------------

    @workflow.signal(name=STRIPE_EVENT_SIGNAL)
    def on_stripe_event(self, event: StripeEventSignal) -> None:
        self._pending.append(event)

    @workflow.signal(name=RETRY_PROVISIONING_SIGNAL)
    def on_retry_provisioning(self) -> None:
        self._retry_requested = True

    @workflow.signal(name=RESYNC_SIGNAL)
    def on_resync(self) -> None:
        self._resync_requested = True

    @workflow.query(name=STATE_QUERY)
    def state(self) -> OrgBillingState:
        return self._state

    @workflow.update(name=RECONCILE_UPDATE)
    async def reconcile(self) -> ReconcileResult:
        """Re-read from Stripe now and say what differed."""
        async with self._lock:
            diffs = await self._resync()
        return ReconcileResult(
            org_id=self._state.org_id, differences=diffs, status=self._state.status
        )

    @workflow.update(name=REPORT_USAGE_UPDATE)
    async def report_usage(self) -> UsageReportResult:
        """Report the current period's usage not yet reported, now."""
        async with self._lock:
            if not self._billable():
                return UsageReportResult(
                    org_id=self._state.org_id,
                    skipped_reason=f"nothing to report: billing status is {self._state.status}",
                )
            start, end = self._current_period()
            report, sent = await self._report_period(start, end, workflow.now())
        return UsageReportResult(
            org_id=self._state.org_id,
            periods=[report],
            meter_events_sent=sent,
            skipped_reason=report.skipped_reason,
        )

    # Main loop ------------------------------------------------------------------

    @workflow.run
    async def run(self, input: OrgBillingInput) -> None:
        self._upsert_attributes()
        if self._state.status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED):
            await self._provision_until_done()
        while True:
            if self._should_continue_as_new():
                await self._continue_as_new()
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(self._has_work, timeout=self._next_wake())
            if self._retry_requested and self._state.status in (
                BillingStatus.NOT_BILLED,
                BillingStatus.PROVISIONING_FAILED,
            ):
                await self._provision_until_done()
            self._retry_requested = False
            async with self._lock:
                await self._drain_events()
                if self._resync_requested or self._resync_due():
                    self._resync_requested = False
                    await self._kept_alive("re-sync", self._resync())
                await self._kept_alive("usage report", self._usage_due_work(), usage=True)

    def _has_work(self) -> bool:
        """What wakes the loop before its timer (signals, and periods an update found)."""
        return (
            (bool(self._pending) and not self._history_too_long())
            or self._resync_requested
            or self._retry_requested
            or (bool(self._state.to_finalize) and not self._usage_quiet())
        )

    async def _continue_as_new(self) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            OrgBillingInput(
                org_id=self._state.org_id,
                state=self._state,
                pending_events=list(self._pending),
                retry_requested=self._retry_requested,
                resync_requested=self._resync_requested,
                tuning=self._tuning,
            )
        )

    async def _kept_alive(self, step: str, work: Awaitable[object], *, usage: bool = False) -> None:
        """An error retrying cannot fix is shown in the state, never fails the workflow.

        The org stays with its one writer; the next wake (or an operator's
        reconcile) tries again. A refused usage report pauses usage work for
        `failed_retry_seconds`, so nothing spins.
        """
        outcome = await unless_refused(work)
        if not isinstance(outcome, Refused):
            return
        self._state.last_error = f"{step}: {outcome.message}"
        if usage:
            self._state.usage_retry_after = workflow.now() + timedelta(
                seconds=self._tuning.failed_retry_seconds
            )
        workflow.logger.error(
            f"{step} failed", extra={"org_id": self._state.org_id, "error": outcome.message}
        )

    def _should_continue_as_new(self) -> bool:
        return self._period_rolled or self._history_too_long()

    def _history_too_long(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._tuning.max_history_events
        )

    # Provisioning ---------------------------------------------------------------

    async def _provision_until_done(self) -> None:
        while True:
            self._retry_requested = False
            async with self._lock:
                done = await self._provision_once()
            if done:
                return
            if await self._wait_for_provisioning_retry():
                return

    async def _wait_for_provisioning_retry(self) -> bool:
        """Wait for an operator (signal) or a fixed configuration (periodic retry).

        Events are applied meanwhile, one of them may link a subscription made
        elsewhere (then True: provisioned). They never trigger an attempt.
        """
        retry_at = workflow.now() + timedelta(seconds=self._tuning.failed_retry_seconds)
        while True:
            if self._history_too_long():
                await self._continue_as_new()
            remaining = retry_at - workflow.now()
            if remaining <= timedelta(0):
                return False
            try:
                await workflow.wait_condition(
                    lambda: (
                        self._retry_requested
                        or (bool(self._pending) and not self._history_too_long())
                    ),
                    timeout=remaining,
                )
            except TimeoutError:
                return False
            if self._retry_requested:
                return False
            async with self._lock:
                await self._drain_events()
            if self._state.stripe_subscription_id:
                return True

    async def _provision_once(self) -> bool:
        """One attempt; False (with the error kept in state) if retrying cannot help."""
        self._set_status(BillingStatus.PROVISIONING)
        outcome = await unless_refused(self._provision())
        if not isinstance(outcome, Refused):
            return True
        self._state.last_error = outcome.message
        self._set_status(BillingStatus.PROVISIONING_FAILED)
        workflow.logger.error(
            "provisioning failed",
            extra={"org_id": self._state.org_id, "error": outcome.message},
        )
        return False

    async def _provision(self) -> None:
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        if org.billed_elsewhere:
            self._state.last_error = None
            self._set_status(BillingStatus.NOT_BILLED)
            return
        customer_id = org.stripe_customer_id
        if not customer_id:
            customer_id = await stripe_activity(StripeActivities.ensure_customer, org)
            await db_activity(
                DbActivities.save_customer,
                SaveCustomerInput(org_id=org.org_id, customer_id=customer_id),
            )
        self._state.stripe_customer_id = customer_id
        self._upsert_attributes()
        snapshot: SubscriptionSnapshot | None = None
        if org.stripe_subscription_id:
            # Billed before (a fresh run after a reset): follow Stripe, and never
            # subscribe an org that canceled again on our own.
            snapshot = await stripe_activity(
                StripeActivities.fetch_subscription,
                FetchSubscriptionInput(
                    subscription_id=org.stripe_subscription_id, customer_id=customer_id
                ),
            )
        if snapshot is None:
            snapshot = await stripe_activity(
                StripeActivities.ensure_subscription,
                EnsureSubscriptionInput(customer_id=customer_id, org=org),
            )
        await self._apply(snapshot, adopt=True)
        self._state.last_error = None
        workflow.logger.info(
            "org provisioned", extra={"org_id": org.org_id, "subscription_id": snapshot.id}
        )

    # Events and re-sync ---------------------------------------------------------

    async def _drain_events(self) -> None:
        # Stop early when the history is long: the rest is carried into the next run.
        while self._pending and not self._history_too_long():
            event = self._pending.popleft()
            if event.event_id in self._state.seen_event_ids:
                continue
            outcome = await unless_refused(self._apply_event(event))
            if isinstance(outcome, Refused):
                # E.g. the subscription was deleted from Stripe: keep the error visible.
                self._state.last_error = f"event {event.event_id}: {outcome.message}"
            self._remember(event)

    def _remember(self, event: StripeEventSignal) -> None:
        seen = self._state.seen_event_ids
        seen.append(event.event_id)
        del seen[: max(0, len(seen) - self._tuning.seen_events_limit)]
        self._state.last_event_id = event.event_id
        self._state.last_event_type = event.type

    async def _apply_event(self, event: StripeEventSignal) -> None:
        sub_id = event.subscription_id
        if sub_id is None and event.type.startswith("customer.subscription."):
            sub_id = event.object_id
        key = sub_id or event.customer_id or self._state.stripe_customer_id or "org"
        if event.created < self._state.watermarks.get(key, 0):
            workflow.logger.info(
                "stale event skipped",
                extra={"org_id": self._state.org_id, "event_id": event.event_id},
            )
            # A late notice still counts: the newer state it lost to has the trial end.
            if event.type == TRIAL_WILL_END and sub_id == self._state.stripe_subscription_id:
                self._note_trial_will_end(self._state.trial_end)
            return
        fetch = FetchSubscriptionInput(
            subscription_id=sub_id,
            customer_id=None if sub_id else (event.customer_id or self._state.stripe_customer_id),
        )
        if fetch.subscription_id is None and fetch.customer_id is None:
            return
        snapshot = await stripe_activity(StripeActivities.fetch_subscription, fetch)
        if snapshot is None:
            return
        await self._apply(snapshot, adopt=True)
        self._state.watermarks[key] = max(event.created, self._state.watermarks.get(key, 0))
        if event.type == TRIAL_WILL_END:
            self._note_trial_will_end(snapshot.trial_end)

    def _note_trial_will_end(self, trial_end: datetime | None) -> None:
        """Once per trial end, however often Stripe redelivers: the hook for a notice."""
        if trial_end is None or self._state.trial_will_end_noted_for == trial_end:
            return
        self._state.trial_will_end_noted_for = trial_end
        workflow.logger.info(
            "trial ends soon",
            extra={"org_id": self._state.org_id, "trial_end": trial_end.isoformat()},
        )

    async def _resync(self) -> list[FieldDifference]:
        """Daily (and on demand): heal whatever a lost webhook left behind."""
        self._state.last_synced_at = workflow.now()
        if self._state.status == BillingStatus.NOT_BILLED:
            if workflow.patched(NOT_BILLED_RECHECK):
                # Marketplace billing removed from the org: bill it through Stripe.
                org = await db_activity(DbActivities.load_org, self._state.org_id)
                if not org.billed_elsewhere:
                    self._retry_requested = True
            return []
        if not (self._state.stripe_subscription_id or self._state.stripe_customer_id):
            return []
        snapshot = await stripe_activity(
            StripeActivities.fetch_subscription,
            FetchSubscriptionInput(
                subscription_id=self._state.stripe_subscription_id,
                customer_id=self._state.stripe_customer_id,
            ),
        )
        if snapshot is None:
            return []
        return await self._apply(snapshot, adopt=True)

    def _resync_due(self) -> bool:
        last = self._state.last_synced_at
        interval = timedelta(seconds=self._tuning.resync_interval_seconds)
        return last is None or workflow.now() >= last + interval

    async def _apply(self, snapshot: SubscriptionSnapshot, *, adopt: bool) -> list[FieldDifference]:
        """Write a fresh Stripe read to the org row and the state."""
        state = self._state
        if state.stripe_customer_id and snapshot.customer_id != state.stripe_customer_id:
            # Never another org's subscription, whatever an event's metadata said.
            state.last_error = (
                f"subscription {snapshot.id} belongs to customer {snapshot.customer_id}, "
                f"not to this org's {state.stripe_customer_id}; ignored"
            )
            workflow.logger.warning(state.last_error, extra={"org_id": state.org_id})
            return []
        if state.stripe_subscription_id and snapshot.id != state.stripe_subscription_id:
            current_live = state.subscription_status in LIVE_SUBSCRIPTION_STATUSES
            if current_live or snapshot.status not in LIVE_SUBSCRIPTION_STATUSES or not adopt:
                workflow.logger.warning(
                    "ignoring another subscription of the org",
                    extra={"org_id": state.org_id, "subscription_id": snapshot.id},
                )
                return []
        diffs = await db_activity(
            DbActivities.save_subscription,
            SaveSubscriptionInput(org_id=state.org_id, subscription=snapshot),
        )
        if snapshot.id == state.stripe_subscription_id:
            self._queue_ended_periods(snapshot)
        state.stripe_subscription_id = snapshot.id
        state.stripe_customer_id = snapshot.customer_id
        state.subscription_status = snapshot.status
        state.subscription_end = snapshot.subscription_end
        state.trial_end = snapshot.trial_end
        state.current_period_start = snapshot.current_period_start
        state.current_period_end = snapshot.current_period_end
        state.pause_collection = snapshot.pause_collection
        self._set_status(BillingStatus.of(snapshot.status))
        return diffs

    def _queue_ended_periods(self, snapshot: SubscriptionSnapshot) -> None:
        """Periods this fresh read shows to be over are owed a final usage report."""
        state = self._state
        old_start, old_end = state.current_period_start, state.current_period_end
        if old_start is None or old_end is None or state.subscription_status not in USAGE_STATUSES:
            return
        new_start = snapshot.current_period_start
        if new_start is not None and new_start > old_start:
            # Renewed. A trial ended early (or a reset anchor) cuts the old period short;
            # periods a worker outage skipped over entirely come after it.
            self._queue_final_report(old_start, min(old_end, new_start))
            if new_start > old_end:
                anchor = snapshot.billing_cycle_anchor
                anchor_day = anchor.day if anchor else max(old_end.day, new_start.day)
                for start, end in periods_between(old_end, new_start, anchor_day):
                    self._queue_final_report(start, end)
        elif snapshot.status not in USAGE_STATUSES:
            # Canceled (or paused) without a renewal: Stripe bills usage up to the end.
            ended = min(old_end, snapshot.subscription_end or old_end)
            if ended > old_start:
                self._queue_final_report(old_start, ended)

    def _queue_final_report(self, start: datetime, end: datetime) -> None:
        if all(p.start != start for p in self._state.to_finalize):
            self._state.to_finalize.append(BillingPeriod(start=start, end=end))

    # Usage ----------------------------------------------------------------------

    def _billable(self) -> bool:
        s = self._state
        return (
            s.subscription_status in USAGE_STATUSES
            and s.stripe_customer_id is not None
            and s.current_period_start is not None
            and s.current_period_end is not None
        )

    def _current_period(self) -> tuple[datetime, datetime]:
        start, end = self._state.current_period_start, self._state.current_period_end
        assert start is not None and end is not None
        return start, end

    def _usage_entry(self, start: datetime) -> UsagePeriodReport | None:
        return next((u for u in self._state.usage if u.period_start == start), None)

    async def _usage_due_work(self) -> None:
        now = workflow.now()
        if self._usage_quiet():
            return
        if self._billable():
            start, end = self._current_period()
            lead = timedelta(seconds=self._tuning.usage_lead_seconds)
            grace = timedelta(seconds=self._tuning.usage_grace_seconds)
            if now >= end + grace:
                # Stripe has renewed by now: the re-read shows the new period and
                # queues this one's final report below.
                await self._resync()
                if self._state.current_period_start == start and not self._state.to_finalize:
                    self._state.usage_retry_after = now + timedelta(minutes=10)  # not yet
            elif now >= end - lead and self._needs_pre_end_report(start, end):
                await self._report_period(start, end, now)
        # Ended periods, oldest first; one kept (and retried later) if Stripe refuses it.
        while self._state.to_finalize:
            period = self._state.to_finalize[0]
            await self._report_period(period.start, period.end, max(workflow.now(), period.end))
            self._state.to_finalize.pop(0)
            self._period_rolled = True

    def _needs_pre_end_report(self, start: datetime, end: datetime) -> bool:
        entry = self._usage_entry(start)
        lead = timedelta(seconds=self._tuning.usage_lead_seconds)
        return (
            entry is None or entry.last_reported_at is None or entry.last_reported_at < end - lead
        )

    def _usage_quiet(self) -> bool:
        retry_after = self._state.usage_retry_after
        return retry_after is not None and workflow.now() < retry_after

    def _next_wake(self) -> timedelta:
        now = workflow.now()
        candidates: list[datetime] = []
        if self._state.last_synced_at is not None:
            candidates.append(
                self._state.last_synced_at + timedelta(seconds=self._tuning.resync_interval_seconds)
            )
        if self._billable():
            start, end = self._current_period()
            lead = timedelta(seconds=self._tuning.usage_lead_seconds)
            grace = timedelta(seconds=self._tuning.usage_grace_seconds)
            if now < end - lead:
                candidates.append(end - lead)
            elif self._needs_pre_end_report(start, end):
                candidates.append(now)
            candidates.append(end + grace)
        if self._state.to_finalize:
            candidates.append(now)
        retry_after = self._state.usage_retry_after
        if retry_after is not None and retry_after > now:
            # After a usage report Stripe refused, usage waits; the daily re-sync does not.
            resync_at = candidates[0] if self._state.last_synced_at is not None else None
            candidates = [max(c, retry_after) for c in candidates]
            if resync_at is not None:
                candidates.append(resync_at)
        if not candidates:
            return timedelta(seconds=self._tuning.resync_interval_seconds)
        return max(min(candidates) - now, timedelta(seconds=1))

    async def _report_period(
        self, start: datetime, end: datetime, report_time: datetime
    ) -> tuple[UsagePeriodReport, int]:
        """Send what the period still owes Stripe; returns its report and how many were sent."""
        customer_id = self._state.stripe_customer_id
        assert customer_id is not None
        plan = await db_activity(
            DbActivities.plan_usage,
            PlanUsageInput(
                org_id=self._state.org_id,
                customer_id=customer_id,
                period_start=start,
                period_end=end,
                report_time=report_time,
            ),
        )
        sent = await send_meter_events(plan.events)
        entry = self._usage_entry(start)
        if entry is None:
            entry = UsagePeriodReport(period_start=start, period_end=end)
            self._state.usage.append(entry)
            del self._state.usage[: max(0, len(self._state.usage) - KEPT_USAGE_PERIODS)]
        entry.users = plan.users
        entry.requests = plan.requests
        entry.meter_events_sent += sent
        entry.skipped_reason = plan.skipped_reason or entry.skipped_reason
        entry.last_reported_at = workflow.now()
        workflow.logger.info(
            "usage reported",
            extra={
                "org_id": self._state.org_id,
                "period_start": start.isoformat(),
                "meter_events": sent,
            },
        )
        return entry.model_copy(), sent

    # Plumbing -------------------------------------------------------------------

    def _set_status(self, status: BillingStatus) -> None:
        self._state.status = status
        self._upsert_attributes()

    def _upsert_attributes(self) -> None:
        wanted = {
            ORG_ID_KEY.name: str(self._state.org_id),
            BILLING_STATUS_KEY.name: self._state.status.value,
        }
        if self._state.stripe_customer_id:
            wanted[STRIPE_CUSTOMER_ID_KEY.name] = self._state.stripe_customer_id
        if wanted == self._last_attributes:
            return
        updates = [
            ORG_ID_KEY.value_set(wanted[ORG_ID_KEY.name]),
            BILLING_STATUS_KEY.value_set(wanted[BILLING_STATUS_KEY.name]),
        ]
        if STRIPE_CUSTOMER_ID_KEY.name in wanted:
            updates.append(STRIPE_CUSTOMER_ID_KEY.value_set(wanted[STRIPE_CUSTOMER_ID_KEY.name]))
        workflow.upsert_search_attributes(updates)
        self._last_attributes = wanted
