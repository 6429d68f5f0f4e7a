"""`OrgBilling`: the one writer of an org's billing state.

Signal handlers only queue; the run loop provisions, applies Stripe events (each
re-read from Stripe, deduplicated by id, ordered by a per-subscription
watermark), re-syncs daily, reports usage per billing period and continues as
new at each period and whenever Temporal suggests it. What to do when is
decided in `workflows.decisions`; this class calls activities, waits and logs.
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
        AdoptionRefusalInput,
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
        BillingStatus,
        FieldDifference,
        OrgBillingInput,
        OrgBillingState,
        ReconcileResult,
        RefusedAdoption,
        StripeEventSignal,
        SubscriptionSnapshot,
        UsagePeriodReport,
        UsageReportResult,
    )

from workflows import decisions
from workflows.calls import (
    Refused,
    db_activity,
    send_meter_events,
    stripe_activity,
    unless_refused,
)
from workflows.decisions import TRIAL_WILL_END, Refusal, UsageStep

# Patch ids (workflow.patched): runs recorded before a change keep replaying.
NOT_BILLED_RECHECK = "not-billed-recheck"
# Only what is provably the org's is linked: provisioning checks (or finds, by
# org_uid and source) the customer; refused adoptions are recorded, not errors.
PROVABLE_ADOPTION = "provable-adoption"


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
            period = decisions.billable_period(self._state)
            if period is None:
                return UsageReportResult(
                    org_id=self._state.org_id,
                    skipped_reason=f"nothing to report: billing status is {self._state.status}",
                )
            report, sent = await self._report_period(*period, workflow.now())
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
        if decisions.provisioning_pending(self._state):
            await self._provision_until_done()
        while True:
            if self._period_rolled or self._history_too_long():
                await self._continue_as_new()
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    self._has_work,
                    timeout=decisions.next_wake(self._state, self._tuning, workflow.now()),
                )
            if self._retry_requested and decisions.retry_provisioning_allowed(self._state):
                await self._provision_until_done()
            self._retry_requested = False
            async with self._lock:
                await self._drain_events()
                if self._resync_requested or decisions.resync_due(
                    self._state, self._tuning, workflow.now()
                ):
                    self._resync_requested = False
                    await self._kept_alive("re-sync", self._resync())
                await self._kept_alive("usage report", self._usage_due_work(), usage=True)

    def _has_work(self) -> bool:
        """What wakes the loop before its timer (signals, and periods an update found)."""
        return (
            self._events_waiting()
            or self._resync_requested
            or self._retry_requested
            or (
                bool(self._state.to_finalize)
                and not decisions.usage_quiet(self._state, workflow.now())
            )
        )

    def _events_waiting(self) -> bool:
        """Events to apply in this run (a long run leaves them to the next one)."""
        return bool(self._pending) and not self._history_too_long()

    def _history_too_long(self) -> bool:
        info = workflow.info()
        return decisions.history_too_long(
            info.get_current_history_length(), info.is_continue_as_new_suggested(), self._tuning
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
                    lambda: self._retry_requested or self._events_waiting(), timeout=remaining
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

    async def _provision(self) -> Refused | None:
        """Customer, then subscription; a `Refused` when the row's customer is not the org's."""
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        if org.billed_elsewhere:
            self._state.last_error = None
            self._set_status(BillingStatus.NOT_BILLED)
            return None
        if workflow.patched(PROVABLE_ADOPTION):
            own = await stripe_activity(StripeActivities.own_customer, org)
            if own.customer_id is None:
                reason = own.refused or "no customer"
                await self._refuse_adoption(reason, customer_id=org.stripe_customer_id)
                return Refused(reason)
            customer_id = own.customer_id
            if customer_id != org.stripe_customer_id:
                await db_activity(
                    DbActivities.save_customer,
                    SaveCustomerInput(org_id=org.org_id, customer_id=customer_id),
                )
        else:
            customer_id = org.stripe_customer_id or ""
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
        await self._apply(snapshot)
        self._state.last_error = None
        workflow.logger.info(
            "org provisioned", extra={"org_id": org.org_id, "subscription_id": snapshot.id}
        )
        return None

    # Events and re-sync ---------------------------------------------------------

    async def _drain_events(self) -> None:
        # Stop early when the history is long: the rest is carried into the next run.
        while self._events_waiting():
            event = self._pending.popleft()
            if event.event_id in self._state.seen_event_ids:
                continue
            outcome = await unless_refused(self._apply_event(event))
            if isinstance(outcome, Refused):
                # E.g. the subscription was deleted from Stripe: keep the error visible.
                self._state.last_error = f"event {event.event_id}: {outcome.message}"
            decisions.remember(self._state, event, self._tuning.seen_events_limit)

    async def _apply_event(self, event: StripeEventSignal) -> None:
        plan = decisions.plan_event(self._state, event)
        if plan.stale:
            workflow.logger.info(
                "stale event skipped",
                extra={"org_id": self._state.org_id, "event_id": event.event_id},
            )
            if plan.late_trial_notice:
                self._note_trial_will_end(self._state.trial_end)
            return
        if plan.fetch is None:
            return
        snapshot = await stripe_activity(StripeActivities.fetch_subscription, plan.fetch)
        if snapshot is None:
            return
        await self._apply(snapshot, event)
        decisions.advance_watermark(self._state, plan.key, event.created)
        if event.type == TRIAL_WILL_END and snapshot.id == self._state.stripe_subscription_id:
            self._note_trial_will_end(snapshot.trial_end)

    def _note_trial_will_end(self, trial_end: datetime | None) -> None:
        """Once per trial end, however often Stripe redelivers: the hook for a notice."""
        noted = decisions.note_trial_will_end(self._state, trial_end)
        if noted is not None:
            workflow.logger.info(
                "trial ends soon",
                extra={"org_id": self._state.org_id, "trial_end": noted.isoformat()},
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
        read = decisions.resync_read(self._state)
        if read is None:
            return []
        snapshot = await stripe_activity(StripeActivities.fetch_subscription, read)
        if snapshot is None:
            return []
        return await self._apply(snapshot)

    async def _apply(
        self, snapshot: SubscriptionSnapshot, event: StripeEventSignal | None = None
    ) -> list[FieldDifference]:
        """Write a fresh Stripe read to the org row and the state (if it is the org's)."""
        state = self._state
        refusal = decisions.refusal(state, snapshot)
        if (
            refusal is not None
            and refusal in decisions.ADOPTION_REFUSALS
            and workflow.patched(PROVABLE_ADOPTION)
        ):
            await self._refuse_adoption(
                decisions.refusal_reason(refusal, state, snapshot),
                customer_id=snapshot.customer_id,
                subscription_id=snapshot.id,
                event=event,
            )
            return []
        # Runs recorded before PROVABLE_ADOPTION keep their rule.
        refusal = decisions.refusal(state, snapshot, provable=False)
        if refusal is Refusal.FOREIGN_CUSTOMER:
            state.last_error = decisions.foreign_customer_error(state, snapshot)
            workflow.logger.warning(state.last_error, extra={"org_id": state.org_id})
            return []
        if refusal is Refusal.OTHER_SUBSCRIPTION:
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
            state.to_finalize.extend(decisions.ended_periods(state, snapshot))
        decisions.adopt(state, snapshot)
        self._upsert_attributes()
        return diffs

    async def _refuse_adoption(
        self,
        reason: str,
        *,
        customer_id: str | None = None,
        subscription_id: str | None = None,
        event: StripeEventSignal | None = None,
    ) -> None:
        """Not linked, and said so: a line in the state and a `stripe_events` row.

        Not an error of the org's own billing, so `last_error` stays as it is.
        """
        refused = RefusedAdoption(
            at=workflow.now(),
            reason=reason,
            customer_id=customer_id,
            subscription_id=subscription_id,
            event_id=event.event_id if event else None,
        )
        decisions.note_refusal(self._state, refused)
        workflow.logger.warning(
            "adoption refused", extra={"org_id": self._state.org_id, "reason": reason}
        )
        await db_activity(
            DbActivities.record_adoption_refusal,
            AdoptionRefusalInput(
                org_id=self._state.org_id,
                refusal=refused,
                event_type=event.type if event else None,
                event_created=event.created if event else None,
            ),
        )

    # Usage ----------------------------------------------------------------------

    async def _usage_due_work(self) -> None:
        now = workflow.now()
        step = decisions.usage_step(self._state, self._tuning, now)
        if step is UsageStep.QUIET:
            return
        if step is UsageStep.RESYNC:
            start, _ = decisions.current_period(self._state)
            await self._resync()
            if decisions.renewal_unseen(self._state, start):
                self._state.usage_retry_after = now + decisions.RENEWAL_RECHECK
        elif step is UsageStep.REPORT:
            await self._report_period(*decisions.current_period(self._state), now)
        # Ended periods, oldest first; one kept (and retried later) if Stripe refuses it.
        while self._state.to_finalize:
            period = self._state.to_finalize[0]
            await self._report_period(period.start, period.end, max(workflow.now(), period.end))
            self._state.to_finalize.pop(0)
            self._period_rolled = True

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
        report = decisions.record_usage_report(self._state, start, end, plan, sent, workflow.now())
        workflow.logger.info(
            "usage reported",
            extra={
                "org_id": self._state.org_id,
                "period_start": start.isoformat(),
                "meter_events": sent,
            },
        )
        return report, sent

    # Plumbing -------------------------------------------------------------------

    def _set_status(self, status: BillingStatus) -> None:
        self._state.status = status
        self._upsert_attributes()

    def _upsert_attributes(self) -> None:
        """Upsert only what changed, so a run does not fill its history with repeats."""
        wanted = decisions.wanted_attributes(self._state)
        if wanted != self._last_attributes:
            workflow.upsert_search_attributes(decisions.attribute_updates(wanted))
            self._last_attributes = wanted
