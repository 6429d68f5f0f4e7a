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
    result = invoke("emulator", "advance", "--to", "2030-01-15T00:00:00Z",
                    env=_stripe_env(emulator))

    assert_clean_error(result, "STRIPE_TEST_CLOCK")


def test_card_sets_the_default_payment_method(
    invoke: Invoke,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
) -> None:
    org = json.loads(
        invoke("orgs", "create", "--name", "Acme", "--owner-email", "ada@acme.test",
               "--json").stdout
    )["org"]
    no_customer = invoke("emulator", "card", str(org["id"]), "--failing",
                         env=_stripe_env(emulator))
    customer = stripe_client.v1.customers.create({"email": "ada@acme.test"})
    with session_factory.begin() as session:
        row = session.get(Org, org["id"])
        assert row is not None
        row.stripe_customer_id = customer.id

    failing = invoke("emulator", "card", str(org["id"]), "--failing", env=_stripe_env(emulator))
    after_failing = stripe_client.v1.customers.retrieve(customer.id)
    working = invoke("emulator", "card", str(org["id"]), "--working", env=_stripe_env(emulator))
    after_working = stripe_client.v1.customers.retrieve(customer.id)
    both = invoke("emulator", "card", str(org["id"]), "--working", "--failing",
                  env=_stripe_env(emulator))

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
    first = invoke("emulator", "setup", "--webhook-url", "http://api:8000/api/webhooks/stripe",
                   "--json", env=_stripe_env(emulator))
    values = json.loads(first.stdout)
    again = invoke("emulator", "setup", "--webhook-url", "http://api:8000/api/webhooks/stripe",
                   env=_stripe_env(emulator, STRIPE_WEBHOOK_SECRET=values["STRIPE_WEBHOOK_SECRET"]))

    assert first.exit_code == 0, first.output
    assert values["STRIPE_WEBHOOK_SECRET"].startswith("whsec_")
    lines = dict(line.split("=", 1) for line in again.stdout.split())
    assert lines == values
    assert len(stripe_client.v1.webhook_endpoints.list().data) == 1
