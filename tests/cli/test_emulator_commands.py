"""`billing emulator advance` and `billing emulator card` against the emulator over HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import stripe
from sqlalchemy.orm import Session, sessionmaker

from billing.db.models import Org
from stripe_emulator.server import EmulatorServer
from tests.cli.conftest import Invoke, assert_clean_error


def _stripe_env(emulator: EmulatorServer, **extra: str | None) -> dict[str, str | None]:
    return {"STRIPE_API_BASE": emulator.url, "STRIPE_SECRET_KEY": "sk_test_cli", **extra}


def test_advance_moves_the_clock_forward_only(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock = stripe_client.v1.test_helpers.test_clocks.create(
        {"frozen_time": int(start.timestamp())}
    )
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock.id)

    moved = invoke("emulator", "advance", "--to", "2030-01-15T00:00:00Z", "--json", env=env)
    back = invoke("emulator", "advance", "--to", "2030-01-02T00:00:00", env=env)

    assert moved.exit_code == 0, moved.output
    document = json.loads(moved.stdout)
    assert document["status"] == "ready"
    assert document["frozen_time"] == (start + timedelta(days=14)).isoformat()
    assert_clean_error(back, "cannot go back")


def test_advance_needs_a_clock(invoke: Invoke, emulator: EmulatorServer) -> None:
    result = invoke(
        "emulator", "advance", "--to", "2030-01-15T00:00:00Z", env=_stripe_env(emulator)
    )

    assert_clean_error(result, "STRIPE_TEST_CLOCK")


def test_card_sets_the_default_payment_method(
    invoke: Invoke,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
) -> None:
    org = json.loads(
        invoke(
            "orgs", "create", "--name", "Acme", "--owner-email", "ada@acme.test", "--json"
        ).stdout
    )["org"]
    no_customer = invoke("emulator", "card", str(org["id"]), "--failing", env=_stripe_env(emulator))
    customer = stripe_client.v1.customers.create({"email": "ada@acme.test"})
    with session_factory.begin() as session:
        row = session.get(Org, org["id"])
        assert row is not None
        row.stripe_customer_id = customer.id

    failing = invoke("emulator", "card", str(org["id"]), "--failing", env=_stripe_env(emulator))
    after_failing = stripe_client.v1.customers.retrieve(customer.id)
    working = invoke("emulator", "card", str(org["id"]), "--working", env=_stripe_env(emulator))
    after_working = stripe_client.v1.customers.retrieve(customer.id)
    both = invoke(
        "emulator", "card", str(org["id"]), "--working", "--failing", env=_stripe_env(emulator)
    )

    assert_clean_error(no_customer, "has no Stripe customer yet")
    assert failing.exit_code == 0, failing.output
    assert working.exit_code == 0, working.output
    assert after_failing.invoice_settings is not None
    assert after_working.invoice_settings is not None
    failing_pm = after_failing.invoice_settings.default_payment_method
    working_pm = after_working.invoice_settings.default_payment_method
    assert failing_pm and working_pm and failing_pm != working_pm
    assert_clean_error(both, "exactly one")


def test_setup_prints_settings_and_is_idempotent(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    first = invoke(
        "emulator",
        "setup",
        "--webhook-url",
        "http://api:8000/api/webhooks/stripe",
        "--json",
        env=_stripe_env(emulator),
    )
    values = json.loads(first.stdout)
    again = invoke(
        "emulator",
        "setup",
        "--webhook-url",
        "http://api:8000/api/webhooks/stripe",
        env=_stripe_env(emulator, STRIPE_WEBHOOK_SECRET=values["STRIPE_WEBHOOK_SECRET"]),
    )

    assert first.exit_code == 0, first.output
    assert values["STRIPE_WEBHOOK_SECRET"].startswith("whsec_")
    lines = dict(line.split("=", 1) for line in again.stdout.split())
    assert lines == values
    assert len(stripe_client.v1.webhook_endpoints.list().data) == 1


def _subscribed_org(
    stripe_client: stripe.StripeClient, clock_id: str, org_id: int, trial_days: int = 30
) -> stripe.Subscription:
    """A subscription on the clock, tagged with an org id as the workflow tags its own."""
    price = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount": 4900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Base"},
        }
    )
    customer = stripe_client.v1.customers.create({"name": f"org {org_id}", "test_clock": clock_id})
    card = stripe_client.v1.payment_methods.attach("pm_card_visa", {"customer": customer.id})
    stripe_client.v1.customers.update(
        customer.id, {"invoice_settings": {"default_payment_method": card.id}}
    )
    return stripe_client.v1.subscriptions.create(
        {
            "customer": customer.id,
            "items": [{"price": price.id}],
            "trial_period_days": trial_days,
            "metadata": {"org_id": str(org_id)},
        }
    )


def _clock(stripe_client: stripe.StripeClient, start: datetime) -> str:
    clock = stripe_client.v1.test_helpers.test_clocks.create(
        {"frozen_time": int(start.timestamp())}
    )
    return clock.id


def test_advance_by_a_duration_that_crosses_nothing_says_so(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    start = datetime(2031, 1, 30, 9, 15, tzinfo=UTC)
    clock_id = _clock(stripe_client, start)
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock_id)
    empty = invoke("emulator", "advance", "--by", "1d12h", env=env)
    sub = _subscribed_org(stripe_client, clock_id, 41)
    quiet = invoke("emulator", "advance", "--by", "3d", env=env)

    assert empty.exit_code == 0, empty.output
    assert f"is at {(start + timedelta(days=1, hours=12)).isoformat()}" in empty.stdout
    assert "Crossed no period or trial end" in empty.stdout
    assert "no subscription on the clock" in empty.stdout
    assert quiet.exit_code == 0, quiet.output
    lines = quiet.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    trial_end = datetime.fromtimestamp(int(sub.trial_end or 0), UTC)
    assert lines[1] == (
        "Crossed no period or trial end, so nothing was billed; the next is the trial end "
        f"of org 41 ({trial_end:%Y-%m-%d %H:%M} UTC); `--to period-end` goes past it."
    )


def test_advance_to_period_end_goes_past_the_invoice_hour_on_any_date(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    clock_id = _clock(stripe_client, datetime(2031, 1, 30, 9, 15, tzinfo=UTC))
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock_id)
    sub = _subscribed_org(stripe_client, clock_id, 42)
    _subscribed_org(stripe_client, clock_id, 43, trial_days=45)
    trial_end = int(sub.trial_end or 0)

    first = invoke("emulator", "advance", "--to", "period-end", "--json", env=env)
    after_trial = stripe_client.v1.subscriptions.retrieve(sub.id)
    second = invoke("emulator", "advance", "--to", "period-end", "--org", "42", "--json", env=env)
    renewed_sub = stripe_client.v1.subscriptions.retrieve(sub.id)

    assert first.exit_code == 0, first.output
    assert after_trial.status == "active"
    moved = json.loads(first.stdout)
    assert moved["frozen_time"] == datetime.fromtimestamp(trial_end + 4200, UTC).isoformat()
    assert [(c["kind"], c["org_ids"]) for c in moved["crossed"]] == [("trial end", [42])]
    assert second.exit_code == 0, second.output
    renewed = json.loads(second.stdout)
    # Org 43's trial end lies before org 42's first renewal: both are crossed, in order.
    assert [(c["kind"], c["org_ids"]) for c in renewed["crossed"]] == [
        ("trial end", [43]),
        ("period end", [42]),
    ]
    # The renewal the second advance crossed began this period (Jan 30 + 30 days + 1 month).
    period_end = int(renewed_sub.to_dict()["items"]["data"][0]["current_period_start"])
    assert datetime.fromtimestamp(period_end, UTC) == datetime(2031, 4, 1, 9, 15, tzinfo=UTC)
    assert renewed["frozen_time"] == datetime.fromtimestamp(period_end + 4200, UTC).isoformat()


def test_a_long_advance_steps_through_every_period_end(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    """Stripe refuses more than two intervals in one advance; the command gets there anyway."""
    start = datetime(2031, 1, 30, 9, 15, tzinfo=UTC)
    clock_id = _clock(stripe_client, start)
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock_id)
    _subscribed_org(stripe_client, clock_id, 44, trial_days=0)
    raw = None
    try:
        stripe_client.v1.test_helpers.test_clocks.advance(
            clock_id, {"frozen_time": int((start + timedelta(days=100)).timestamp())}
        )
    except stripe.InvalidRequestError as refused:
        raw = refused

    moved = invoke("emulator", "advance", "--by", "100d", "--json", env=env)

    assert raw is not None and "two intervals" in str(raw)
    assert moved.exit_code == 0, moved.output
    document = json.loads(moved.stdout)
    assert document["frozen_time"] == (start + timedelta(days=100)).isoformat()
    assert len(document["crossed"]) == 3  # Feb 28, Mar 30, Apr 30 (clamped, anchored)


def test_advance_refuses_what_it_cannot_read(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    clock_id = _clock(stripe_client, datetime(2031, 1, 30, tzinfo=UTC))
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock_id)

    assert_clean_error(invoke("emulator", "advance", "--by", "a month", env=env), "duration")
    assert_clean_error(invoke("emulator", "advance", "--by", "0d", env=env), "positive")
    assert_clean_error(invoke("emulator", "advance", env=env), "exactly one of --to")
    assert_clean_error(
        invoke("emulator", "advance", "--to", "period-end", "--by", "1d", env=env),
        "exactly one of --to",
    )
    assert_clean_error(
        invoke("emulator", "advance", "--to", "period-end", env=env), "create an org first"
    )
    assert_clean_error(
        invoke("emulator", "advance", "--to", "period-end", "--org", "9", env=env),
        "org 9's subscription is not on test clock",
    )


def test_an_advance_that_stops_before_the_invoice_hour_says_what_is_left(
    invoke: Invoke, emulator: EmulatorServer, stripe_client: stripe.StripeClient
) -> None:
    clock_id = _clock(stripe_client, datetime(2031, 1, 30, 9, 15, tzinfo=UTC))
    env = _stripe_env(emulator, STRIPE_TEST_CLOCK=clock_id)
    _subscribed_org(stripe_client, clock_id, 45, trial_days=1)

    moved = invoke("emulator", "advance", "--by", "1d30m", env=env)

    assert moved.exit_code == 0, moved.output
    assert moved.stdout.strip().splitlines()[1] == (
        "Crossed the trial end of org 45 (2031-01-31 09:15 UTC); the invoice finalizes at "
        "2031-01-31 10:15 UTC: advance past that to bill it."
    )
