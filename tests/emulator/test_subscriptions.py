"""Subscription verbs and invoices, in wall time (no test clock)."""

from __future__ import annotations

import pytest
import stripe

from stripe_emulator.server import EmulatorServer
from tests.emulator.helpers import Catalog, make_catalog, subscription_items


def customer_with(client: stripe.StripeClient, card: str | None) -> stripe.Customer:
    customer = client.v1.customers.create(params={"email": "s@x.io"})
    if card:
        pm = client.v1.payment_methods.attach(card, params={"customer": customer.id})
        customer = client.v1.customers.update(
            customer.id, params={"invoice_settings": {"default_payment_method": pm.id}}
        )
    return customer


@pytest.fixture
def catalog(client: stripe.StripeClient) -> Catalog:
    return make_catalog(client)


def test_create_shape_of_the_pinned_api_version(
    client: stripe.StripeClient, catalog: Catalog
) -> None:
    customer = customer_with(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "metadata": {"org_id": "9", "org_uid": "u9", "source": "test"},
            "automatic_tax": {"enabled": True},
            "payment_behavior": "allow_incomplete",
            "collection_method": "charge_automatically",
        }
    )
    assert sub.id.startswith("sub_") and sub.status == "active"
    assert sub.automatic_tax.enabled is True
    data = sub.to_dict()
    assert "current_period_end" not in data and "current_period_start" not in data
    items = sub["items"].data
    assert [i.id[:3] for i in items] == ["si_"] * 3
    assert items[0].quantity == 1 and items[0].current_period_end > items[0].current_period_start
    assert "quantity" not in items[1].to_dict()
    assert sub.start_date == sub.created == sub.billing_cycle_anchor
    assert sub.cancel_at is None and sub.cancel_at_period_end is False and sub.ended_at is None
    invoice = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert invoice.status == "paid" and invoice.amount_paid == 2000
    assert invoice.billing_reason == "subscription_create"
    types = [e.type for e in client.v1.events.list(params={"limit": 100}).data]
    for expected in (
        "customer.subscription.created",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ):
        assert expected in types


def test_payment_behaviours(client: stripe.StripeClient, catalog: Catalog) -> None:
    failing = customer_with(client, "pm_card_chargeCustomerFail")
    items = subscription_items(catalog)
    incomplete = client.v1.subscriptions.create(params={"customer": failing.id, "items": items})
    assert incomplete.status == "incomplete"
    with pytest.raises(stripe.CardError) as declined:
        client.v1.subscriptions.create(
            params={
                "customer": failing.id,
                "items": items,
                "payment_behavior": "error_if_incomplete",
            }
        )
    assert declined.value.code == "card_declined"
    waiting = client.v1.subscriptions.create(
        params={"customer": failing.id, "items": items, "payment_behavior": "default_incomplete"}
    )
    assert waiting.status == "incomplete"
    invoice = client.v1.invoices.retrieve(str(waiting.latest_invoice))
    assert invoice.status == "open" and invoice.attempt_count == 0
    with pytest.raises(stripe.CardError):
        client.v1.invoices.pay(invoice.id)
    visa = client.v1.payment_methods.attach("pm_card_visa", params={"customer": failing.id})
    client.v1.customers.update(
        failing.id, params={"invoice_settings": {"default_payment_method": visa.id}}
    )
    paid = client.v1.invoices.pay(invoice.id)
    assert paid.status == "paid"
    assert client.v1.subscriptions.retrieve(waiting.id).status == "active"
    with pytest.raises(stripe.InvalidRequestError, match="metered"):
        client.v1.subscriptions.create(
            params={"customer": failing.id, "items": [{"price": catalog.users.id, "quantity": 2}]}
        )


