"""The invariants, each a count that must be 0, and the figures of the run.

Stripe's side is read from the emulator over its API (customers,
subscriptions, invoices), its counters and its state file (every meter event
it accepted, with its identifier); the product's side from Postgres and from
the workflows' `state` query.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from billing.constants import ORG_BILLING_WORKFLOW, org_workflow_id
from billing.db import orgs
from billing.db.event_log import ADOPTION_REFUSED
from billing.db.models import Org, RequestLog, StripeEventLog, UsageLedger
from billing.domain import BillingStatus, LedgerStatus, OrgBillingState
from billing.search_attributes import BILLING_STATUS_KEY

from .scenario import OrgPlan, Scenario

USERS = "additional_users"
REQUESTS = "additional_requests"
LIVE = frozenset({"trialing", "active", "past_due", "unpaid", "paused", "incomplete"})
EXAMPLES = 5
# The emulator writes its state file at most 0.2 s after a change.
STATE_FILE_FLUSH_SECONDS = 0.5


@dataclass
class Invariant:
    """A count that must be 0, with a few examples when it is not."""

    name: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)


def _ts(value: Any) -> int | None:
    return int(value) if value is not None else None


def _last_second(end: int) -> datetime:
    """The last second of a period ending at `end`: when its final users level is read."""
    return datetime.fromtimestamp(end - 1, UTC)


def _when(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def stripe_subscription_end(sub: dict[str, Any]) -> int | None:
    """docs/contracts.md's rule, written out here again: the product's code is not its own check."""
    if sub.get("cancel_at"):
        return int(sub["cancel_at"])
    if sub["status"] in ("canceled", "incomplete_expired"):
        return _ts(sub.get("ended_at") or sub.get("canceled_at"))
    if sub["status"] == "trialing":
        return _ts(sub.get("trial_end"))
    items = sub["items"]["data"]
    return min(int(i["current_period_end"]) for i in items) if items else None


@dataclass
class StripeWorld:
    """Everything the checks read from Stripe, read once."""

    customers: list[dict[str, Any]]
    subscriptions: list[dict[str, Any]]
    invoices: list[dict[str, Any]]


def read_stripe(client: stripe.StripeClient) -> StripeWorld:
    """Customers, subscriptions (all statuses) and invoices, every page."""

    def every(listing: Any) -> list[dict[str, Any]]:
        return [obj.to_dict() for obj in listing.auto_paging_iter()]

    v1 = client.v1
    return StripeWorld(
        customers=every(v1.customers.list({"limit": 100})),
        subscriptions=every(v1.subscriptions.list({"status": "all", "limit": 100})),
        invoices=every(v1.invoices.list({"limit": 100})),
    )


class Checker:
    """Counts every invariant over one run's orgs."""

    def __init__(
        self,
        *,
        scenario: Scenario,
        client: Client,
        stripe_client: stripe.StripeClient,
        session_factory: sessionmaker[Session],
        prices: dict[str, str],
        state_file: Path,
        emulator_stats: dict[str, Any],
        periods_billed: int,
        source: str,
    ) -> None:
        self.scenario = scenario
        self.client = client
        self.stripe = stripe_client
        self.sessions = session_factory
        self.prices = prices
        self.state_file = state_file
        self.stats = emulator_stats
        self.periods_billed = periods_billed
        self.source = source
        self.orgs: dict[int, OrgPlan] = {p.org_id: p for p in scenario.orgs}
        self.executions: list[WorkflowExecution] = []
        self.accepted_events: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}

    async def run(self) -> list[Invariant]:
        """Every invariant, in the order the report prints them."""
        world = await asyncio.to_thread(read_stripe, self.stripe)
        clock_now = await self.scenario.clock_time()
        customer_org = await asyncio.to_thread(self.provable_customers, world)
        return [
            self.customers(customer_org),
            self.subscriptions(world, customer_org),
            await asyncio.to_thread(self.rows, world, customer_org),
            await asyncio.to_thread(self.invoices, world, customer_org),
            await asyncio.to_thread(self.meter_events),
            await asyncio.to_thread(self.meter_totals, world, customer_org, clock_now),
            await asyncio.to_thread(self.meter_event_periods, world, customer_org),
            await asyncio.to_thread(
                self.billed_twice, world, customer_org, await self._moved_back_states()
            ),
            self.closed_orgs(world, customer_org),
            await asyncio.to_thread(self.customer_details, world, customer_org),
            self.webhooks(),
            await self.workflows(),
            await self.adoptions(world, customer_org),
        ]

    async def _moved_back_states(self) -> dict[int, OrgBillingState | None]:
        back = [org_id for org_id, plan in self.orgs.items() if plan.switched_back_at is not None]
        return await self.scenario.states(sorted(back))

    # -- Stripe objects ------------------------------------------------------------------

    def provable_customers(self, world: StripeWorld) -> dict[str, int]:
        """Customer id -> org, for the customers that are provably an org's.

        Their metadata names the org's id, its `uid` and the run's `source`;
        another environment's look-alikes and dashboard customers that only
        name an org id are nobody's here.
        """
        with self.sessions() as session:
            uids = dict(session.execute(select(Org.id, Org.uid)).tuples().all())
        found: dict[str, int] = {}
        for customer in world.customers:
            metadata = customer.get("metadata") or {}
            org_id = str(metadata.get("org_id", ""))
            if not org_id.isdigit():
                continue
            if metadata.get("source") == self.source and metadata.get("org_uid") == uids.get(
                int(org_id)
            ):
                found[customer["id"]] = int(org_id)
        return found

    def customers(self, customer_org: dict[str, int]) -> Invariant:
        """One customer per Stripe-billed org (found by metadata), none for AWS/Azure."""
        found = Counter(customer_org.values())
        check = Invariant("orgs with != 1 customer (AWS/Azure: != 0)")
        for org_id, plan in self.orgs.items():
            expected = 1 if plan.billed else 0
            if found[org_id] != expected:
                check.add(f"org {org_id} ({plan.kind}) has {found[org_id]} customers")
        return check

    def subscriptions(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """One subscription per Stripe-billed org, whatever its status; none for AWS/Azure.

        An org that canceled and came back through checkout has two: the
        canceled one, and exactly one live one, the one checkout made. An org
        that moved to a marketplace and back has exactly one, live.
        """
        found = Counter(customer_org.get(s["customer"]) for s in world.subscriptions)
        check = Invariant("orgs with != 1 subscription (AWS/Azure: != 0; back: 1 live)")
        for org_id, plan in self.orgs.items():
            expected = (2 if plan.canceled_subscription else 1) if plan.billed else 0
            if found[org_id] != expected:
                check.add(f"org {org_id} ({plan.kind}) has {found[org_id]} subscriptions")
            live = [
                s["id"]
                for s in world.subscriptions
                if customer_org.get(s["customer"]) == org_id and s["status"] in LIVE
            ]
            if plan.switched_back_at is not None and len(live) != 1:
                check.add(f"org {org_id} moved back from a marketplace; live in Stripe: {live}")
            if plan.canceled_subscription:
                # Moved to a marketplace afterwards: that subscription has ended too.
                moved_on = plan.elsewhere_now and not live
                if live != [plan.came_back_with] and not moved_on:
                    check.add(
                        f"org {org_id} came back with {plan.came_back_with}, live in Stripe: {live}"
                    )
        self.notes["orgs that canceled and came back through checkout"] = sorted(
            org_id for org_id, plan in self.orgs.items() if plan.canceled_subscription
        )
        return check

    def rows(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """The org row says what Stripe says: ids, status and subscription_end."""
        ended = {p.canceled_subscription for p in self.orgs.values()}
        subs = {
            customer_org.get(s["customer"]): s for s in world.subscriptions if s["id"] not in ended
        }
        customers = {org: cid for cid, org in customer_org.items()}
        check = Invariant("org rows whose status or subscription_end differ from Stripe")
        with self.sessions() as session:
            rows = {o.id: o for o in session.scalars(select(Org).where(Org.id.in_(self.orgs)))}
        for org_id, plan in self.orgs.items():
            row = rows[org_id]
            if not plan.billed:
                if row.stripe_customer_id or row.stripe_subscription_id:
                    check.add(f"org {org_id} ({plan.kind}) has Stripe ids in its row")
                continue
            sub = subs.get(org_id)
            if sub is None:
                check.add(f"org {org_id} has no subscription to compare with")
                continue
            wanted = {
                "stripe_customer_id": customers.get(org_id),
                "stripe_subscription_id": sub["id"],
                "subscription_status": sub["status"],
                "subscription_end": stripe_subscription_end(sub),
            }
            have = {
                "stripe_customer_id": row.stripe_customer_id,
                "stripe_subscription_id": row.stripe_subscription_id,
                "subscription_status": str(row.subscription_status.value),
                "subscription_end": _when(row.subscription_end),
            }
            differ = [k for k in wanted if wanted[k] != have[k]]
            if differ:
                check.add(
                    f"org {org_id}: "
                    + ", ".join(f"{k} row={have[k]} stripe={wanted[k]}" for k in differ)
                )
        return check

    # -- usage ---------------------------------------------------------------------------

    def invoices(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """Each finalized invoice's metered lines against what the database says was used."""
        check = Invariant("invoices whose metered quantities differ from the database")
        metered = {self.prices["users"]: USERS, self.prices["requests"]: REQUESTS}
        with self.sessions() as session:
            last_users: dict[tuple[int, int], int] = {}
            for row_org, row_start, value in session.execute(
                select(UsageLedger.org_id, UsageLedger.period_start, UsageLedger.value)
                .where(UsageLedger.dimension == USERS, UsageLedger.status == LedgerStatus.SENT)
                .order_by(UsageLedger.seq)
            ).tuples():
                last_users[(row_org, int(row_start.timestamp()))] = int(value)
            request_rows = [
                (row_org, int(occurred.timestamp()), int(count))
                for row_org, occurred, count in session.execute(
                    select(RequestLog.org_id, RequestLog.occurred_at, RequestLog.count)
                ).tuples()
            ]
        billed_periods: Counter[int] = Counter()
        checked = 0
        for invoice in world.invoices:
            if invoice["status"] == "draft":
                continue
            invoice_org = customer_org.get(invoice["customer"])
            lines = [
                line
                for line in invoice["lines"]["data"]
                if line["pricing"]["price_details"]["price"] in metered
            ]
            if invoice_org is None or not lines:
                continue
            org_id = invoice_org
            billed_periods[org_id] += 1
            for line in lines:
                dimension = metered[line["pricing"]["price_details"]["price"]]
                start, end = int(line["period"]["start"]), int(line["period"]["end"])
                if dimension == USERS:
                    expected: int | None = last_users.get((org_id, start))
                else:
                    expected = sum(
                        count
                        for row_org, when, count in request_rows
                        if row_org == org_id and start <= when < end
                    )
                checked += 1
                if expected != int(line["quantity"]):
                    check.add(
                        f"invoice {invoice['id']} (org {org_id}) {dimension} "
                        f"{line['quantity']} != database {expected}"
                    )
        self.notes["metered invoice lines checked"] = checked
        for org_id, plan in self.orgs.items():
            expected_invoices = self.periods_billed if plan.billed and not plan.failing_card else 0
            if plan.switched_month is not None and plan.elsewhere_now:
                # Its subscription ended with the period it moved in: not renewed then.
                expected_invoices = min(expected_invoices, plan.switched_month - 1)
            if plan.canceled_subscription:
                # Its periods follow the checkout's date: each invoice's lines are
                # checked above; how many there are is Stripe's calendar.
                continue
            allowed = {expected_invoices}
            if plan.closed_month is not None:
                # Canceled in the month it was closed in: the paid months before
                # it are invoiced. The test clock outruns the wall clock, so a
                # cancel that faults delayed may land after that month's renewal,
                # which invoices it too (its quantities are checked above like
                # any invoice's); nothing is invoiced after that.
                allowed = {plan.closed_month - 1, plan.closed_month}
                expected_invoices = plan.closed_month - 1
            if billed_periods[org_id] not in allowed:
                check.add(
                    f"org {org_id} has {billed_periods[org_id]} usage invoices, "
                    f"expected {expected_invoices}"
                )
        return check

    def meter_events(self) -> Invariant:
        """Accepted by Stripe once per ledger row, and no identifier accepted twice.

        The ledger is read first and Stripe's record after it, so a row the
        ledger calls sent is in Stripe's record even while reports still run.
        """
        check = Invariant("meter events sent twice (or sent and not in the ledger as sent)")
        with self.sessions() as session:
            ledger = dict(
                session.execute(select(UsageLedger.identifier, UsageLedger.status)).tuples().all()
            )
        time.sleep(STATE_FILE_FLUSH_SECONDS)
        data = json.loads(self.state_file.read_text())
        self.accepted_events = list(data.get("meter_events", []))
        accepted = Counter(str(e.get("identifier")) for e in self.accepted_events)
        for identifier, times in accepted.items():
            if times > 1:
                check.add(f"identifier {identifier} accepted {times} times")
            elif identifier not in ledger:
                check.add(f"identifier {identifier} accepted by Stripe but not in the ledger")
        for identifier, status in sorted(ledger.items()):
            if status == LedgerStatus.SENT and identifier not in accepted:
                check.add(f"ledger row {identifier} is sent but Stripe never accepted it")
            elif status == LedgerStatus.PENDING:
                check.add(f"ledger row {identifier} still pending")
        meters = self.stats.get("meter_events", {})
        self.notes["meter events accepted"] = meters.get("accepted", 0)
        self.notes["meter event retries answered 'duplicate'"] = meters.get("duplicate", 0)
        self.notes["Stripe idempotent replays"] = self.stats.get("idempotent_replays", 0)
        self.notes["ledger rows by status"] = dict(Counter(s.value for s in ledger.values()))
        return check

    def meter_totals(
        self, world: StripeWorld, customer_org: dict[str, int], clock_now: int
    ) -> Invariant:
        """Every reported period that is over, trial and canceled ones included, as Stripe sums it.

        Requests (meter `sum`) must add up to the request log of the period;
        users (meter `last`) must end on the ledger's last users value, which
        must be the membership level at the period's last second (the history
        of who joined and left when). A subscription that ended mid-period ends
        its last period there.
        """
        check = Invariant("ended periods whose Stripe meter totals differ from the database")
        org_customer = {org: customer for customer, org in customer_org.items()}
        ended_at = {
            customer_org[sub["customer"]]: int(sub["ended_at"])
            for sub in world.subscriptions
            if sub.get("ended_at") and sub["customer"] in customer_org
        }
        events: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
        for position, event in enumerate(self.accepted_events):
            payload = event.get("payload") or {}
            key = (str(payload.get("stripe_customer_id")), str(event.get("event_name")))
            value = float(payload.get("value", 0))
            events.setdefault(key, []).append((int(event["timestamp"]), position, value))
        with self.sessions() as session:
            # A period is its start; its end is the earliest any report gave it (a
            # report made before a cancellation still names the full period).
            ends: dict[tuple[int, int], int] = {}
            last_users: dict[tuple[int, int], int] = {}
            for row_org, row_start, row_end, dimension, value in session.execute(
                select(
                    UsageLedger.org_id,
                    UsageLedger.period_start,
                    UsageLedger.period_end,
                    UsageLedger.dimension,
                    UsageLedger.value,
                )
                .where(UsageLedger.status == LedgerStatus.SENT)
                .order_by(UsageLedger.seq)
            ).tuples():
                period = (row_org, int(row_start.timestamp()))
                end = int(row_end.timestamp())
                ends[period] = min(end, ends.get(period, end))
                if dimension == USERS:
                    last_users[period] = int(value)
            requests = list(
                session.execute(
                    select(RequestLog.org_id, RequestLog.occurred_at, RequestLog.count)
                ).tuples()
            )
            final_ends: dict[tuple[int, int], int] = {}
            for (org_id, start), reported_end in ends.items():
                end = reported_end
                if org_id in ended_at and start < ended_at[org_id] < end:
                    end = ended_at[org_id]
                final_ends[(org_id, start)] = end
            levels = {
                period: orgs.member_count_at(session, period[0], _last_second(end))
                for period, end in final_ends.items()
            }
        checked = 0
        for (org_id, start), end in sorted(final_ends.items()):
            customer = org_customer.get(org_id)
            if customer is None or end > clock_now:
                continue
            checked += 1
            inside = [e for e in events.get((customer, REQUESTS), []) if start <= e[0] < end]
            stripe_requests = sum(value for _, _, value in inside)
            database_requests = sum(
                count
                for row_org, occurred, count in requests
                if row_org == org_id and start <= occurred.timestamp() < end
            )
            users = [e for e in events.get((customer, USERS), []) if start <= e[0] < end]
            stripe_users = max(users)[2] if users else None
            ledger_users = last_users.get((org_id, start))
            expected_users = float(ledger_users) if ledger_users is not None else None
            level = levels[(org_id, start)]
            if (
                stripe_requests != database_requests
                or stripe_users != expected_users
                or ledger_users != level
            ):
                check.add(
                    f"org {org_id} period {start}..{end}: requests Stripe {stripe_requests:.0f} "
                    f"database {database_requests}, users Stripe {stripe_users} "
                    f"ledger {ledger_users} members at the end {level}"
                )
        self.notes["ended periods checked against meter totals"] = checked
        return check

    def meter_event_periods(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """Every meter event Stripe accepted lies inside the period it was planned for.

        That is the ledger row's period, cut at the earliest end any report gave
        the period (a trial ended early, a cancel) and at the subscription's
        end when it ended inside it: no event at or after a confirmed end.
        """
        check = Invariant("meter events timestamped outside the period they were planned for")
        ended_at = {
            customer_org[sub["customer"]]: int(sub["ended_at"])
            for sub in world.subscriptions
            if sub.get("ended_at") and sub["customer"] in customer_org
        }
        with self.sessions() as session:
            rows = session.execute(
                select(
                    UsageLedger.identifier,
                    UsageLedger.org_id,
                    UsageLedger.period_start,
                    UsageLedger.period_end,
                )
            ).tuples()
            planned = {
                identifier: (org_id, int(start.timestamp()), int(end.timestamp()))
                for identifier, org_id, start, end in rows
            }
        earliest_end: dict[tuple[int, int], int] = {}
        for org_id, start, end in planned.values():
            earliest_end[(org_id, start)] = min(end, earliest_end.get((org_id, start), end))
        checked = 0
        for event in self.accepted_events:
            found = planned.get(str(event.get("identifier")))
            if found is None:
                continue  # counted by the meter events invariant
            org_id, start, end = found
            end = min(end, earliest_end[(org_id, start)])
            if start < ended_at.get(org_id, end) < end:
                end = ended_at[org_id]
            checked += 1
            timestamp = int(event["timestamp"])
            if not start <= timestamp < end:
                check.add(
                    f"org {org_id}: {event.get('event_name')} event {event.get('identifier')} "
                    f"at {timestamp}, period {start}..{end}"
                )
        self.notes["meter events checked against their period"] = checked
        return check

    def billed_twice(
        self,
        world: StripeWorld,
        customer_org: dict[str, int],
        back_states: dict[int, OrgBillingState | None],
    ) -> Invariant:
        """No org billed through Stripe and a marketplace at once; one moved back is Stripe's.

        An org with an AWS or Azure id may keep a Stripe subscription only until
        the end of the period it moved in: live, it must be set to end by then,
        and no Stripe invoice may bill a period that starts later. An org that
        moved back before that end is billed through Stripe alone: no
        marketplace id in its row, exactly one live subscription that is not
        set to end, and its row and workflow both hold that subscription (its
        invoices are counted as any paying org's).
        """
        check = Invariant(
            "orgs billed through Stripe and a marketplace at once (moved back: Stripe's alone)"
        )
        with self.sessions() as session:
            elsewhere = set(
                session.scalars(select(Org.id).where(Org.id.in_(self.orgs), Org.billed_elsewhere))
            )
            row_subscription = dict(
                session.execute(
                    select(Org.id, Org.stripe_subscription_id).where(Org.id.in_(self.orgs))
                )
                .tuples()
                .all()
            )
        moved = {org_id: plan for org_id, plan in self.orgs.items() if org_id in elsewhere}
        for sub in world.subscriptions:
            org_id = customer_org.get(sub["customer"])
            if org_id not in moved or sub["status"] not in LIVE:
                continue
            period_end = min(int(i["current_period_end"]) for i in sub["items"]["data"])
            cancel_at = sub.get("cancel_at")
            if cancel_at is None or int(cancel_at) > period_end:
                check.add(f"org {org_id}: subscription {sub['id']} bills on past its period")
        for invoice in world.invoices:
            org_id = customer_org.get(invoice["customer"])
            if org_id not in moved:
                continue
            limit = moved[org_id].switched_period_end
            starts = [int(line["period"]["start"]) for line in invoice["lines"]["data"]]
            if limit is None or any(start >= limit for start in starts):
                check.add(
                    f"org {org_id}: invoice {invoice['id']} bills a period after its move "
                    "to a marketplace"
                )
        back = {org_id: p for org_id, p in self.orgs.items() if p.switched_back_at is not None}
        for org_id in sorted(back):
            if org_id in elsewhere:
                check.add(f"org {org_id} moved back but its row is billed elsewhere")
            live = [
                s
                for s in world.subscriptions
                if customer_org.get(s["customer"]) == org_id and s["status"] in LIVE
            ]
            if len(live) != 1:
                continue  # counted by the subscriptions invariant
            sub = live[0]
            if sub.get("cancel_at") is not None:
                check.add(f"org {org_id} moved back; subscription {sub['id']} still set to end")
            state = back_states.get(org_id)
            held = {
                "row": row_subscription.get(org_id),
                "workflow": state.stripe_subscription_id if state is not None else None,
            }
            for where, sub_id in held.items():
                if sub_id != sub["id"]:
                    check.add(
                        f"org {org_id} moved back; its {where} holds {sub_id}, not {sub['id']}"
                    )
        self.notes["orgs moved to a marketplace mid-month"] = sorted(
            org_id for org_id, plan in moved.items() if plan.billed
        )
        self.notes["orgs moved back to Stripe before that period's end"] = sorted(back)
        return check

    # -- what the console changed --------------------------------------------------------

    def closed_orgs(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """A closed org has no live subscription (and its row says it is closed)."""
        check = Invariant("closed orgs with a live subscription")
        closed = {org_id for org_id, plan in self.orgs.items() if plan.closed_month is not None}
        for sub in world.subscriptions:
            org_id = customer_org.get(sub["customer"])
            if org_id in closed and sub["status"] in LIVE:
                check.add(f"org {org_id} is closed; subscription {sub['id']} is {sub['status']}")
        with self.sessions() as session:
            open_rows = set(
                session.scalars(select(Org.id).where(Org.id.in_(closed), Org.closed_at.is_(None)))
            )
        for org_id in sorted(open_rows):
            check.add(f"org {org_id} was closed but its row is not")
        self.notes["orgs closed"] = len(closed)
        return check

    def customer_details(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """Each org's Stripe customer shows the org's name and its owner's name and email.

        The owner is the org's current one: a member made the owner shows in its
        row's owner and in the customer (`{first} {last} ({org name})`).
        """
        check = Invariant("customers whose name or email differ from their org's")
        with self.sessions() as session:
            profiles = {org_id: orgs.org_profile(session, org_id) for org_id in self.orgs}
        for customer in world.customers:
            org_id = customer_org.get(customer["id"])
            if org_id is None:
                continue
            profile = profiles[org_id]
            new_owner = self.orgs[org_id].new_owner
            if new_owner is not None and profile.owner_email != new_owner:
                check.add(f"org {org_id}: owner {profile.owner_email}, made owner {new_owner}")
            if (customer.get("name"), customer.get("email")) != (
                profile.customer_name,
                profile.owner_email,
            ):
                check.add(
                    f"org {org_id}: customer {customer.get('name')!r} <{customer.get('email')}>, "
                    f"org {profile.customer_name!r} <{profile.owner_email}>"
                )
        self.notes["orgs renamed or with an owner renamed"] = sum(
            p.changes > 0 for p in self.orgs.values()
        )
        self.notes["orgs given another owner"] = sorted(
            org_id for org_id, plan in self.orgs.items() if plan.new_owner is not None
        )
        return check

    # -- webhooks and workflows ------------------------------------------------------------

    def webhooks(self) -> Invariant:
        """Deliveries Stripe stopped retrying: an event the product never saw."""
        hooks = self.stats.get("webhooks", {})
        check = Invariant("webhooks Stripe gave up on")
        given_up = int(hooks.get("given_up", 0)) + int(hooks.get("dropped", 0))
        if given_up:
            check.add(f"{given_up} deliveries given up or dropped")
            check.count = given_up
        self.notes["webhook deliveries"] = {
            k: hooks.get(k, 0) for k in ("attempted", "succeeded", "failed", "duplicated")
        }
        return check

    async def workflows(self) -> Invariant:
        """Every org's workflow runs, answers its query, and shows no unexplained trouble."""
        check = Invariant("workflows failed, or stuck without an operator-visible reason")
        self.executions = [
            e async for e in self.client.list_workflows(f"WorkflowType = '{ORG_BILLING_WORKFLOW}'")
        ]
        latest: dict[str, WorkflowExecution] = {}
        for run in self.executions:
            known = latest.get(run.id)
            if known is None or run.start_time > known.start_time:
                latest[run.id] = run
        states = await self.scenario.states(sorted(self.orgs))
        for org_id in sorted(self.orgs):
            execution = latest.get(org_workflow_id(org_id))
            if execution is None:
                check.add(f"org {org_id} has no workflow")
                continue
            closed = self.orgs[org_id].closed_month is not None
            # A closed org's workflow finishes once nothing is owed to Stripe.
            wanted = (
                WorkflowExecutionStatus.COMPLETED if closed else WorkflowExecutionStatus.RUNNING
            )
            if execution.status != wanted:
                status = execution.status.name if execution.status else "unknown"
                check.add(f"org {org_id}: latest run is {status}")
                continue
            state = states.get(org_id)
            if state is None:
                check.add(f"org {org_id}: workflow does not answer its state query")
            elif state.last_error:
                check.add(f"org {org_id}: last_error {state.last_error!r}")
            elif state.status in (BillingStatus.PROVISIONING, BillingStatus.PROVISIONING_FAILED):
                check.add(f"org {org_id}: still {state.status.value}")
            elif (shown := execution.typed_search_attributes.get(BILLING_STATUS_KEY)) != (
                state.status.value
            ):
                # Operators find orgs by this attribute (e.g. BillingStatus='past_due').
                check.add(f"org {org_id}: BillingStatus {shown!r} but state {state.status.value}")
        statuses = Counter(e.status.name if e.status else "unknown" for e in self.executions)
        self.notes["OrgBilling runs by status"] = dict(statuses)
        running = [e for e in latest.values() if e.status == WorkflowExecutionStatus.RUNNING]
        self.notes["activities still retrying at the end"] = await self._retrying(running)
        return check

    async def adoptions(self, world: StripeWorld, customer_org: dict[str, int]) -> Invariant:
        """No org row or workflow holds a customer or subscription that is not provably its own.

        Provably the org's: a customer whose metadata names the org's id, `uid`
        and this environment's `source`, and a subscription of that customer.
        Another environment's look-alikes and the dashboard subscriptions the
        scenario planted must be nobody's; a marketplace org holds nothing.
        """
        check = Invariant("foreign or cross-environment adoptions")
        sub_customer = {s["id"]: s["customer"] for s in world.subscriptions}
        planted = {p.customer_id: p for p in self.scenario.planted} | {
            p.subscription_id: p for p in self.scenario.planted
        }
        with self.sessions() as session:
            rows = {
                org_id: (customer, sub)
                for org_id, customer, sub in session.execute(
                    select(Org.id, Org.stripe_customer_id, Org.stripe_subscription_id).where(
                        Org.id.in_(self.orgs)
                    )
                ).tuples()
            }
            refused = (
                session.execute(
                    select(StripeEventLog.outcome, StripeEventLog.detail).where(
                        StripeEventLog.outcome.in_([ADOPTION_REFUSED, "unroutable"])
                    )
                )
                .tuples()
                .all()
            )
        states = await self.scenario.states(sorted(self.orgs))
        for org_id, plan in self.orgs.items():
            held = {"row": rows.get(org_id, (None, None))}
            state = states.get(org_id)
            if state is not None:
                held["state"] = (state.stripe_customer_id, state.stripe_subscription_id)
            for where, (customer, sub) in held.items():
                for object_id in (customer, sub):
                    if object_id in planted:
                        origin = planted[object_id]
                        check.add(
                            f"org {org_id} ({plan.kind}) {where} holds {origin.kind} "
                            f"{object_id} planted for org {origin.org_id}"
                        )
                if customer is not None and customer_org.get(customer) != org_id:
                    check.add(f"org {org_id} ({plan.kind}) {where} holds customer {customer}")
                if sub is not None and (customer is None or sub_customer.get(sub) != customer):
                    check.add(
                        f"org {org_id} ({plan.kind}) {where} holds subscription {sub} "
                        f"of customer {sub_customer.get(sub)}"
                    )
        kinds = Counter(p.kind for p in self.scenario.planted)
        self.notes["planted look-alikes / dashboard subscriptions"] = (
            f"{kinds['look-alike']} / {kinds['dashboard']}"
        )
        self.notes["adoptions refused"] = sum(o == ADOPTION_REFUSED for o, _ in refused)
        self.notes["events of another environment not routed"] = sum(
            o == "unroutable" and "another environment" in (d or "") for o, d in refused
        )
        return check

    async def _retrying(self, running: list[WorkflowExecution]) -> int:
        """Pending activities past their first attempt: work that keeps failing quietly."""

        async def one(execution: WorkflowExecution) -> int:
            handle = self.client.get_workflow_handle(execution.id, run_id=execution.run_id)
            try:
                description = await handle.describe()
            except Exception:
                return 0
            pending = description.raw_description.pending_activities
            return sum(1 for activity in pending if activity.attempt > 1)

        return sum(await asyncio.gather(*(one(e) for e in running)))

    def largest_history(self) -> int:
        """The longest history of any run: continue-as-new keeps it bounded."""
        return max((e.history_length for e in self.executions), default=0)
