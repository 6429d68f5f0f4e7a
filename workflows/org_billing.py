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
        CancelAtPeriodEndInput,
        CancelSubscriptionInput,
        CheckoutCompletedInput,
        EnsureSubscriptionInput,
        FetchSubscriptionInput,
        PlanUsageInput,
        SaveCustomerInput,
        SaveSubscriptionInput,
        SyncCustomerInput,
    )
    from activities.stripe_activities import StripeActivities
    from billing.constants import (
        CLOSE_ORG_SIGNAL,
        ORG_BILLING_WORKFLOW,
        ORG_CHANGED_SIGNAL,
        RECONCILE_UPDATE,
        REPORT_USAGE_UPDATE,
        RESYNC_SIGNAL,
        RETRY_PROVISIONING_SIGNAL,
        STATE_QUERY,
        STRIPE_EVENT_SIGNAL,
    )
    from billing.domain import (
        LIVE_SUBSCRIPTION_STATUSES,
        BillingProblem,
        BillingStatus,
        CustomerSync,
        FieldDifference,
        OrgBillingInput,
        OrgBillingState,
        OrgCloseSignal,
        ReconcileResult,
        RefusedAdoption,
        StripeEventSignal,
        SubscriptionSnapshot,
        UsagePeriodReport,
        UsageReportResult,
    )
    from billing.problems import current_details
    from billing.search_attributes import BILLING_PROBLEM_KEY

