"""`billing emulator ...`: run the Stripe emulator, move its test clock, swap test cards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import stripe
import typer

from billing.db import orgs
from billing.domain import OrgBillingState
from billing.temporal_client import TemporalUnavailableError
from tooling.cli.context import (
    CliState,
    err,
    fail,
    out,
    print_json,
    run,
    state_of,
)
from tooling.cli.live import live_states
from tooling.cli.request_log import parse_duration, parse_time

app = typer.Typer(help="The Stripe emulator (development only).", no_args_is_help=True)

FAILING_CARD = "pm_card_chargeCustomerFail"
WORKING_CARD = "pm_card_visa"
ADVANCE_TIMEOUT = 120.0
# Where a stepped advance stops after a period end: inside the finalization hour.
REPORT_STOP = 300
REPORT_WAIT = 60.0
# Invoices finalize (and are paid) this long after the period end, as in Stripe.
FINALIZATION = 3600
# `--to period-end` stops this long after the end: the invoice has finalized and been paid.
PAST_FINALIZATION = FINALIZATION + 600
PERIOD_END = "period-end"
BILLED_STATUSES = frozenset({"trialing", "active", "past_due", "unpaid"})


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 12111,
    state_file: Annotated[
        Path | None, typer.Option("--state-file", help="Keep the emulator's data in this file.")
    ] = None,
    webhook_retry_delays: Annotated[
        str | None,
        typer.Option(
            "--webhook-retry-delays",
            help="Seconds between attempts of a failed webhook delivery, comma-separated "
            "(default 0.5,1,2,4,8; Stripe itself retries for days).",
        ),
    ] = None,
) -> None:
    """Run the Stripe emulator alone, until interrupted."""
    from stripe_emulator.server import serve as serve_emulator

    options: dict[str, tuple[float, ...]] = {}
    if webhook_retry_delays is not None:
        options["webhook_retry_delays"] = _retry_delays(webhook_retry_delays)
    serve_emulator(host, port, str(state_file) if state_file else None, **options)


def _retry_delays(text: str) -> tuple[float, ...]:
    """`0.5,1,2` as seconds; anything else is a usage error that says what is wanted."""
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        delays = ()
    if not delays or any(not 0 < delay <= 3600 for delay in delays):
        raise typer.BadParameter(
            f"{text!r} is not a list of seconds between 0 and 3600, such as 0.5,1,2,4,8.",
            param_hint="--webhook-retry-delays",
        )
    return delays


@app.command("setup")
def setup(
    ctx: typer.Context,
    webhook_url: Annotated[
        str, typer.Option("--webhook-url", help="Where Stripe sends webhook events.")
    ] = "http://127.0.0.1:8000/api/webhooks/stripe",
    test_clock: Annotated[
        bool, typer.Option("--test-clock", help="Also create a test clock for new customers.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Create the catalog and webhook endpoint at STRIPE_API_BASE; print the settings.

    `billing dev` does this by itself; this is for stacks it does not run (the
    compose `emulator` profile). Output lines can be appended to `.env`.
    """
    from tooling.catalog import ensure_catalog, ensure_test_clock, ensure_webhook_endpoint

    state = state_of(ctx)
    settings = state.settings
    client = state.stripe_client()
    catalog = ensure_catalog(
        client, settings.stripe_users_dimension, settings.stripe_requests_dimension
    )
    endpoint = ensure_webhook_endpoint(client, webhook_url, settings.stripe_webhook_secret or None)
    values = {
        "STRIPE_WEBHOOK_SECRET": endpoint.secret,
        "STRIPE_PRICE_ID": catalog.base_price_id,
        "STRIPE_USERS_PRICE_ID": catalog.users_price_id,
        "STRIPE_REQUESTS_PRICE_ID": catalog.requests_price_id,
    }
    if test_clock:
        values["STRIPE_TEST_CLOCK"] = ensure_test_clock(client, settings.stripe_test_clock)
    if as_json:
        print_json(values)
        return
    for key, value in values.items():
        typer.echo(f"{key}={value}")


