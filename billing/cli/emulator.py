"""`billing emulator ...`: run the Stripe emulator, move its test clock, swap test cards."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from billing import services
from billing.cli.context import err, fail, out, print_json, state_of
from billing.cli.request_log import parse_time

app = typer.Typer(help="The Stripe emulator (development only).", no_args_is_help=True)

FAILING_CARD = "pm_card_chargeCustomerFail"
WORKING_CARD = "pm_card_visa"
ADVANCE_TIMEOUT = 120.0


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 12111,
    state_file: Annotated[
        Path | None, typer.Option("--state-file", help="Keep the emulator's data in this file.")
    ] = None,
) -> None:
    """Run the Stripe emulator alone, until interrupted."""
    from stripe_emulator.server import serve as serve_emulator

    serve_emulator(host, port, str(state_file) if state_file else None)


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
    from billing.stripe_setup import ensure_catalog, ensure_test_clock, ensure_webhook_endpoint

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


@app.command("advance")
def advance(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="The new time (ISO 8601, naive = UTC).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Advance the test clock new customers are attached to, and wait until it settles."""
    state = state_of(ctx)
    target = int(parse_time(to).timestamp())
    clock_id = state.settings.stripe_test_clock
    if not clock_id:
        fail("No test clock is configured (STRIPE_TEST_CLOCK); start `billing dev` first.")
    client = state.stripe_client()
    clocks = client.v1.test_helpers.test_clocks
    clock = clocks.retrieve(clock_id)
    if target < clock.frozen_time:
        fail(f"The test clock is at {_at(clock.frozen_time)} and cannot go back to {_at(target)}.")
    if target > clock.frozen_time:
        clocks.advance(clock_id, {"frozen_time": target})
        deadline = time.monotonic() + ADVANCE_TIMEOUT
        with err.status(f"Advancing test clock {clock_id} to {_at(target)}…", spinner="dots"):
            while True:
                clock = clocks.retrieve(clock_id)
                if clock.status == "ready":
                    break
                if clock.status == "internal_failure":
                    fail(f"The emulator failed to advance test clock {clock_id}.")
                if time.monotonic() > deadline:
                    fail(f"Test clock {clock_id} still advances after {ADVANCE_TIMEOUT:.0f} s.")
                time.sleep(0.2)
    if as_json:
        print_json({"id": clock.id, "frozen_time": _at(clock.frozen_time), "status": clock.status})
        return
    out.print(f"Test clock {clock.id} is at {_at(clock.frozen_time)}.")


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
        customer_id = services.get_org(session, org_id).stripe_customer_id
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