from workflows import checkout, decisions, lifecycle, notifications
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
# The money-safety changes to usage, events and runs, all in one patch (one
# marker per run): a signal wakes a run whose history is too long, which
# continues as new at once; a refused usage report is retried on a short
# backoff; a failed event is kept unseen and retried; a report that is not a
# period's final one confirms the period with Stripe first; an event's `created`
# moves its watermark no further than Stripe's clock; an org moved to AWS/Azure
# gets its Stripe subscription ended at period end; each write of a Stripe read
# to the org row carries a stamp; the `BillingProblem` search attribute.
USAGE_SAFETY = "usage-safety"
# A fresh run (after a reset) of an org that moved to AWS/Azure while its Stripe
# subscription is still live follows that subscription and ends it at period end,
# rather than leaving it billing unseen under `not_billed`.
MARKETPLACE_FRESH_RUN = "marketplace-fresh-run"
# Entitlement on the org row and notifications to the console (the outbox), after
# each change; the run also wakes when a grace or paid period runs out.
NOTIFICATIONS = "notifications"
# Provisioning stopped on a refused adoption shows `adoption_refused`, not
# `provisioning_failed` (a different fix).
ADOPTION_PROBLEM = "problem-adoption-refused"
# `checkout.session.completed`: the session is re-read and, proven the org's,
# its subscription linked (or its card made the customer's default).
CHECKOUT = "checkout"
# The service API's org lifecycle: `org_changed` syncs the Stripe customer and
# follows marketplace ids at once; `close_org` ends the subscription and the run.
ORG_LIFECYCLE = "org-lifecycle"
# A refused usage report re-reads Stripe before its retry, so the retry plans
# with Stripe's clock as it is now (a test clock may have moved on meanwhile),
# and an ended period's final report is timed by Stripe's clock, not ours.
USAGE_STRIPE_CLOCK = "usage-stripe-clock"
# An org billed through AWS/Azure whose Stripe subscription has ended is
# `not_billed` (entitled), not `canceled`; an org billed elsewhere never adopts a
# Stripe subscription, whatever its status.
MARKETPLACE_ENDED = "marketplace-ended"
# Every patch id, for the checks of what a history may hold in plaintext.
PATCH_IDS = (
    NOT_BILLED_RECHECK,
    PROVABLE_ADOPTION,
    USAGE_SAFETY,
    MARKETPLACE_FRESH_RUN,
    NOTIFICATIONS,
    ADOPTION_PROBLEM,
    CHECKOUT,
    ORG_LIFECYCLE,
    USAGE_STRIPE_CLOCK,
    MARKETPLACE_ENDED,
)
# The prefix of `last_error` for usage work (cleared when usage goes through again).
USAGE_ERROR = "usage report"


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
        # What the last upsert set; a problem carried over from the last run is
        # still shown (continue-as-new keeps search attributes) until unset.
        self._last_attributes: dict[str, str] = (
            {BILLING_PROBLEM_KEY.name: self._state.problem.value} if self._state.problem else {}
        )
        self._wake_to_continue = False
        # Stripe's clock at the last read of the subscription (the report time).
        self._stripe_now: datetime | None = None
        # Whether this run publishes entitlement and notifications (`NOTIFICATIONS`).
        self._notifying = False
        # Service API lifecycle (ORG_LIFECYCLE): an org change to act on, and the
        # next re-sync follows marketplace ids even if it is the run's first.
        self._org_changed = input.org_changed
        self._follow_now = False
        self._close_wake = self._state.closed_at is not None

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

    @workflow.signal(name=ORG_CHANGED_SIGNAL)
    def on_org_changed(self) -> None:
        self._org_changed = True

    @workflow.signal(name=CLOSE_ORG_SIGNAL)
    def on_close_org(self, close: OrgCloseSignal) -> None:
        lifecycle.note_close(self._state, close)
        self._close_wake = True

    @workflow.query(name=STATE_QUERY)
    def state(self) -> OrgBillingState:
        return self._state

    @workflow.update(name=RECONCILE_UPDATE)
    async def reconcile(self) -> ReconcileResult:
        """Re-read from Stripe now and say what differed."""
        async with self._lock:
            diffs = await self._resync()
            await self._publish()
        return ReconcileResult(
            org_id=self._state.org_id, differences=diffs, status=self._state.status
        )

    @workflow.update(name=REPORT_USAGE_UPDATE)
    async def report_usage(self) -> UsageReportResult:
        """Report the current period's usage not yet reported, now.

        The period is confirmed with Stripe first: the one the workflow believes
        in may have been cut short (a trial ended early, a cancel, a reset
        anchor) by a change whose webhook has not arrived.
        """
        async with self._lock:
            report_time = workflow.now()
            if self._safe():
                await self._resync()
                report_time = self._report_time()
            period = decisions.billable_period(self._state)
            if period is None:
                return UsageReportResult(
                    org_id=self._state.org_id,
                    skipped_reason=f"nothing to report: billing status is {self._state.status}",
                )
            report, sent = await self._report_period(*period, report_time)
        return UsageReportResult(
            org_id=self._state.org_id,
            periods=[report],
            meter_events_sent=sent,
            skipped_reason=report.skipped_reason,
        )

    # Main loop ------------------------------------------------------------------

    @workflow.run
    async def run(self, input: OrgBillingInput) -> None:
        self._wake_to_continue = self._safe()
        self._notifying = workflow.patched(NOTIFICATIONS)
        self._upsert_attributes()
        if decisions.provisioning_pending(self._state):
            await self._provision_until_done()
        while True:
            if self._closing() and lifecycle.close_finished(self._state):
                await self._finish_close()
                return
            if self._period_rolled or self._history_too_long():
                await self._continue_as_new()
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    self._has_work,
                    timeout=self._wake_after(),
                )
            if self._continue_due():
                continue  # the next run, started at the top, does the work
            if self._retry_requested and decisions.retry_provisioning_allowed(self._state):
                await self._provision_until_done()
            self._retry_requested = False
            async with self._lock:
                await self._drain_events()
                if self._org_changed or self._closing():
                    await self._kept_alive("org lifecycle", self._lifecycle_work())
                if self._resync_requested or decisions.resync_due(
                    self._state, self._tuning, workflow.now()
                ):
                    self._resync_requested = False
                    await self._kept_alive("re-sync", self._resync())
                await self._kept_alive("usage report", self._usage_due_work(), usage=True)
                await self._publish()

    def _has_work(self) -> bool:
        """What wakes the loop before its timer (signals, and periods an update found)."""
        return (
            self._events_waiting()
            or self._continue_due()
            or self._resync_requested
            or self._retry_requested
            or self._org_changed
            or self._close_wake
            or (
                bool(self._state.to_finalize)
                and not decisions.usage_quiet(self._state, workflow.now())
            )
        )

    def _events_waiting(self) -> bool:
        """Events to apply in this run (a long run leaves them to the next one)."""
        return bool(self._pending) and not self._history_too_long()

    def _continue_due(self) -> bool:
        """Events wait while the history is too long: continue as new now, not at the next timer.

        The next run applies them first thing.
        """
        return self._wake_to_continue and bool(self._pending) and self._history_too_long()

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
                org_changed=self._org_changed,
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
            if usage and outcome and decisions.usage_recovered(self._state, USAGE_ERROR):
                workflow.logger.info("usage reports go through again", extra=self._org())
                self._upsert_attributes()
            return
        self._state.last_error = f"{step}: {outcome.message}"
        if usage and self._safe():
            wait = decisions.usage_refused(self._state, outcome.kind, self._tuning, workflow.now())
            if outcome.kind == "StripeInvalidRequestError" and workflow.patched(USAGE_STRIPE_CLOCK):
                self._resync_requested = True  # e.g. a timestamp Stripe's clock left behind
            self._upsert_attributes()
            workflow.logger.error(
                f"{step} failed; retrying in {int(wait.total_seconds())} s",
                extra={
                    **self._org(),
                    "error": outcome.message,
                    "problem": self._state.usage_problem,
                },
            )
            return
        if usage:
            self._state.usage_retry_after = workflow.now() + timedelta(
                seconds=self._tuning.failed_retry_seconds
            )
        workflow.logger.error(f"{step} failed", extra={**self._org(), "error": outcome.message})

    # Provisioning ---------------------------------------------------------------

    async def _provision_until_done(self) -> None:
        while True:
            self._retry_requested = False
            async with self._lock:
                done = await self._provision_once()
            if done:
                return
            if self._closing():
                # Closed while provisioning failed: nothing was billed, nothing to end.
                self._set_status(BillingStatus.CLOSED)
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
            # Failed events are retried meanwhile, on their own schedule.
            event_retry = decisions.next_event_retry(self._state, workflow.now())
            try:
                await workflow.wait_condition(
                    lambda: (
                        self._retry_requested
                        or self._events_waiting()
                        or self._continue_due()
                        or self._state.closed_at is not None
                    ),
                    timeout=remaining if event_retry is None else min(remaining, event_retry),
                )
            except TimeoutError:
                if event_retry is None or workflow.now() >= retry_at:
                    return False
            if self._retry_requested or self._state.closed_at is not None:
                return False
            async with self._lock:
                await self._drain_events()
                await self._publish()
            if self._state.stripe_subscription_id:
                return True

    async def _provision_once(self) -> bool:
        """One attempt; False (with the error kept in state) if retrying cannot help."""
        self._set_status(BillingStatus.PROVISIONING)
        outcome = await unless_refused(self._provision())
        if not isinstance(outcome, Refused):
            await self._publish()
            return True
        self._state.last_error = outcome.message
        self._set_status(BillingStatus.PROVISIONING_FAILED)
        workflow.logger.error(
            "provisioning failed",
            extra={"org_id": self._state.org_id, "error": outcome.message},
        )
        await self._publish()
        return False

    def _not_billed(self) -> Refused | None:
        """Billed through a marketplace: nothing to provision (never an error)."""
        self._note_billed_elsewhere(True)
        self._state.last_error = None
        self._set_status(BillingStatus.NOT_BILLED)
        return None

    async def _provision(self) -> Refused | None:
        """Customer, then subscription; a `Refused` when the row's customer is not the org's."""
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        if (org.closed_at is not None or self._state.closed_at is not None) and workflow.patched(
            ORG_LIFECYCLE
        ):
            if self._state.closed_at is None:
                # Started by something else (a webhook) after the close: nothing to do.
                self._state.closed_at = org.closed_at
            ended = lifecycle.closed_row_status(org)
            if ended is not None:
                # Nothing of it bills: the run ends without asking Stripe.
                self._state.last_error = None
                self._set_status(ended)
                return None
        if not org.billed_elsewhere:
            self._note_billed_elsewhere(False)
        # Billed elsewhere with a subscription of ours on the row: it may still be
        # live in Stripe (the move happened while no run was watching).
        leaving = (
            org.billed_elsewhere
            and bool(org.stripe_subscription_id)
            and workflow.patched(MARKETPLACE_FRESH_RUN)
        )
        if org.billed_elsewhere and not leaving:
            return self._not_billed()
        if workflow.patched(PROVABLE_ADOPTION):
            own = await stripe_activity(StripeActivities.own_customer, org)
            if own.customer_id is None:
                reason = own.refused or "no customer"
                await self._refuse_adoption(reason, customer_id=org.stripe_customer_id)
                return self._not_billed() if leaving else Refused(reason)
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
        if leaving and (
            snapshot is None
            or snapshot.status not in LIVE_SUBSCRIPTION_STATUSES
            # A live one made elsewhere, not ours: never adopted.
            or (snapshot.id != org.stripe_subscription_id and workflow.patched(MARKETPLACE_ENDED))
        ):
            # Nothing of ours bills any more: never subscribe a marketplace org.
            return self._not_billed()
        replaces = None
        if (
            snapshot is not None
            and decisions.marketplace_left_after_end(self._state, snapshot, org.billed_elsewhere)
            and workflow.patched(MARKETPLACE_ENDED)
        ):
            # Ended by us for a marketplace the org has since left: Stripe bills it again.
            replaces, snapshot = snapshot.id, None
        if snapshot is None:
            snapshot = await stripe_activity(
                StripeActivities.ensure_subscription,
                EnsureSubscriptionInput(customer_id=customer_id, org=org, replaces=replaces),
            )
        if leaving and self._state.billed_elsewhere:
            # The row's own subscription of the customer checked above: followed,
            # never refused as an adoption (`billed_elsewhere` is MARKETPLACE_ENDED's).
            self._state.stripe_subscription_id = snapshot.id
        await self._apply(snapshot)
        if leaving:
            # Its last Stripe period gets its final report; nothing after it.
            await self._follow_marketplace(snapshot)
        if replaces is not None:
            self._state.marketplace_cancel_of = None
        self._state.last_error = None
        workflow.logger.info(
            "org provisioned", extra={"org_id": org.org_id, "subscription_id": snapshot.id}
        )
        return None

    # Events and re-sync ---------------------------------------------------------

    async def _drain_events(self) -> None:
        # Stop early when the history is long: the rest is carried into the next run.
        while self._events_waiting():
            await self._process_event(self._pending.popleft())
        # Then the failed events whose retry is due (one per object, so few).
        while not self._history_too_long():
            failed = decisions.due_failed_event(self._state, workflow.now())
            if failed is None:
                break
            await self._process_event(failed.event)

    async def _process_event(self, event: StripeEventSignal) -> None:
        """Apply one event; a failure keeps it (unseen) for a retry with backoff."""
        state = self._state
        if event.event_id in state.seen_event_ids:
            decisions.event_resolved_by_id(state, event.event_id)
            return
        key = decisions.plan_event(state, event).key
        outcome = await unless_refused(self._apply_event(event))
        if isinstance(outcome, Refused):
            # E.g. the subscription was deleted from Stripe: keep the error visible.
            state.last_error = f"event {event.event_id}: {outcome.message}"
            if self._safe():
                covered = decisions.event_failed(
                    state, event, key, outcome.message, self._tuning, workflow.now()
                )
                if covered is not None:
                    decisions.remember(state, covered, self._tuning.seen_events_limit)
                self._upsert_attributes()
                workflow.logger.error(
                    "event failed; kept for a retry",
                    extra={**self._org(), "event_id": event.event_id, "error": outcome.message},
                )
                return
        elif state.failed_events:
            resolved = decisions.event_resolved(state, key)
            for earlier in resolved:
                if earlier.event_id != event.event_id:
                    decisions.remember(state, earlier, self._tuning.seen_events_limit)
            if any(
                state.last_error and state.last_error.startswith(f"event {e.event_id}:")
                for e in [*resolved, event]
            ):
                state.last_error = None
            self._upsert_attributes()
        decisions.remember(state, event, self._tuning.seen_events_limit)
        if self._notifying:
            notifications.queue_payment(
                state, event, workflow.now(), self._tuning.past_due_grace_days
            )

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
        if checkout.is_checkout(event) and workflow.patched(CHECKOUT):
            await self._follow_checkout(event, plan.key)
            return
        if plan.fetch is None:
            return
        snapshot = await stripe_activity(StripeActivities.fetch_subscription, plan.fetch)
        if snapshot is None:
            return
        await self._apply(snapshot, event)
        cap = decisions.watermark_cap(snapshot, workflow.now()) if self._safe() else None
        decisions.advance_watermark(self._state, plan.key, event.created, cap)
        if event.type == TRIAL_WILL_END and snapshot.id == self._state.stripe_subscription_id:
            self._note_trial_will_end(snapshot.trial_end)

    async def _follow_checkout(self, event: StripeEventSignal, key: str) -> None:
        """A completed Checkout Session: linked if provably the org's, else recorded."""
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        asked = checkout.checkout_input(self._state, event, org)
        if isinstance(asked, CheckoutCompletedInput):
            outcome = await stripe_activity(StripeActivities.checkout_completed, asked)
            refused, sub_id = outcome.refused, outcome.subscription_id
        else:
            outcome, refused, sub_id = None, asked, event.subscription_id
        if refused is not None:
            await self._refuse_adoption(
                refused, customer_id=event.customer_id, subscription_id=sub_id, event=event
            )
            return
        if outcome is None or outcome.subscription is None:
            return
        await self._apply(outcome.subscription, event)
        if checkout.needs_resync(self._state, outcome.subscription.id):
            await self._resync()
        cap = decisions.watermark_cap(outcome.subscription, workflow.now())
        decisions.advance_watermark(self._state, key, event.created, cap)

    def _note_trial_will_end(self, trial_end: datetime | None) -> None:
        """Once per trial end, however often Stripe redelivers: the hook for a notice."""
        noted = decisions.note_trial_will_end(self._state, trial_end)
        if noted is not None and self._notifying:
            notifications.queue_trial_will_end(
                self._state, noted, workflow.now(), self._tuning.past_due_grace_days
            )
        if noted is not None:
            workflow.logger.info(
                "trial ends soon",
                extra={"org_id": self._state.org_id, "trial_end": noted.isoformat()},
            )

    async def _resync(self) -> list[FieldDifference]:
        """Daily (and on demand): heal whatever a lost webhook left behind."""
        # The first re-sync follows the provisioning that just read the org.
        first_sync = self._state.last_synced_at is None
        self._state.last_synced_at = workflow.now()
        self._stripe_now = None
        if self._state.status == BillingStatus.NOT_BILLED:
            if workflow.patched(NOT_BILLED_RECHECK):
                # Marketplace billing removed from the org: bill it through Stripe.
                org = await db_activity(DbActivities.load_org, self._state.org_id)
                self._note_billed_elsewhere(org.billed_elsewhere)
                if not org.billed_elsewhere:
                    self._retry_requested = True
                elif decisions.live_subscription_unfollowed(org) and workflow.patched(
                    MARKETPLACE_ENDED
                ):
                    # Called `not_billed` while the row still names a live subscription
                    # of ours (a run from before `marketplace-fresh-run`): provisioning
                    # follows it to its period end instead of letting it renew unseen.
                    self._retry_requested = True
            return []
        read = decisions.resync_read(self._state)
        if read is None:
            return []
        snapshot = await stripe_activity(StripeActivities.fetch_subscription, read)
        if snapshot is None:
            return []
        self._stripe_now = snapshot.read_at
        diffs = await self._apply(snapshot)
        if self._safe():
            cap = decisions.watermark_cap(snapshot, workflow.now())
            decisions.cap_watermarks(self._state, [snapshot.id, snapshot.customer_id], cap)
        if self._safe() and (not first_sync or self._follow_now) and self._state.closed_at is None:
            diffs += await self._follow_marketplace(snapshot)
        self._follow_now = False
        return diffs

    async def _follow_marketplace(self, snapshot: SubscriptionSnapshot) -> list[FieldDifference]:
        """An org moved to AWS/Azure: its Stripe subscription ends at the period's end.

        That period still gets its final usage report (as for any cancel), and
        nothing after it is billed by Stripe. Moved back before that end, the
        cancel (ours) is taken back.
        """
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        self._note_billed_elsewhere(org.billed_elsewhere)
        cancel = decisions.marketplace_cancel(self._state, snapshot, org.billed_elsewhere)
        if cancel is None:
            return []
        updated = await stripe_activity(
            StripeActivities.cancel_at_period_end,
            CancelAtPeriodEndInput(
                subscription_id=snapshot.id, cancel=cancel, requested_at=workflow.now()
            ),
        )
        self._state.marketplace_cancel_of = snapshot.id if cancel else None
        workflow.logger.info(
            "org billed through a marketplace: Stripe subscription ends at period end"
            if cancel
            else "org billed through Stripe again: the subscription goes on",
            extra={**self._org(), "subscription_id": snapshot.id},
        )
        return await self._apply(updated)

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
        synced_at = workflow.now() if self._safe() else None
        diffs = await db_activity(
            DbActivities.save_subscription,
            SaveSubscriptionInput(org_id=state.org_id, subscription=snapshot, synced_at=synced_at),
        )
        if snapshot.id == state.stripe_subscription_id:
            state.to_finalize.extend(decisions.ended_periods(state, snapshot))
        decisions.adopt(state, snapshot)
        if decisions.marketplace_end_seen(state, snapshot) and workflow.patched(MARKETPLACE_ENDED):
            await self._marketplace_ended(snapshot)
        self._upsert_attributes()
        return diffs

    def _note_billed_elsewhere(self, billed_elsewhere: bool) -> None:
        """Keep what the org row said about marketplace billing (asked only on a change,
        so runs recorded before `MARKETPLACE_ENDED` replay without its marker)."""
        if billed_elsewhere != self._state.billed_elsewhere and workflow.patched(MARKETPLACE_ENDED):
            self._state.billed_elsewhere = billed_elsewhere

    async def _marketplace_ended(self, snapshot: SubscriptionSnapshot) -> None:
        """The org's Stripe subscription ended: billed through a marketplace, it is
        `not_billed` (entitled), and Stripe never bills it again unless it leaves that
        marketplace (the daily re-check then provisions it)."""
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        self._state.billed_elsewhere = org.billed_elsewhere
        if not org.billed_elsewhere:
            return
        self._state.status = BillingStatus.NOT_BILLED
        workflow.logger.info(
            "org billed through a marketplace: its Stripe subscription ended, not billed by us",
            extra={**self._org(), "subscription_id": snapshot.id},
        )

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

    async def _usage_due_work(self) -> bool:
        """The usage work due now; returns whether any was done (and went through)."""
        now = workflow.now()
        step = decisions.usage_step(self._state, self._tuning, now)
        if step is UsageStep.QUIET:
            return False
        worked = step is not UsageStep.NONE
        if step is UsageStep.RESYNC:
            start, _ = decisions.current_period(self._state)
            await self._resync()
            if decisions.renewal_unseen(self._state, start):
                self._state.usage_retry_after = now + decisions.RENEWAL_RECHECK
        elif step is UsageStep.REPORT:
            start, end = decisions.current_period(self._state)
            if self._safe():
                # Stripe may have ended the period early: never report into a
                # period that is over (its final report is queued instead).
                await self._resync()
                if decisions.same_period(self._state, start, end):
                    await self._report_period(start, end, self._report_time())
            else:
                await self._report_period(start, end, now)
        # Ended periods, oldest first; one kept (and retried later) if Stripe refuses it.
        while self._state.to_finalize:
            worked = True
            period = self._state.to_finalize[0]
            report_time = max(self._report_time(), workflow.now(), period.end)
            await self._report_period(period.start, period.end, report_time)
            self._state.to_finalize.pop(0)
            self._period_rolled = True
        return worked

    def _report_time(self) -> datetime:
        """When a report made now happens, on Stripe's clock (a test clock's, if on one)."""
        return self._stripe_now or workflow.now()

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

    # Entitlement and notifications ------------------------------------------------

    def _wake_after(self) -> timedelta:
        """The run loop's timer: its usual wake, or sooner when the entitlement runs out."""
        now = workflow.now()
        wake = decisions.next_wake(self._state, self._tuning, now)
        if self._notifying:
            change = notifications.wake_for_entitlement(
                self._state, now, self._tuning.past_due_grace_days
            )
            if change is not None:
                wake = min(wake, change)
        return wake

    async def _publish(self) -> None:
        """Write what changed (the row's entitlement, notifications to the outbox), if anything.

        One DB activity; delivery to the console is the worker's own loop.
        """
        if not self._notifying:
            return
        plan = notifications.plan_publish(
            self._state, workflow.now(), self._tuning.past_due_grace_days
        )
        if plan is None:
            return
        outcome = await unless_refused(db_activity(DbActivities.publish_billing, plan))
        if isinstance(outcome, Refused):
            workflow.logger.error(
                "publishing entitlement failed", extra={**self._org(), "error": outcome.message}
            )
            return
        notifications.published(self._state, plan)
    # Org lifecycle (service API) -----------------------------------------------

    def _closing(self) -> bool:
        """The org was closed; asked only then, so runs without a close record no marker."""
        return self._state.closed_at is not None and workflow.patched(ORG_LIFECYCLE)

    async def _lifecycle_work(self) -> None:
        """Sync the customer after an org change; end a closed org's subscription."""
        if self._org_changed and workflow.patched(ORG_LIFECYCLE):
            self._org_changed = False
            if self._state.closed_at is None:
                await self._sync_customer()
                # Marketplace ids may have changed: re-read now and follow them.
                self._resync_requested = True
                self._follow_now = True
        if self._closing():
            self._close_wake = False
            await self._close_step()

    async def _sync_customer(self) -> None:
        """The Stripe customer's name and email as the org has them (idempotent)."""
        org = await db_activity(DbActivities.load_org, self._state.org_id)
        name, email = lifecycle.customer_target(org)
        customer_id = self._state.stripe_customer_id
        if customer_id is None or not lifecycle.customer_sync_needed(self._state, name, email):
            return
        now = workflow.now()
        updated = await stripe_activity(
            StripeActivities.sync_customer,
            SyncCustomerInput(customer_id=customer_id, name=name, email=email, requested_at=now),
        )
        self._state.customer_sync = CustomerSync(
            customer_id=customer_id, name=name, email=email, synced_at=now, updated=updated
        )
        workflow.logger.info("customer synced", extra={**self._org(), "updated": updated})

    async def _close_step(self) -> None:
        step = lifecycle.close_step(self._state, self._state.close_cancel_of)
        if step is lifecycle.CloseStep.NONE:
            return
        subscription_id = self._state.stripe_subscription_id
        assert subscription_id is not None
        if step is lifecycle.CloseStep.CANCEL_AT_PERIOD_END:
            updated = await stripe_activity(
                StripeActivities.cancel_at_period_end,
                CancelAtPeriodEndInput(
                    subscription_id=subscription_id, cancel=True, requested_at=workflow.now()
                ),
            )
            self._state.close_cancel_of = subscription_id
            await self._apply(updated)
            workflow.logger.info("org closed: subscription ends at period end", extra=self._org())
            return
        # Immediately: the period so far gets its final report first, then the cancel.
        await self._resync()
        period = decisions.billable_period(self._state)
        if period is not None and self._state.stripe_subscription_id == subscription_id:
            # A second before the cancel: the period ends at the cancel's time,
            # and no meter event may sit at or after a period's end.
            await self._report_period(*period, lifecycle.before_cancel(self._report_time()))
        canceled = await stripe_activity(
            StripeActivities.cancel_subscription,
            CancelSubscriptionInput(subscription_id=subscription_id, requested_at=workflow.now()),
        )
        await self._apply(canceled)
        workflow.logger.info("org closed: subscription canceled", extra=self._org())

    async def _finish_close(self) -> None:
        """The run ends: nothing is owed to Stripe any more."""
        self._set_status(lifecycle.closed_status(self._state))
        # Events that came after the end change nothing for a closed org: seen.
        while self._pending:
            decisions.remember(self._state, self._pending.popleft(), self._tuning.seen_events_limit)
        workflow.logger.info("org closed: billing finished", extra=self._org())
        await workflow.wait_condition(workflow.all_handlers_finished)

    # Plumbing -------------------------------------------------------------------

    def _set_status(self, status: BillingStatus) -> None:
        self._state.status = status
        self._upsert_attributes()

    def _upsert_attributes(self) -> None:
        """Upsert only what changed, so a run does not fill its history with repeats."""
        self._state.problem = self._shown_problem()
        wanted = decisions.wanted_attributes(self._state, self._state.problem)
        if wanted != self._last_attributes:
            workflow.upsert_search_attributes(
                decisions.attribute_updates(wanted, self._last_attributes)
            )
            self._last_attributes = wanted
        # Not in the history (a query answers it): the UI's one-line "current details".
        workflow.set_current_details(current_details(self._state))

    def _shown_problem(self) -> BillingProblem | None:
        """The problem to show; runs recorded before `BillingProblem` existed show none."""
        problem = decisions.billing_problem(self._state)
        if decisions.provisioning_refused(self._state) and workflow.patched(ADOPTION_PROBLEM):
            problem = BillingProblem.ADOPTION_REFUSED
        was_shown = self._state.problem is not None
        if (problem is not None or was_shown) and self._safe():
            return problem
        return None

    def _safe(self) -> bool:
        """Whether this run has the `USAGE_SAFETY` changes (runs recorded before replay without).

        First asked as the run starts, so its marker comes first in new runs.
        """
        return workflow.patched(USAGE_SAFETY)

    def _org(self) -> dict[str, object]:
        return {"org_id": self._state.org_id}