def test_updates(client: stripe.StripeClient, catalog: Catalog) -> None:
    customer = customer_with(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "metadata": {"a": "1"},
        }
    )
    period_end = sub["items"].data[0].current_period_end
    updated = client.v1.subscriptions.update(
        sub.id, params={"metadata": {"b": "2"}, "cancel_at_period_end": True}
    )
    assert updated.metadata.to_dict() == {"a": "1", "b": "2"}
    assert updated.cancel_at == period_end and updated.cancel_at_period_end
    assert updated.canceled_at is not None and updated.status == "active"
    kept = client.v1.subscriptions.update(sub.id, params={"cancel_at_period_end": False})
    assert kept.cancel_at is None and kept.canceled_at is None
    at = period_end - 86400
    scheduled = client.v1.subscriptions.update(sub.id, params={"cancel_at": at})
    assert scheduled.cancel_at == at and not scheduled.cancel_at_period_end
    cleared = client.v1.subscriptions.update(sub.id, params={"cancel_at": ""})
    assert cleared.cancel_at is None
    paused = client.v1.subscriptions.update(
        sub.id, params={"pause_collection": {"behavior": "void"}}
    )
    assert paused.status == "active"
    assert paused.pause_collection is not None and paused.pause_collection.behavior == "void"
    unpaused = client.v1.subscriptions.update(sub.id, params={"pause_collection": ""})
    assert unpaused.pause_collection is None
    [last_update] = client.v1.events.list(
        params={"type": "customer.subscription.updated", "limit": 1}
    ).data
    previous = last_update.data.previous_attributes
    assert previous is not None and previous.to_dict() == {
        "pause_collection": {"behavior": "void", "resumes_at": None}
    }


def test_cancel_pause_resume_and_list(client: stripe.StripeClient, catalog: Catalog) -> None:
    customer = customer_with(client, "pm_card_visa")
    items = subscription_items(catalog)
    first = client.v1.subscriptions.create(params={"customer": customer.id, "items": items})
    second = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": items, "trial_period_days": 14}
    )
    canceled = client.v1.subscriptions.cancel(first.id)
    assert canceled.status == "canceled"
    assert canceled.ended_at == canceled.canceled_at is not None
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.update(first.id, params={"cancel_at_period_end": True})
    assert client.v1.events.list(params={"type": "customer.subscription.deleted"}).data

    listed = client.v1.subscriptions.list(params={"customer": customer.id})
    assert [s.id for s in listed.data] == [second.id]
    everything = client.v1.subscriptions.list(params={"customer": customer.id, "status": "all"})
    assert {s.id for s in everything.data} == {first.id, second.id}
    trialing = client.v1.subscriptions.list(params={"status": "trialing"})
    assert [s.id for s in trialing.data] == [second.id]

    with pytest.raises(stripe.InvalidRequestError, match="paused"):
        client.v1.subscriptions.resume(second.id)
    paused = client.v1.subscriptions.pause(second.id)
    assert paused.status == "paused"
    resumed = client.v1.subscriptions.resume(second.id)
    assert resumed.status == "active"
    kinds = [e.type for e in client.v1.events.list(params={"limit": 100}).data]
    assert "customer.subscription.paused" in kinds and "customer.subscription.resumed" in kinds


def test_invoices_list_and_lines(client: stripe.StripeClient, catalog: Catalog) -> None:
    customer = customer_with(client, "pm_card_visa")
    other = customer_with(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": subscription_items(catalog)}
    )
    client.v1.subscriptions.create(
        params={"customer": other.id, "items": subscription_items(catalog)}
    )
    mine = client.v1.invoices.list(params={"customer": customer.id})
    assert [i.customer for i in mine.data] == [customer.id]
    by_sub = client.v1.invoices.list(params={"subscription": sub.id})
    assert [i.id for i in by_sub.data] == [mine.data[0].id]
    lines = client.v1.invoices.line_items.list(mine.data[0].id)
    assert lines.data[0].id.startswith("il_")
    assert lines.data[0].parent is not None
    assert lines.data[0].parent.subscription_item_details is not None
    assert lines.data[0].parent.subscription_item_details.subscription == sub.id


def test_wall_time_subscriptions_move_on_their_own(
    client: stripe.StripeClient, catalog: Catalog, emulator: EmulatorServer
) -> None:
    import time

    import httpx

    customer = customer_with(client, "pm_card_visa")
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "trial_end": int(time.time()) + 1,
        }
    )
    assert sub.status == "trialing"
    time.sleep(1.2)
    httpx.post(f"{emulator.url}/_emulator/tick").raise_for_status()
    sub = client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "active"
    invoice = client.v1.invoices.retrieve(str(sub.latest_invoice))
    assert sub.trial_end is not None and invoice.status == "draft"
    assert invoice.automatically_finalizes_at == sub.trial_end + 3600