def _at(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()


def _readable(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Boundary:
    """Period (or trial) ends on the clock close enough to cross in one stop.

    `at` is the first of them; `ends` says when each org's period ends (orgs
    created a few seconds apart end a few seconds apart).
    """

    at: int
    ends: dict[int, int]
    trial: bool

    @property
    def org_ids(self) -> list[int]:
        return sorted(self.ends)

    @property
    def kind(self) -> str:
        return "trial end" if self.trial else "period end"

    def describe(self) -> str:
        orgs = ", ".join(str(org_id) for org_id in self.org_ids)
        noun = "org" if len(self.org_ids) == 1 else "orgs"
        return f"the {self.kind} of {noun} {orgs} ({_readable(self.at)})"


def _target(
    client: stripe.StripeClient, clock_id: str, frozen: int, to: str | None, by: str | None,
    org_id: int | None,
) -> int:  # fmt: skip
    if (to is None) == (by is None):
        fail("Give exactly one of --to (a time, or period-end) and --by (a duration).")
    if org_id is not None and to != PERIOD_END:
        fail("--org goes with --to period-end.")
    if by is not None:
        return frozen + parse_duration(by, "--by")
    assert to is not None
    if to.strip().lower() != PERIOD_END:
        return int(parse_time(to).timestamp())
    ending = _next_period_end(client, clock_id, frozen, org_id)
    if ending is None:
        whose = f"org {org_id}'s subscription" if org_id is not None else "no subscription"
        if org_id is not None:
            fail(f"{whose} is not on test clock {clock_id}, or has no period end ahead.")
        fail(f"Test clock {clock_id} has {whose} with a period end ahead; create an org first.")
    return ending.at + PAST_FINALIZATION


@app.command("advance")
def advance(
    ctx: typer.Context,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="The new time (ISO 8601, naive = UTC), or `period-end`: past the next "
            "period or trial end and the hour in which its invoice finalizes.",
        ),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="How far to move, e.g. 30d, 12h, 1d12h, 90m."),
    ] = None,
    org_id: Annotated[
        int | None,
        typer.Option("--org", help="With --to period-end: this org's period end."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Advance the test clock new customers are attached to, period end by period end.

    Real Stripe time passes slowly enough for the worker to report a period's
    usage in the hour between the period end and the invoice's finalization. A
    test clock jumps; so the clock stops just past each period end on the way,
    waits until the orgs' workflows have made their final usage report for the
    period, and only then moves on. That also keeps each step under the
    emulator's (and Stripe's) limit of two billing intervals per advance, so any
    target can be reached in one command.
    """
    state = state_of(ctx)
    clock_id = state.settings.stripe_test_clock
    if not clock_id:
        fail("No test clock is configured (STRIPE_TEST_CLOCK); start `billing dev` first.")
    client = state.stripe_client()
    clock = client.v1.test_helpers.test_clocks.retrieve(clock_id)
    start = int(clock.frozen_time)
    target = _target(client, clock_id, start, to, by, org_id)
    if target < start:
        fail(f"The test clock is at {_at(start)} and cannot go back to {_at(target)}.")
    frozen = start
    crossed: list[Boundary] = []
    while frozen < target:
        ending = _next_period_end(client, clock_id, frozen)
        if ending is None or ending.at + REPORT_STOP >= target:
            if ending is not None and ending.at <= target:
                frozen = _advance_clock(client, clock_id, target)
                renewed = _renewed(client, clock_id, ending)
                if renewed.ends:
                    crossed.append(renewed)
                break
            frozen = _advance_clock(client, clock_id, target)
            break
        frozen = _advance_clock(client, clock_id, ending.at + REPORT_STOP)
        ending = _renewed(client, clock_id, ending)
        if not ending.ends:
            continue
        crossed.append(ending)
        late = run(_await_final_reports(state, ending.ends))
        for late_org in late:
            err.print(
                f"Org {late_org}: no final usage report for the period ending "
                f"{_at(ending.ends[late_org])} within {REPORT_WAIT:.0f} s (is the worker running?)."
            )
    upcoming = _next_period_end(client, clock_id, frozen)
    if as_json:
        print_json(
            {
                "id": clock_id,
                "frozen_time": _at(frozen),
                "status": "ready",
                "crossed": [
                    {"at": _at(b.at), "kind": b.kind, "org_ids": b.org_ids} for b in crossed
                ],
                "next_period_end": _at(upcoming.at) if upcoming else None,
            }
        )
        return
    out.print(f"Test clock {clock_id} is at {_at(frozen)}.")
    out.print(_crossing_summary(crossed, frozen, upcoming))


def _crossing_summary(crossed: list[Boundary], frozen: int, upcoming: Boundary | None) -> str:
    """One line: what the advance billed, or that it billed nothing and where the next end is."""
    if not crossed:
        after = (
            f"the next is {upcoming.describe()}; `--to period-end` goes past it"
            if upcoming
            else "no subscription on the clock has one ahead"
        )
        return f"Crossed no period or trial end, so nothing was billed; {after}."
    last = crossed[-1]
    passed = "; ".join(b.describe() for b in crossed)
    finalizes = max(last.ends.values()) + FINALIZATION
    if finalizes > frozen:
        return (
            f"Crossed {passed}; the invoice finalizes at {_readable(finalizes)}: "
            "advance past that to bill it."
        )
    invoices = "the invoices are" if sum(len(b.ends) for b in crossed) > 1 else "the invoice is"
    return f"Crossed {passed}; {invoices} finalized."


def _advance_clock(client: stripe.StripeClient, clock_id: str, to: int) -> int:
    clocks = client.v1.test_helpers.test_clocks
    clocks.advance(clock_id, {"frozen_time": to})
    deadline = time.monotonic() + ADVANCE_TIMEOUT
    with err.status(f"Advancing test clock {clock_id} to {_at(to)}…", spinner="dots"):
        while True:
            clock = clocks.retrieve(clock_id)
            if clock.status == "ready":
                return int(clock.frozen_time)
            if clock.status == "internal_failure":
                fail(f"The emulator failed to advance test clock {clock_id}.")
            if time.monotonic() > deadline:
                fail(f"Test clock {clock_id} still advances after {ADVANCE_TIMEOUT:.0f} s.")
            time.sleep(0.2)


def _clock_subscriptions(
    client: stripe.StripeClient, clock_id: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every subscription on the clock that belongs to an org, with the org's id."""
    customers = client.v1.customers.list({"test_clock": clock_id, "limit": 100})
    for customer in customers.auto_paging_iter():
        subs = client.v1.subscriptions.list({"customer": customer.id, "limit": 100})
        for sub in subs.auto_paging_iter():
            data = sub.to_dict()
            owner = (data.get("metadata") or {}).get("org_id")
            if owner and str(owner).isdigit():
                yield int(owner), data


def _next_period_end(
    client: stripe.StripeClient, clock_id: str, after: int, org_id: int | None = None
) -> Boundary | None:
    """The first period (or trial) end after `after` on the clock, with every other end
    that one stop just past it (`REPORT_STOP`) crosses too."""
    ends: dict[int, int] = {}
    trials: set[int] = set()
    for owner, data in _clock_subscriptions(client, clock_id):
        if data["status"] not in BILLED_STATUSES:
            continue
        if org_id is not None and owner != org_id:
            continue
        items = data["items"]["data"]
        trial_end = data.get("trial_end") if data["status"] == "trialing" else None
        end = trial_end or (items[0]["current_period_end"] if items else None)
        if not end or end <= after:
            continue
        ends[owner] = min(int(end), ends.get(owner, int(end)))
        if trial_end:
            trials.add(owner)
    if not ends:
        return None
    first = min(ends.values())
    near = {owner: end for owner, end in ends.items() if end < first + REPORT_STOP}
    return Boundary(first, near, all(owner in trials for owner in near))


def _renewed(client: stripe.StripeClient, clock_id: str, boundary: Boundary) -> Boundary:
    """The boundary's orgs whose subscription did renew there.

    One that ended on the way (a failed payment's retries ran out and Stripe
    canceled it, say) crossed no period end, and no renewal report will come.
    """
    kept: dict[int, int] = {}
    for owner, data in _clock_subscriptions(client, clock_id):
        items = data["items"]["data"]
        end = boundary.ends.get(owner)
        if end is None or not items or data["status"] not in BILLED_STATUSES:
            continue
        if int(items[0]["current_period_start"]) >= end:
            kept[owner] = end
    return Boundary(boundary.at, kept, boundary.trial)


async def _await_final_reports(state: CliState, ends: dict[int, int]) -> list[int]:
    """The orgs whose workflow has not reported the period ending at `ends[org]` in time."""
    try:
        client = await state.temporal()
    except TemporalUnavailableError:
        return sorted(ends)
    pending = set(ends)
    deadline = time.monotonic() + REPORT_WAIT
    with err.status(f"Waiting for the usage reports of {len(pending)} org(s)…", spinner="dots"):
        while pending and time.monotonic() < deadline:
            for org_id, live in (await live_states(client, sorted(pending))).items():
                ended = datetime.fromtimestamp(ends[org_id], tz=UTC)
                if live.state is not None and _final_report_done(live.state, ended):
                    pending.discard(org_id)
            if pending:
                await asyncio.sleep(0.5)
    return sorted(pending)


def _final_report_done(billing: OrgBillingState, ended: datetime) -> bool:
    if billing.status.value not in BILLED_STATUSES and not billing.to_finalize:
        # The subscription ended on the way (a failed payment's retries ran out, say):
        # its last period was reported up to its end, and no renewal will come.
        return True
    if billing.current_period_start is None or billing.current_period_start < ended:
        return False  # the renewal has not reached the workflow yet
    if any(period.start < ended <= period.end for period in billing.to_finalize):
        return False  # seen to have ended; its final report is still owed
    report = next((u for u in billing.usage if u.period_end == ended), None)
    return report is not None and report.last_reported_at is not None


@app.command("card")
def card(
    ctx: typer.Context,
    org_id: Annotated[int, typer.Argument(help="The org's id.")],
    failing: Annotated[
        bool, typer.Option("--failing", help=f"Attach {FAILING_CARD}: charges are declined.")
    ] = False,
    working: Annotated[
        bool, typer.Option("--working", help=f"Attach {WORKING_CARD}: charges succeed.")
    ] = False,
) -> None:
    """Make a failing or a working test card the default of the org's customer."""
    if failing == working:
        fail("Choose exactly one of --failing and --working.")
    state = state_of(ctx)
    with state.session() as session:
        customer_id = orgs.get_org(session, org_id).stripe_customer_id
    if not customer_id:
        fail(f"Org {org_id} has no Stripe customer yet; run `billing provision {org_id}` first.")
    client = state.stripe_client()
    token = FAILING_CARD if failing else WORKING_CARD
    method = client.v1.payment_methods.attach(token, {"customer": customer_id})
    client.v1.customers.update(
        customer_id, {"invoice_settings": {"default_payment_method": method.id}}
    )
    kind = "failing" if failing else "working"
    out.print(f"Org {org_id} ({customer_id}) now pays with a {kind} card ({method.id}).")
