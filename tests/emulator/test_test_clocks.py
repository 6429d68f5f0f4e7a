"""Test clocks: trials end, periods renew and bill usage, cancellations land on time."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
import stripe
from stripe.params import SubscriptionCreateParams, SubscriptionCreateParamsTrialSettings

from stripe_emulator.server import EmulatorServer
from stripe_emulator.timeutil import add_interval
from tests.emulator.helpers import Catalog, make_catalog, subscription_items

DAY = 86400
HOUR = 3600
T0 = int(datetime(2026, 1, 31, 12, 0, tzinfo=UTC).timestamp())


def on_clock(
    client: stripe.StripeClient, card: str | None, frozen_time: int = T0
) -> tuple[stripe.test_helpers.TestClock, stripe.Customer]:
    clock = client.v1.test_helpers.test_clocks.create(
        params={"frozen_time": frozen_time, "name": "t"}
    )
    customer = client.v1.customers.create(
        params={"email": "org@example.com", "test_clock": clock.id, "metadata": {"org_id": "1"}}
    )
    if card is not None:
        pm = client.v1.payment_methods.attach(card, params={"customer": customer.id})
        customer = client.v1.customers.update(
            customer.id, params={"invoice_settings": {"default_payment_method": pm.id}}
        )
    return clock, customer


def advance(client: stripe.StripeClient, clock_id: str, to: int) -> None:
    clock = client.v1.test_helpers.test_clocks.advance(clock_id, params={"frozen_time": to})
    assert clock.status == "ready" and clock.frozen_time == to


def events_of(client: stripe.StripeClient, event_type: str) -> list[stripe.Event]:
    return list(client.v1.events.list(params={"type": event_type, "limit": 100}).data)


def trial_sub(
    client: stripe.StripeClient,
    catalog: Catalog,
    customer: stripe.Customer,
    trial_settings: SubscriptionCreateParamsTrialSettings | None = None,
) -> stripe.Subscription:
    params: SubscriptionCreateParams = {
        "customer": customer.id,
        "items": subscription_items(catalog),
        "trial_period_days": 30,
        "metadata": {"org_id": "1"},
    }
    if trial_settings is not None:
        params["trial_settings"] = trial_settings
    return client.v1.subscriptions.create(params=params)


def test_clock_crud(client: stripe.StripeClient) -> None:
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": T0, "name": "a"})
    assert clock.id.startswith("clock_") and clock.status == "ready"
    assert client.v1.test_helpers.test_clocks.retrieve(clock.id).frozen_time == T0
    assert [c.id for c in client.v1.test_helpers.test_clocks.list().data] == [clock.id]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.test_helpers.test_clocks.advance(clock.id, params={"frozen_time": T0 - 1})
    with pytest.raises(stripe.InvalidRequestError, match="two intervals"):
        client.v1.test_helpers.test_clocks.advance(
            clock.id, params={"frozen_time": T0 + 3 * 366 * DAY}
        )
    _, customer = on_clock(client, None)
    deleted = client.v1.test_helpers.test_clocks.delete(clock.id)
    assert deleted.deleted
    assert client.v1.customers.retrieve(customer.id).id == customer.id


def test_trial_to_active_with_working_card(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = trial_sub(client, catalog, customer)
    trial_end = T0 + 30 * DAY
    assert sub.status == "trialing" and sub.trial_end == trial_end and sub.trial_start == T0
    assert sub.test_clock == clock.id
    first = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert first.status == "paid" and first.amount_due == 0
    assert first.billing_reason == "subscription_create"

    advance(client, clock.id, trial_end + 2 * HOUR)
    sub = client.v1.subscriptions.retrieve(sub.id, params={"expand": ["latest_invoice"]})
    assert sub.status == "active"
    item = sub["items"].data[0]
    assert item.current_period_start == trial_end
    assert item.current_period_end == add_interval(trial_end, "month", 1)
    invoice = sub.latest_invoice
    assert isinstance(invoice, stripe.Invoice)
    assert invoice.status == "paid" and invoice.amount_paid == 2000 and invoice.attempt_count == 1
    assert invoice.parent is not None and invoice.parent.subscription_details is not None
    assert invoice.parent.subscription_details.subscription == sub.id
    details_metadata = invoice.parent.subscription_details.metadata
    assert details_metadata is not None and details_metadata.to_dict() == {"org_id": "1"}
    base_line = invoice.lines.data[0]
    assert base_line.pricing is not None and base_line.pricing.price_details is not None
    assert base_line.pricing.price_details.price == catalog.base.id
    assert base_line.period.start == trial_end and base_line.quantity == 1
    paid = events_of(client, "invoice.payment_succeeded")
    assert paid[0].data.object["id"] == invoice.id
    assert paid[0].created == trial_end + HOUR


def test_trial_to_past_due_with_failing_card(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_chargeCustomerFail")
    sub = trial_sub(client, catalog, customer)
    advance(client, clock.id, T0 + 30 * DAY + 2 * HOUR)
    sub = client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "past_due"
    invoice = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert invoice.status == "open" and invoice.attempt_count == 1
    assert invoice.next_payment_attempt == T0 + 30 * DAY + HOUR + 3 * DAY
    failed = events_of(client, "invoice.payment_failed")
    assert [e.data.object["id"] for e in failed] == [invoice.id]
    updates = events_of(client, "customer.subscription.updated")
    assert updates[0].data.object["status"] == "past_due"
    assert updates[0].data.previous_attributes is not None
    assert updates[0].data.previous_attributes.to_dict() == {"status": "active"}


def test_trial_without_payment_method(
    client: stripe.StripeClient, emulator: EmulatorServer
) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, None)
    paused = trial_sub(
        client,
        catalog,
        customer,
        trial_settings={"end_behavior": {"missing_payment_method": "pause"}},
    )
    plain = trial_sub(client, catalog, customer)
    dropped = trial_sub(
        client,
        catalog,
        customer,
        trial_settings={"end_behavior": {"missing_payment_method": "cancel"}},
    )
    advance(client, clock.id, T0 + 30 * DAY + 2 * HOUR)
    assert client.v1.subscriptions.retrieve(paused.id).status == "paused"
    assert client.v1.subscriptions.retrieve(plain.id).status == "past_due"
    ended = client.v1.subscriptions.retrieve(dropped.id)
    assert ended.status == "canceled" and ended.ended_at == T0 + 30 * DAY
    assert [e.data.object["id"] for e in events_of(client, "customer.subscription.paused")] == [
        paused.id
    ]
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    client.v1.customers.update(
        customer.id, params={"invoice_settings": {"default_payment_method": pm.id}}
    )
    resumed = client.v1.subscriptions.resume(paused.id)
    assert resumed.status == "active"
    assert resumed["items"].data[0].current_period_start == T0 + 30 * DAY + 2 * HOUR
    assert events_of(client, "customer.subscription.resumed")

    httpx.post(
        f"{emulator.url}/_emulator/settings", json={"missing_payment_method_succeeds": True}
    ).raise_for_status()
    clock2, customer2 = on_clock(client, None)
    lenient = trial_sub(client, catalog, customer2)
    advance(client, clock2.id, T0 + 30 * DAY + 2 * HOUR)
    assert client.v1.subscriptions.retrieve(lenient.id).status == "active"


def test_trial_will_end_three_days_before(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = trial_sub(client, catalog, customer)
    notice = T0 + 27 * DAY
    advance(client, clock.id, notice - 1)
    assert events_of(client, "customer.subscription.trial_will_end") == []
    advance(client, clock.id, notice + 1)
    [event] = events_of(client, "customer.subscription.trial_will_end")
    assert event.created == notice and event.data.object["id"] == sub.id


def test_trial_end_now_ends_the_trial_immediately(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = trial_sub(client, catalog, customer)
    advance(client, clock.id, T0 + 5 * DAY)
    ended = client.v1.subscriptions.update(sub.id, params={"trial_end": "now"})
    assert ended.status == "active"
    assert ended.trial_end == T0 + 5 * DAY
    invoice = client.v1.invoices.retrieve(str(ended.latest_invoice))
    assert invoice.status == "paid" and invoice.amount_paid == 2000
    assert events_of(client, "customer.subscription.trial_will_end")


def report(
    client: stripe.StripeClient, customer: str, event: str, value: int, at: int, ident: str
) -> None:
    client.v1.billing.meter_events.create(
        params={
            "event_name": event,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "timestamp": at,
            "identifier": ident,
        }
    )


def lines_by_price(invoice: stripe.Invoice) -> dict[str, stripe.InvoiceLineItem]:
    out = {}
    for line in invoice.lines.data:
        assert line.pricing is not None and line.pricing.price_details is not None
        out[str(line.pricing.price_details.price)] = line
    return out


def test_periods_bill_metered_usage_by_sum_and_last(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": subscription_items(catalog)}
    )
    assert sub.status == "active"
    first_end = add_interval(T0, "month", 1)
    assert sub["items"].data[0].current_period_end == first_end  # Jan 31 -> Feb 28
    assert datetime.fromtimestamp(first_end, UTC).day == 28

    advance(client, clock.id, T0 + 21 * DAY)
    report(client, customer.id, "additional_users", 4, T0 + 20 * DAY, "u3")
    report(client, customer.id, "additional_users", 3, T0 + 1 * DAY, "u1")
    report(client, customer.id, "additional_users", 5, T0 + 10 * DAY, "u2")
    report(client, customer.id, "additional_requests", 100, T0 + 2 * DAY, "r1")
    report(client, customer.id, "additional_requests", 250, T0 + 15 * DAY, "r2")
    advance(client, clock.id, first_end + 30 * 60)
    # Inside the grace hour: usage dated in the ended period still counts.
    report(client, customer.id, "additional_requests", 50, first_end - 60, "r3")
    report(client, customer.id, "additional_requests", 7, first_end + 60, "r4")
    advance(client, clock.id, first_end + 2 * HOUR)

    sub = client.v1.subscriptions.retrieve(sub.id)
    invoice = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert invoice.billing_reason == "subscription_cycle"
    assert invoice.status == "paid"
    assert (invoice.period_start, invoice.period_end) == (T0, first_end)
    lines = lines_by_price(invoice)
    assert lines[catalog.users.id].quantity == 4 and lines[catalog.users.id].amount == 2000
    assert lines[catalog.requests.id].quantity == 400 and lines[catalog.requests.id].amount == 400
    assert lines[catalog.base.id].period.start == first_end
    assert invoice.amount_paid == 2000 + 2000 + 400

    second_end = add_interval(T0, "month", 2)  # Mar 31: counted from the anchor
    assert datetime.fromtimestamp(second_end, UTC).day == 31
    advance(client, clock.id, first_end + 4 * DAY)
    report(client, customer.id, "additional_users", 9, first_end + DAY, "u4")
    report(client, customer.id, "additional_users", 2, first_end + 3 * DAY, "u5")
    advance(client, clock.id, second_end + 2 * HOUR)
    sub = client.v1.subscriptions.retrieve(sub.id)
    assert sub["items"].data[0].current_period_start == second_end
    second = client.v1.invoices.retrieve(str(sub.latest_invoice))
    lines = lines_by_price(second)
    assert lines[catalog.users.id].quantity == 2
    assert lines[catalog.requests.id].quantity == 7
    summaries = client.v1.billing.meters.event_summaries.list(
        catalog.requests_meter.id,
        params={"customer": customer.id, "start_time": T0, "end_time": first_end},
    )
    assert summaries.data[0].aggregated_value == 400
    invoices = client.v1.invoices.list(params={"subscription": sub.id})
    assert [i.billing_reason for i in invoices.data] == [
        "subscription_cycle",
        "subscription_cycle",
        "subscription_create",
    ]


def test_cancel_at_period_end_ends_the_subscription_on_time(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": subscription_items(catalog)}
    )
    period_end = sub["items"].data[0].current_period_end
    advance(client, clock.id, T0 + 3 * DAY)
    updated = client.v1.subscriptions.update(sub.id, params={"cancel_at_period_end": True})
    assert updated.status == "active" and updated.cancel_at == period_end
    assert updated.canceled_at == T0 + 3 * DAY
    advance(client, clock.id, period_end - 1)
    assert client.v1.subscriptions.retrieve(sub.id).status == "active"
    advance(client, clock.id, period_end + DAY)
    ended = client.v1.subscriptions.retrieve(sub.id)
    assert ended.status == "canceled" and ended.ended_at == period_end
    [deleted] = events_of(client, "customer.subscription.deleted")
    assert deleted.created == period_end
    assert len(client.v1.invoices.list(params={"subscription": sub.id}).data) == 1


def test_events_come_in_chronological_order(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_chargeCustomerFail")
    trial_sub(client, catalog, customer)
    advance(client, clock.id, T0 + 45 * DAY)
    events = list(client.v1.events.list(params={"limit": 100}).auto_paging_iter())
    events.reverse()
    events = [e for e in events if e.type.startswith(("customer.subscription.", "invoice."))]
    created = [e.created for e in events]
    assert created == sorted(created)
    types = [e.type for e in events]
    assert types.index("customer.subscription.trial_will_end") < types.index(
        "invoice.payment_failed"
    )
    retries = [e for e in events if e.type == "invoice.payment_failed"]
    assert [e.created - retries[0].created for e in retries] == [0, 3 * DAY, 8 * DAY]


@pytest.mark.parametrize(("behavior", "status"), [("void", "void"), ("keep_as_draft", "draft")])
def test_pause_collection_keeps_the_subscription_active(
    client: stripe.StripeClient, behavior: str, status: str
) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_chargeCustomerFail")
    sub = trial_sub(client, catalog, customer)
    client.v1.subscriptions.update(
        sub.id,
        params={"pause_collection": {"behavior": behavior}},
    )
    advance(client, clock.id, T0 + 30 * DAY + 2 * HOUR)
    sub = client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "active"
    invoice = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert invoice.status == status and invoice.attempt_count == 0
    assert events_of(client, "invoice.payment_failed") == []


def test_unpaid_invoices_end_the_subscription_after_the_retries(
    client: stripe.StripeClient,
) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_chargeCustomerFail")
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "trial_end": T0 + DAY,
        }
    )
    advance(client, clock.id, T0 + 20 * DAY)
    ended = client.v1.subscriptions.retrieve(sub.id)
    assert ended.status == "canceled"
    assert ended.cancellation_details is not None
    assert ended.cancellation_details.reason == "payment_failed"
    assert len(events_of(client, "invoice.payment_failed")) == 4


def test_cancel_at_ends_mid_period(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    clock, customer = on_clock(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "cancel_at": T0 + 10 * DAY,
        }
    )
    assert sub.cancel_at == T0 + 10 * DAY and not sub.cancel_at_period_end
    advance(client, clock.id, T0 + 11 * DAY)
    ended = client.v1.subscriptions.retrieve(sub.id)
    assert ended.status == "canceled" and ended.ended_at == T0 + 10 * DAY
    assert ended.canceled_at == T0
