"""What happens to the orgs: created, given members, cards and requests, billed for two months.

Orgs are created the way `billing orgs create` creates them (a row, an owner, a
started workflow). Before their workflows start, another environment sharing
the Stripe account already has look-alike customers (same org id, its own
`org_uid` and `source`); once they are provisioned, someone types subscriptions
naming some of them (a marketplace org among them) into the dashboard. Neither
may ever be linked to an org. Their customers land on one test clock, which the harness
advances in steps: through the trial, then each billing period to its end plus
a few minutes, where it waits for every renewed (or ended) org's usage to be in
the ledger as sent, then past the hour in which Stripe finalizes the invoice.
Requests are recorded at test-clock times ahead of each step, so every one
belongs to a period that has not been reported yet; members join and leave at
the test clock's time, so the users meter's level at each period's end is known.
In the middle of the second month a couple of paying orgs move to a cloud
marketplace (an AWS account id put as the service API's PUT does: the row,
then the `org_changed` signal): Stripe must stop billing them at that period's
end. On day 20 one of them moves back (the id removed the same way) before that
end: Stripe must bill it again, with the subscription it had.
In the first month a couple of paying orgs cancel their subscription and come
back through checkout: the owner asks the API for a checkout link and pays on
Stripe's page; each must end with exactly one live subscription, the new one.

Through both months some orgs are renamed and some owners change their name
(what the service API's PUT does: the row, then the `org_changed` signal), one
org a month gets another owner (a member made the owner as the service API's
member PUT with `role: owner` does, then the same signal: the previous owner
stays as a billing admin, the Stripe customer shows the new owner), and
in the second month one paying org is closed (its row closed, then the
`close_org` signal): its subscription ends at once after the usage of the
period so far is reported, and its workflow finishes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import httpx
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from billing.auth import TokenRules, mint_token
from billing.constants import (
    CLOSE_ORG_SIGNAL,
    ORG_CHANGED_SIGNAL,
    REPORT_USAGE_UPDATE,
    org_workflow_id,
)
from billing.db import orgs
from billing.db.models import Org, StripeEventLog, UsageLedger
from billing.domain import (
    BillingStatus,
    LedgerStatus,
    OrgBillingState,
    OrgCloseCancels,
    OrgCloseSignal,
    UsageReportResult,
)
from billing.orchestration import (
    RETRY_PROVISIONING,
    StartSignal,
    query_state,
    start_org_workflow,
)

from .faults import EmulatorControl, FaultInjector
from .processes import TASK_QUEUE

T = TypeVar("T")
Say = Callable[[str], None]

MINUTE = 60
HOUR = 3600
DAY = 86400
WORKING_CARD = "pm_card_visa"
FAILING_CARD = "pm_card_chargeCustomerFail"
LIVE = frozenset({"trialing", "active", "past_due", "unpaid"})
QUERY_TIMEOUT = 5.0
POLL = 1.0
# Paying orgs that move to a cloud marketplace in the middle of the second month;
# those of them that move back before that period's end.
SWITCHED_ORGS = 2
SWITCHED_BACK_ORGS = 1
# Paying orgs that cancel and come back through checkout in the first month.
RETURNING_ORGS = 2
CHECKOUT_URL = "/api/payments/stripe/checkout"
TEST_CARD_NUMBER = "4242424242424242"
# Paying orgs closed in the middle of the second month; orgs renamed or whose
# owner changes their name, in the middle of each month.
CLOSED_ORGS = 1
CHANGED_ORGS = 2
# Orgs a month in which a member is made the owner.
NEW_OWNER_ORGS = 1

OrgKind = Literal["stripe", "aws", "azure"]
PlantedKind = Literal["look-alike", "dashboard"]
# The environment that shares the Stripe account with the run's.
OTHER_SOURCE = "chaos-staging"


@dataclass
class OrgPlan:
    """One org of the run and what the harness did to it."""

    org_id: int
    kind: OrgKind
    failing_card: bool = False
    members: list[str] = field(default_factory=list)
    added: int = 0
    removed: int = 0
    # Set when the org moved to a marketplace: the month it moved in (1 is the
    # first paid month), the test-clock time, and the end of the Stripe period it
    # moved in (Stripe bills nothing that starts later).
    switched_month: int | None = None
    switched_at: int | None = None
    switched_period_end: int | None = None
    # Set when the org moved back from the marketplace (test-clock time): Stripe
    # bills it again, with the subscription it had.
    switched_back_at: int | None = None
    # Set when the org canceled and came back through checkout: the canceled
    # subscription and the one checkout made.
    canceled_subscription: str | None = None
    came_back_with: str | None = None
    # Set when the org was closed: the month it was closed in (1 is the first paid month).
    closed_month: int | None = None
    # Renames, owner name changes and new owners made to it, and the last month of one.
    changes: int = 0
    changed_month: int | None = None
    # Set when a member was made the owner: the new owner's email.
    new_owner: str | None = None

    @property
    def elsewhere_now(self) -> bool:
        """Moved to a marketplace and not back: Stripe bills it no more after that period."""
        return self.switched_month is not None and self.switched_back_at is None

    @property
    def billed(self) -> bool:
        """Billed through Stripe (at least until a move to a marketplace)."""
        return self.kind == "stripe"


@dataclass(frozen=True)
class Planted:
    """A customer and subscription made outside the product, naming one of its orgs."""

    kind: PlantedKind
    org_id: int
    customer_id: str
    subscription_id: str


@dataclass
class StepLog:
    """How long one clock step took to settle."""

    label: str
    clock: int
    seconds: float
    settled: bool


class DeadlineExceeded(Exception):
    """The run's time bound was reached; the checks run on what there is."""


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def iso(ts: int) -> str:
    return at(ts).strftime("%Y-%m-%d %H:%M")


