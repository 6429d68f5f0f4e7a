"""`billing requests record`: add to an org's request log (what the requests meter counts);
`billing requests prune`: delete rows no report can bill any more."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from billing.db import orgs
from tooling.cli.context import CliState, fail, out, print_json, state_of

app = typer.Typer(help="Record requests an org made.", no_args_is_help=True)


_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:\d+[wdhms])+")


def parse_duration(value: str, option: str) -> int:
    """Seconds in `30d`, `12h`, `1d12h`, `90m` (weeks, days, hours, minutes, seconds)."""
    text = value.strip().lower()
    if not _DURATION.fullmatch(text):
        fail(f"{option} {value!r} is not a duration (for example 30d, 12h, 1d12h or 90m).")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+)([wdhms])", text))
    if seconds <= 0:
        fail(f"{option} {value!r} is no time at all; give a positive duration.")
    return seconds


def parse_time(value: str) -> datetime:
    """ISO 8601 with a timezone; a time without one is taken as UTC."""
    if not value.strip():
        fail("--at is empty; give an ISO 8601 time or leave it out for now.")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        fail(f"{value!r} is not an ISO 8601 time (for example 2025-01-31T12:00:00Z).")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _now(state: CliState) -> datetime:
    """Now, as Stripe sees it: on the emulator's test clock, the clock's time.

    Otherwise requests recorded after `billing emulator advance` would land in a
    period that ended (in Stripe's eyes) long ago.
    """
    clock_id = state.settings.stripe_test_clock
    if not clock_id:
        return datetime.now(UTC)
    clock = state.stripe_client().v1.test_helpers.test_clocks.retrieve(clock_id)
    return datetime.fromtimestamp(clock.frozen_time, tz=UTC)


@app.command("record")
def record(
    ctx: typer.Context,
    org_id: Annotated[int, typer.Argument(help="The org's id.")],
    count: Annotated[int, typer.Option("--count", help="How many requests (at least 1).")],
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="When they happened: ISO 8601, or a duration ago such as -2h or -3d "
            "(default now: the test clock's time when STRIPE_TEST_CLOCK is set).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Add N requests to the org's request log."""
    if count < 1:
        fail(f"--count must be at least 1, not {count}.")
    state = state_of(ctx)
    if at is None:
        when = _now(state)
    elif at.strip().startswith("-"):
        when = _now(state) - timedelta(seconds=parse_duration(at.strip()[1:], "--at"))
    else:
        when = parse_time(at)
    with state.session() as session:
        row = orgs.record_requests(session, org_id, count, when)
        total = orgs.request_total(session, org_id)
    if as_json:
        print_json(
            {"org_id": org_id, "count": row.count, "occurred_at": row.occurred_at, "total": total}
        )
        return
    out.print(
        f"Recorded {count} requests for org {org_id} at {when.isoformat()}; {total} in total."
    )


PRUNE_BATCH = 50_000
MAX_PRUNE_BATCHES = 100_000


@app.command("prune")
def prune(
    ctx: typer.Context,
    older_than_days: Annotated[
        int,
        typer.Option(
            "--older-than-days",
            help="Delete rows older than this many days (at least 66: younger ones may "
            "still be billed).",
        ),
    ] = 90,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per transaction.")
    ] = PRUNE_BATCH,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Delete request-log rows older than the billable window, in batches."""
    if older_than_days < 0 or older_than_days > 36_600:
        fail(f"--older-than-days must be between 66 and 36600, not {older_than_days}.")
    state = state_of(ctx)
    now = _now(state)
    before = now - timedelta(days=older_than_days)
    deleted = 0
    for _ in range(MAX_PRUNE_BATCHES):
        with state.session() as session:
            batch = orgs.prune_requests(session, before=before, now=now, limit=batch_size)
        deleted += batch
        if batch < batch_size:
            break
    if as_json:
        print_json({"deleted": deleted, "before": before})
        return
    out.print(f"Deleted {deleted} request-log rows older than {before.isoformat()}.")