class Scenario:
    """Drives the orgs through the month; every wait is bounded by the run's deadline."""

    def __init__(
        self,
        *,
        client: Client,
        stripe_client: stripe.StripeClient,
        session_factory: sessionmaker[Session],
        emulator: EmulatorControl,
        injector: FaultInjector | None,
        clock_id: str,
        rng: random.Random,
        deadline: float,
        say: Say,
        step_timeout: float = 180.0,
        source: str = "org-billing",
        base_price: str = "",
        api_url: str | None = None,
        token_rules: TokenRules | None = None,
    ) -> None:
        self.client = client
        self.stripe = stripe_client
        self.sessions = session_factory
        self.emulator = emulator
        self.injector = injector
        self.clock_id = clock_id
        self.rng = rng
        self.deadline = deadline
        self.say = say
        self.step_timeout = step_timeout
        self.source = source
        self.base_price = base_price
        self.api_url = api_url
        self.token_rules = token_rules
        self.orgs: list[OrgPlan] = []
        self.planted: list[Planted] = []
        self.steps: list[StepLog] = []
        self.unsettled: list[str] = []
        self.manual_reports = 0
        self.months_invoiced = 0
        self._started = time.monotonic()
        self._member_seq = 0

    # -- helpers ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def log(self, message: str) -> None:
        self.say(f"[{self.elapsed():6.1f}s] {message}")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def wait_for(
        self, what: str, probe: Callable[[], Awaitable[str | None]], timeout: float
    ) -> bool:
        """Poll `probe` (None = done, else what is missing) until done or out of time."""
        limit = time.monotonic() + min(timeout, max(self.remaining(), 0))
        last = "not checked yet"
        while True:
            try:
                missing = await probe()
            except Exception as err:  # a server may be down for a moment
                missing = f"{type(err).__name__}: {err}"
            if missing is None:
                return True
            last = missing
            if time.monotonic() > limit:
                self.log(f"gave up waiting for {what}: {last}")
                self.unsettled.append(f"{what}: {last}")
                if self.remaining() <= 0:
                    raise DeadlineExceeded(what)
                return False
            await asyncio.sleep(POLL)

    async def clock_time(self) -> int:
        clock = await self.blocking(self.stripe.v1.test_helpers.test_clocks.retrieve, self.clock_id)
        return int(clock.frozen_time)

    # -- orgs -------------------------------------------------------------------------------

    def plan_orgs(self, count: int, elsewhere_share: float, failing_share: float) -> None:
        """Which orgs are AWS/Azure and which pay with a failing card (seeded)."""
        indexes = list(range(count))
        self.rng.shuffle(indexes)
        elsewhere = set(indexes[: round(count * elsewhere_share)])
        failing = set(indexes[len(elsewhere) : len(elsewhere) + round(count * failing_share)])
        kinds: list[OrgKind] = ["aws", "azure"]
        self.orgs = [
            OrgPlan(
                org_id=0,
                kind=kinds[i % 2] if i in elsewhere else "stripe",
                failing_card=i in failing,
            )
            for i in range(count)
        ]

    def _create_rows(self, run_tag: str, now: int) -> None:
        with self.sessions.begin() as session:
            for index, plan in enumerate(self.orgs):
                org = orgs.create_org_with_owner(
                    session,
                    name=f"Chaos {run_tag} #{index + 1}",
                    owner_email=f"owner{index + 1}.{run_tag}@chaos.test",
                    owner_first_name="Owner",
                    owner_last_name=str(index + 1),
                    aws_account_id=f"{100000000000 + index}" if plan.kind == "aws" else None,
                    azure_subscription_id=f"azure-{run_tag}-{index}"
                    if plan.kind == "azure"
                    else None,
                )
                plan.org_id = org.id
                for _ in range(self.rng.randint(0, 5)):
                    plan.members.append(self._add_member(session, org.id, now))

    def _add_member(self, session: Session, org_id: int, now: int) -> str:
        """A new member from `now` on, test-clock time (the users meter's time)."""
        self._member_seq += 1
        email = f"member{self._member_seq}.org{org_id}@chaos.test"
        orgs.add_member(session, org_id, email, at=at(now))
        return email

    async def create_orgs(self, run_tag: str) -> None:
        await self.blocking(self._create_rows, run_tag, await self.clock_time())
        await self.blocking(self._plant_look_alikes)
        self.log(f"created {len(self.orgs)} orgs; starting their workflows")
        for plan in self.orgs:
            await self._start_workflow(plan.org_id)

    async def _start_workflow(self, org_id: int) -> None:
        """Like `billing orgs create`; Temporal may be restarting, so try until the deadline."""
        while True:
            try:
                await asyncio.wait_for(
                    start_org_workflow(self.client, TASK_QUEUE, org_id, signal=RETRY_PROVISIONING),
                    10,
                )
                return
            except Exception as err:
                if self.remaining() <= 0:
                    raise DeadlineExceeded(f"start the workflow of org {org_id}") from err
                await asyncio.sleep(1)

    def _plant(self, kind: PlantedKind, org_id: int, metadata: dict[str, str]) -> None:
        """A customer with a trialing subscription, both carrying `metadata`.

        Dashboard ones live on the run's clock with a working card, so their
        trial end and renewals name the org again all month; another
        environment's stay on wall time (the API does not even route them).
        """
        params: stripe.params.CustomerCreateParams = {
            "email": f"{kind}.org{org_id}@elsewhere.test",
            "metadata": metadata,
        }
        if kind == "dashboard":
            params["test_clock"] = self.clock_id
        customer = self.stripe.v1.customers.create(params)
        if kind == "dashboard":
            pm = self.stripe.v1.payment_methods.attach(WORKING_CARD, {"customer": customer.id})
            self.stripe.v1.customers.update(
                customer.id, {"invoice_settings": {"default_payment_method": pm.id}}
            )
        sub = self.stripe.v1.subscriptions.create(
            {
                "customer": customer.id,
                "items": [{"price": self.base_price, "quantity": 1}],
                "trial_period_days": 7,
                "metadata": metadata,
            }
        )
        self.planted.append(Planted(kind, org_id, customer.id, sub.id))

    def _some(self, plans: list[OrgPlan], share: float) -> list[OrgPlan]:
        """At least one of `plans` (when there are any), about `share` of them."""
        if not plans:
            return []
        return self.rng.sample(plans, max(1, round(len(plans) * share)))

    def _plant_look_alikes(self) -> None:
        """Another environment on the account already bills its own orgs with our ids."""
        billed = [p for p in self.orgs if p.billed]
        elsewhere = [p for p in self.orgs if not p.billed]
        for plan in self._some(billed, 0.1) + self._some(elsewhere, 0.5):
            metadata = {
                "org_id": str(plan.org_id),
                "org_uid": str(uuid.uuid4()),
                "source": OTHER_SOURCE,
            }
            self._plant("look-alike", plan.org_id, metadata)
        count = sum(p.kind == "look-alike" for p in self.planted)
        self.log(f"{count} look-alike customers of {OTHER_SOURCE} share the org ids")

    def _dashboard_subscriptions(self) -> None:
        billed = [p for p in self.orgs if p.billed]
        elsewhere = [p for p in self.orgs if not p.billed]
        for plan in self._some(billed, 0.1) + self._some(elsewhere, 0.5):
            self._plant("dashboard", plan.org_id, {"org_id": str(plan.org_id)})

    async def create_dashboard_subscriptions(self) -> None:
        """Subscriptions typed into the dashboard with an org's id (marketplace orgs too)."""
        await self.blocking(self._dashboard_subscriptions)
        chosen = [p for p in self.planted if p.kind == "dashboard"]
        marketplace = sum(not self._plan(p.org_id).billed for p in chosen)
        self.log(f"{len(chosen)} dashboard subscriptions name orgs ({marketplace} marketplace)")

    def _plan(self, org_id: int) -> OrgPlan:
        return next(p for p in self.orgs if p.org_id == org_id)

    async def wait_provisioned(self) -> bool:
        """Every Stripe org has a subscription in its row; AWS/Azure orgs are not_billed."""
        billed = {p.org_id for p in self.orgs if p.billed}
        elsewhere = [p.org_id for p in self.orgs if not p.billed]

        def rows() -> set[int]:
            with self.sessions() as session:
                return set(
                    session.scalars(
                        select(Org.id).where(
                            Org.stripe_subscription_id.is_not(None),
                            Org.stripe_customer_id.is_not(None),
                        )
                    )
                )

        async def probe() -> str | None:
            missing = billed - await self.blocking(rows)
            if missing:
                return f"{len(missing)} orgs without a subscription in the database"
            states = await self.states(elsewhere)
            waiting = [
                org_id
                for org_id in elsewhere
                if (state := states.get(org_id)) is None or state.status != BillingStatus.NOT_BILLED
            ]
            if waiting:
                return f"{len(waiting)} AWS/Azure orgs not yet not_billed"
            return None

        return await self.wait_for("provisioning", probe, self.step_timeout)

    def _attach_cards(self) -> None:
        with self.sessions() as session:
            customers = dict(session.execute(select(Org.id, Org.stripe_customer_id)).tuples().all())
        for plan in self.orgs:
            customer = customers.get(plan.org_id)
            if not plan.billed or not customer:
                continue
            token = FAILING_CARD if plan.failing_card else WORKING_CARD
            pm = self.stripe.v1.payment_methods.attach(token, {"customer": customer})
            self.stripe.v1.customers.update(
                customer, {"invoice_settings": {"default_payment_method": pm.id}}
            )

    async def attach_cards(self) -> None:
        """Each customer's default card: a working one, or one that declines."""
        await self.blocking(self._attach_cards)
        failing = sum(p.failing_card for p in self.orgs)
        self.log(f"cards attached: {failing} failing ({FAILING_CARD}), the rest {WORKING_CARD}")

    # -- usage ------------------------------------------------------------------------------

    def _record_requests(self, start: int, end: int) -> int:
        """A few request_log rows per billed org at test-clock times in [start, end)."""
        total = 0
        with self.sessions.begin() as session:
            for plan in self.orgs:
                if not plan.billed or plan.closed_month is not None:
                    continue
                for _ in range(self.rng.randint(0, 3)):
                    when = self.rng.randint(start, end - 1)
                    count = self.rng.randint(1, 500)
                    orgs.record_requests(session, plan.org_id, count, at(when))
                    total += count
        return total

    def _change_members(self, now: int) -> int:
        """Some orgs gain a member, some lose one, at `now`: the users meter is a level."""
        changed = 0
        with self.sessions.begin() as session:
            for plan in self.orgs:
                if not plan.billed or plan.closed_month is not None or self.rng.random() > 0.2:
                    continue
                if plan.members and self.rng.random() < 0.4:
                    email = plan.members.pop(self.rng.randrange(len(plan.members)))
                    orgs.remove_member(session, plan.org_id, email, at=at(now))
                    plan.removed += 1
                else:
                    plan.members.append(self._add_member(session, plan.org_id, now))
                    plan.added += 1
                changed += 1
        return changed

    async def report_some_now(self, share: float = 0.1) -> None:
        """`billing usage report` for a few orgs mid-period: deltas must not double-count."""
        chosen = [p for p in self.orgs if p.billed and self.rng.random() < share]

        async def one(plan: OrgPlan) -> bool:
            handle = self.client.get_workflow_handle(org_workflow_id(plan.org_id))
            try:
                await asyncio.wait_for(
                    handle.execute_update(REPORT_USAGE_UPDATE, result_type=UsageReportResult), 20
                )
            except Exception:
                return False
            return True

        done = await asyncio.gather(*(one(p) for p in chosen))
        self.manual_reports += sum(done)

    # -- moving to a marketplace -----------------------------------------------------------

    def _set_marketplace(self, plan: OrgPlan, account: str | None) -> list[int]:
        """The org's AWS account id put (or removed) as the service API's PUT does."""
        return self._put_org(plan.org_id, lambda data: replace(data, aws_account_id=account))

    def _cancel_at(self, org_ids: set[int]) -> dict[int, int | None]:
        """Each org's live subscription (the row's) and its `cancel_at`, from Stripe."""
        with self.sessions() as session:
            rows = session.execute(
                select(Org.id, Org.stripe_subscription_id).where(Org.id.in_(org_ids))
            ).tuples()
            held = {org_id: sub_id for org_id, sub_id in rows if sub_id}
        found: dict[int, int | None] = {}
        for org_id, sub_id in held.items():
            sub = self.stripe.v1.subscriptions.retrieve(sub_id)
            if sub.status in LIVE:
                found[org_id] = sub.cancel_at
        return found

    async def _stripe_follows(self, what: str, plans: list[OrgPlan], *, ending: bool) -> bool:
        """Wait until each org's live subscription is set to end (`ending`) or bills on."""
        wanted = {p.org_id for p in plans}

        async def probe() -> str | None:
            found = await self.blocking(self._cancel_at, wanted)
            done = {
                org_id for org_id, cancel_at in found.items() if (cancel_at is not None) == ending
            }
            missing = sorted(wanted - done)
            return f"orgs {missing} not followed in Stripe yet" if missing else None

        return await self.wait_for(what, probe, self.step_timeout)

    async def switch_to_marketplace(self, month: int) -> None:
        """A couple of paying orgs move to AWS now; Stripe stops billing them at period end.

        The id is put as the service API's PUT puts it (the row, then the
        `org_changed` signal, on which the workflow re-reads the subscription and
        follows the marketplace id at once).
        """
        candidates = [p for p in self.orgs if p.billed and not p.failing_card]
        chosen = self.rng.sample(candidates, min(SWITCHED_ORGS, len(candidates)))
        if not chosen:
            return
        now = await self.clock_time()
        subs = await self.blocking(self.subscriptions)
        ends = {
            int(s["metadata"]["org_id"]): self._period(s)[1]
            for s in subs.values()
            if s["status"] in LIVE and (s.get("metadata") or {}).get("org_id", "").isdigit()
        }
        for plan in chosen:
            told = await self.blocking(self._set_marketplace, plan, f"9{plan.org_id:011d}")
            await self._tell_changed(told)
            plan.switched_month, plan.switched_at = month, now
            plan.switched_period_end = ends.get(plan.org_id)
        self.log(f"orgs {', '.join(str(p.org_id) for p in chosen)} moved to AWS Marketplace")
        await self._stripe_follows("moved orgs' subscriptions set to end", chosen, ending=True)

    async def switch_back(self, month: int) -> None:
        """One org that moved this month leaves the marketplace before the period's end.

        The id is removed as the service API's PUT removes it: the cancel the
        move asked for is taken back, and Stripe bills the org on.
        """
        moved = [p for p in self.orgs if p.switched_month == month and p.closed_month is None]
        chosen = self.rng.sample(moved, min(SWITCHED_BACK_ORGS, len(moved)))
        if not chosen:
            return
        now = await self.clock_time()
        for plan in chosen:
            await self._tell_changed(await self.blocking(self._set_marketplace, plan, None))
            plan.switched_back_at = now
        self.log(f"orgs {', '.join(str(p.org_id) for p in chosen)} moved back to Stripe")
        await self._stripe_follows("moved-back orgs billed on", chosen, ending=False)

    # -- cancel, then come back through checkout -------------------------------------------

    def _owner(self, org_id: int) -> int:
        with self.sessions() as session:
            owner = orgs.list_members(session, org_id)
            return next(m.user_id for m in owner if m.role == "owner")

    async def _until(self, what: str, attempt: Callable[[], Awaitable[T | None]]) -> T:
        """Retry `attempt` (a fault may be on) until it gives a value or the run's bound."""
        while True:
            try:
                value = await attempt()
            except Exception as err:
                value, last = None, f"{type(err).__name__}: {err}"
            else:
                last = "no answer yet"
            if value is not None:
                return value
            if self.remaining() <= 0:
                raise DeadlineExceeded(f"{what}: {last}")
            await asyncio.sleep(POLL)

    async def cancel_and_come_back(self) -> None:
        """A couple of paying orgs cancel now, then pay again through checkout."""
        if self.api_url is None or self.token_rules is None:
            return
        candidates = [
            p for p in self.orgs if p.billed and not p.failing_card and p.switched_month is None
        ]
        chosen = self.rng.sample(candidates, min(RETURNING_ORGS, len(candidates)))
        if not chosen:
            return
        self.log(f"orgs {', '.join(str(p.org_id) for p in chosen)} cancel, then check out")
        await asyncio.gather(*(self._come_back(p) for p in chosen))

    async def _come_back(self, plan: OrgPlan) -> None:
        assert self.api_url is not None and self.token_rules is not None
        api_url, org_id = self.api_url, plan.org_id

        async def state_with(statuses: set[BillingStatus]) -> OrgBillingState | None:
            state = await asyncio.wait_for(query_state(self.client, org_id), QUERY_TIMEOUT)
            return state if state.status in statuses else None

        state = await self._until(
            f"org {org_id} billed", lambda: state_with({BillingStatus.ACTIVE})
        )
        old = state.stripe_subscription_id
        assert old is not None
        await self.blocking(self.stripe.v1.subscriptions.cancel, old)
        plan.canceled_subscription = old
        await self._until(f"org {org_id} canceled", lambda: state_with({BillingStatus.CANCELED}))
        token = mint_token(self.token_rules, self._owner(org_id), org_id)

        async def session_url() -> str | None:
            async with httpx.AsyncClient(base_url=api_url, timeout=20) as http:
                answer = await http.post(CHECKOUT_URL, headers={"Authorization": f"Bearer {token}"})
            if answer.status_code != 200:
                return None  # the API or Stripe may be down for a moment
            url: str = answer.json()["url"]
            return url

        url = await self._until(f"org {org_id} checkout", session_url)

        async def paid() -> bool | None:
            async with httpx.AsyncClient(timeout=20) as http:
                answer = await http.post(url, data={"cardNumber": TEST_CARD_NUMBER})
            return True if answer.status_code == 303 else None

        await self._until(f"org {org_id} pays", paid)

        async def linked() -> OrgBillingState | None:
            state = await state_with({BillingStatus.ACTIVE})
            return state if state and state.stripe_subscription_id != old else None

        state = await self._until(f"org {org_id} billed again", linked)
        plan.came_back_with = state.stripe_subscription_id
        self.log(f"org {org_id} came back: {old} -> {plan.came_back_with}")

    # -- what the console changes -----------------------------------------------------------

    async def _signal(self, org_id: int, signal: StartSignal) -> None:
        """Signal-with-start, as the service API does; Temporal may be restarting."""
        while True:
            try:
                await asyncio.wait_for(
                    start_org_workflow(self.client, TASK_QUEUE, org_id, signal=signal), 10
                )
                return
            except Exception as err:
                if self.remaining() <= 0:
                    raise DeadlineExceeded(f"signal org {org_id}") from err
                await asyncio.sleep(1)

    async def _tell_changed(self, org_ids: list[int]) -> None:
        """The `org_changed` signal to each org whose change the service API would pass on."""
        for org_id in org_ids:
            await self._signal(org_id, StartSignal(ORG_CHANGED_SIGNAL))

    @staticmethod
    def _as_is(summary: orgs.OrgSummary) -> orgs.OrgInput:
        """What the console would PUT for the org as it is."""
        assert summary.owner_email is not None
        return orgs.OrgInput(
            uid=summary.uid,
            name=summary.name,
            owner=orgs.OwnerInput(
                email=summary.owner_email,
                first_name=summary.owner_first_name,
                last_name=summary.owner_last_name,
            ),
            aws_account_id=summary.aws_account_id,
            azure_subscription_id=summary.azure_subscription_id,
        )

    def _put_org(self, org_id: int, change: Callable[[orgs.OrgInput], orgs.OrgInput]) -> list[int]:
        """A PUT of the org, changed by `change`; the orgs the service API then signals."""
        with self.sessions.begin() as session:
            summary = orgs.org_summary(session, org_id)
            result = orgs.put_org(session, org_id, change(self._as_is(summary)))
        told = [org_id] if result.customer_changed or result.marketplace_changed else []
        return told + list(result.also_changed)

    def _rename(self, plan: OrgPlan, month: int) -> list[int]:
        """A new org name, or a new last name of its owner (what a PUT of the org does)."""
        rename = self.rng.random() < 0.5

        def change(data: orgs.OrgInput) -> orgs.OrgInput:
            if rename:
                return replace(data, name=f"{data.name} (m{month})")
            last_name = f"{data.owner.last_name}-m{month}"
            return replace(data, owner=replace(data.owner, last_name=last_name))

        told = self._put_org(plan.org_id, change)
        plan.changes, plan.changed_month = plan.changes + 1, month
        return told

    def _new_owner(self, plan: OrgPlan, month: int) -> list[int]:
        """A member becomes the owner, as the service API's member PUT with `role: owner` does.

        The member count stays (the previous owner stays, as a billing admin), so
        the users meter's level does not move; the new owner is never removed.
        """
        email = plan.members.pop(self.rng.randrange(len(plan.members)))
        with self.sessions.begin() as session:
            result = orgs.put_member(
                session,
                plan.org_id,
                f"chaos-{email}",
                orgs.MemberInput(
                    email=email,
                    first_name="Heir",
                    last_name=f"{plan.org_id}-m{month}",
                    role="owner",
                ),
            )
        plan.new_owner = email
        plan.changes, plan.changed_month = plan.changes + 1, month
        told = [plan.org_id] if result.customer_changed else []
        return told + list(result.also_changed)

    async def change_orgs(self, month: int) -> None:
        """Orgs are renamed, their owner renamed or replaced; the Stripe customer follows."""
        open_ = [p for p in self.orgs if p.billed and p.closed_month is None]
        chosen = self.rng.sample(open_, min(CHANGED_ORGS, len(open_)))
        for plan in chosen:
            await self._tell_changed(await self.blocking(self._rename, plan, month))
        if chosen:
            self.log(f"orgs {', '.join(str(p.org_id) for p in chosen)} renamed")
        renamed = {p.org_id for p in chosen}
        with_members = [
            p for p in open_ if p.members and p.org_id not in renamed and p.new_owner is None
        ]
        for plan in self.rng.sample(with_members, min(NEW_OWNER_ORGS, len(with_members))):
            await self._tell_changed(await self.blocking(self._new_owner, plan, month))
            self.log(f"org {plan.org_id}: {plan.new_owner} is the owner now")

    async def close_orgs(self, month: int) -> None:
        """A paying org is closed (DELETE): its subscription ends now, its workflow finishes."""
        candidates = [
            p
            for p in self.orgs
            if p.billed
            and not p.failing_card
            and p.switched_month is None
            and p.closed_month is None
            and p.canceled_subscription is None
            # A close on the heels of a change ends the org before its customer
            # follows the change (a closed org's customer is left as it was).
            and p.changed_month != month
        ]
        for plan in self.rng.sample(candidates, min(CLOSED_ORGS, len(candidates))):

            def close(org_id: int = plan.org_id) -> datetime:
                with self.sessions.begin() as session:
                    return orgs.close_org(session, org_id).closed_at

            closed_at = await self.blocking(close)
            plan.closed_month = month
            signal = OrgCloseSignal(closed_at=closed_at, cancels=OrgCloseCancels.IMMEDIATELY)
            await self._signal(plan.org_id, StartSignal(CLOSE_ORG_SIGNAL, (signal,)))
            self.log(f"org {plan.org_id} closed")

    # -- the clock --------------------------------------------------------------------------

    def _advance(self, target: int) -> None:
        clocks = self.stripe.v1.test_helpers.test_clocks
        clocks.advance(self.clock_id, {"frozen_time": target})
        while clocks.retrieve(self.clock_id).status != "ready":
            time.sleep(0.1)

    async def step(
        self, label: str, target: int, *, boundary: int | None = None, wait: bool = True
    ) -> None:
        """Record requests up to `target`, advance, and (if `wait`) let everything land.

        Steps that do not wait let the next advance overtake webhooks still in
        flight, so events arrive late relative to Stripe's clock too.
        """
        began = time.monotonic()
        now = await self.clock_time()
        requests = await self.blocking(self._record_requests, now, target)
        changed = await self.blocking(self._change_members, now)
        self.log(
            f"{label}: clock {iso(now)} -> {iso(target)} "
            f"({requests} requests recorded, {changed} member changes)"
        )
        await self.blocking(self._advance, target)
        if self.injector is not None:
            self.injector.after_advance()
        if not wait:
            return
        settled = await self.settle(label, boundary)
        seconds = time.monotonic() - began
        self.steps.append(StepLog(label, target, seconds, settled))
        self.log(f"{label}: {'settled' if settled else 'NOT settled'} after {seconds:.1f} s")

    async def drive(self) -> None:
        """Through the trial, then two billing periods, each to its invoice."""
        t0 = await self.clock_time()
        subs = await self.blocking(self.subscriptions)
        trial_end = min(int(s["trial_end"]) for s in subs.values() if s.get("trial_end"))
        await self.step("trial, day 10", t0 + 10 * DAY, wait=False)
        await self.step("trial, day 20", t0 + 20 * DAY, wait=False)
        await self.step("trial, 2 days left", trial_end - 2 * DAY)
        await self.step("trial end", trial_end + 5 * MINUTE, boundary=trial_end)
        await self.step("trial end invoices", trial_end + 2 * HOUR)
        start = trial_end
        for month in (1, 2):
            subs = await self.blocking(self.subscriptions)
            end = max(self._period(s)[1] for s in subs.values() if self._period(s)[0] == start)
            await self.step(f"month {month}, day 10", start + 10 * DAY, wait=False)
            await self.report_some_now()
            await self.change_orgs(month)
            if month == 2:
                await self.switch_to_marketplace(month)
                await self.close_orgs(month)
            await self.step(f"month {month}, day 20", start + 20 * DAY)
            if month == 1:
                await self.cancel_and_come_back()
            if month == 2:
                await self.switch_back(month)
            await self.step(f"month {month} end", end + 5 * MINUTE, boundary=end)
            await self.step(f"month {month} invoices", end + 2 * HOUR)
            self.months_invoiced = month
            start = end

    # -- settling ---------------------------------------------------------------------------

    @staticmethod
    def _period(sub: dict[str, Any]) -> tuple[int, int]:
        items = sub["items"]["data"]
        return (
            min(int(i["current_period_start"]) for i in items),
            min(int(i["current_period_end"]) for i in items),
        )

    def subscriptions(self) -> dict[str, dict[str, Any]]:
        """The run's environment's subscriptions in Stripe, by id, as plain dicts.

        Planted ones (another environment's, the dashboard's) keep their own
        trials and periods; the clock follows the orgs' own.
        """
        subs = self.stripe.v1.subscriptions.list({"status": "all", "limit": 100})
        every = (s.to_dict() for s in subs.auto_paging_iter())
        return {s["id"]: s for s in every if (s.get("metadata") or {}).get("source") == self.source}

    async def states(self, org_ids: list[int]) -> dict[int, OrgBillingState | None]:
        """The workflows' `state` query; None where it did not answer in time."""

        async def one(org_id: int) -> OrgBillingState | None:
            try:
                return await asyncio.wait_for(query_state(self.client, org_id), QUERY_TIMEOUT)
            except Exception:
                return None

        found = await asyncio.gather(*(one(i) for i in org_ids))
        return dict(zip(org_ids, found, strict=True))

    async def webhooks_idle(self) -> str | None:
        """Stripe has no delivery queued, in flight or waiting for a retry."""
        stats = await self.blocking(self.emulator.stats)
        hooks = stats["webhooks"]
        busy = int(hooks.get("in_flight_or_queued", 0)) + int(hooks.get("scheduled_retries", 0))
        return f"{busy} webhook deliveries pending" if busy else None

    def _signalled(self) -> dict[int, set[str]]:
        with self.sessions() as session:
            rows = session.execute(
                select(StripeEventLog.org_id, StripeEventLog.id).where(
                    StripeEventLog.outcome == "signalled"
                )
            ).tuples()
            found: dict[int, set[str]] = {}
            for org_id, event_id in rows:
                if org_id is not None:
                    found.setdefault(org_id, set()).add(event_id)
            return found

    async def events_applied(self) -> str | None:
        """Every event the API handed to a workflow is in its seen events.

        Not for a closed org: its workflow finished, and each event after that
        starts a run that marks it seen and ends at once, knowing nothing of the
        events before (the workflows invariant checks that it finished).
        """
        signalled = await self.blocking(self._signalled)
        for plan in self.orgs:
            if plan.closed_month is not None:
                signalled.pop(plan.org_id, None)
        states = await self.states(sorted(signalled))
        behind = [
            org_id
            for org_id, events in signalled.items()
            if (state := states.get(org_id)) is None or not events <= set(state.seen_event_ids)
        ]
        if not behind:
            return None
        named = ", ".join(str(org_id) for org_id in sorted(behind)[:5])
        return f"{len(behind)} workflows have not applied their events yet (orgs {named})"

    def _usage_missing(self, boundary: int) -> str | None:
        """Orgs renewed (or ended) at `boundary` whose ended period is not all sent."""
        subs = self.subscriptions()
        renewed = {
            int(s["metadata"]["org_id"])
            for s in subs.values()
            if s.get("metadata")
            and (
                (s["status"] in LIVE and self._period(s)[0] == boundary)
                or (s["status"] == "canceled" and s.get("ended_at") == boundary)
            )
        }
        with self.sessions() as session:
            rows = session.execute(
                select(UsageLedger.org_id, UsageLedger.dimension, UsageLedger.status).where(
                    UsageLedger.period_end == at(boundary)
                )
            ).tuples()
            users: set[int] = set()
            pending: set[int] = set()
            for org_id, dimension, status in rows:
                if dimension == "additional_users":
                    users.add(org_id)
                if status == LedgerStatus.PENDING:
                    pending.add(org_id)
        missing = (renewed - users) | (renewed & pending)
        if missing:
            return f"{len(missing)} of {len(renewed)} renewed orgs have not reported usage"
        return None

    async def settle(self, label: str, boundary: int | None) -> bool:
        """Webhooks delivered, every event applied, and (at a period end) usage reported."""
        checks: list[tuple[str, Callable[[], Awaitable[str | None]]]] = [
            ("webhook deliveries", self.webhooks_idle),
            ("events applied", self.events_applied),
        ]
        if boundary is not None:

            async def usage() -> str | None:
                return await self.blocking(self._usage_missing, boundary)

            checks.append(("usage reported", usage))

        async def everything() -> str | None:
            for _, check in checks:
                missing = await check()
                if missing is not None:
                    return missing
            return None

        return await self.wait_for(f"{label} to settle", everything, self.step_timeout)
