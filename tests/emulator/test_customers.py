"""Customers, search, payment methods, products, prices and meters."""

from __future__ import annotations

import pytest
import stripe


def test_customer_lifecycle(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(
        params={"email": "a@b.c", "name": "Acme", "metadata": {"org_id": "123", "source": "x"}}
    )
    assert customer.id.startswith("cus_") and customer.object == "customer"
    assert customer.test_clock is None and customer.livemode is False
    updated = client.v1.customers.update(
        customer.id, params={"name": "Acme Inc", "metadata": {"source": ""}}
    )
    assert updated.name == "Acme Inc"
    assert updated.metadata is not None and updated.metadata.to_dict() == {"org_id": "123"}
    assert client.v1.customers.retrieve(customer.id).name == "Acme Inc"
    [created, changed] = sorted(
        client.v1.events.list(params={"type": "customer.*"}).data, key=lambda e: e.type
    )
    assert created.type == "customer.created" and changed.type == "customer.updated"
    previous = changed.data.previous_attributes
    assert previous is not None
    assert previous.to_dict() == {"name": "Acme", "metadata": {"source": "x"}}
    deleted = client.v1.customers.delete(customer.id)
    assert deleted.deleted is True
    assert client.v1.customers.retrieve(customer.id).to_dict()["deleted"] is True


def test_customer_list_filters(client: stripe.StripeClient) -> None:
    clock = client.v1.test_helpers.test_clocks.create(params={"frozen_time": 1767225600})
    on_clock = client.v1.customers.create(params={"email": "x@y.z", "test_clock": clock.id})
    other = client.v1.customers.create(params={"email": "q@y.z"})
    by_email = client.v1.customers.list(params={"email": "x@y.z"})
    assert [c.id for c in by_email.data] == [on_clock.id]
    by_clock = client.v1.customers.list(params={"test_clock": clock.id})
    assert [c.id for c in by_clock.data] == [on_clock.id]
    assert on_clock.created == 1767225600
    assert {c.id for c in client.v1.customers.list().data} == {on_clock.id, other.id}


def test_customer_search(client: stripe.StripeClient) -> None:
    first = client.v1.customers.create(params={"email": "a@b.c", "metadata": {"org_id": "123"}})
    client.v1.customers.create(params={"email": "d@e.f", "metadata": {"org_id": "456"}})
    client.v1.customers.create(params={"email": "a@b.c", "metadata": {"org_id": "789"}})

    def ids(query: str) -> list[str]:
        return [c.id for c in client.v1.customers.search(params={"query": query}).data]

    assert ids("metadata['org_id']:'123'") == [first.id]
    assert len(ids("email:'a@b.c'")) == 2
    assert ids("email:'a@b.c' AND metadata['org_id']:'123'") == [first.id]
    assert len(ids("metadata['org_id']:'123' OR metadata['org_id']:'456'")) == 2
    assert ids("metadata['org_id']:'000'") == []
    result = client.v1.customers.search(params={"query": "email:'a@b.c'", "limit": 1})
    assert result["object"] == "search_result" and result.has_more and result.next_page
    following = client.v1.customers.search(
        params={"query": "email:'a@b.c'", "limit": 1, "page": result.next_page}
    )
    assert following.data[0].id != result.data[0].id and not following.has_more
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.search(params={"query": "email:'a' AND name:'b' OR phone:'c'"})


def test_payment_methods(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(params={"email": "pm@x.io"})
    visa = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    failing = client.v1.payment_methods.attach(
        "pm_card_chargeCustomerFail", params={"customer": customer.id}
    )
    assert visa.id.startswith("pm_") and visa.id != "pm_card_visa"
    assert visa.card is not None and visa.card.last4 == "4242"
    assert failing.card is not None and failing.card.last4 == "0341"
    assert visa.customer == customer.id
    listed = client.v1.customers.payment_methods.list(customer.id)
    assert {pm.id for pm in listed.data} == {visa.id, failing.id}
    assert {
        pm.id for pm in client.v1.payment_methods.list(params={"customer": customer.id}).data
    } == {
        visa.id,
        failing.id,
    }
    updated = client.v1.customers.update(
        customer.id, params={"invoice_settings": {"default_payment_method": visa.id}}
    )
    assert updated.invoice_settings is not None
    assert updated.invoice_settings.default_payment_method == visa.id
    with pytest.raises(stripe.InvalidRequestError, match="does not have a payment method"):
        client.v1.customers.update(
            customer.id, params={"invoice_settings": {"default_payment_method": "pm_other"}}
        )
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_methods.attach("pm_card_chargeDeclined", params={"customer": customer.id})
    assert declined.value.code == "card_declined"
    detached = client.v1.payment_methods.detach(visa.id)
    assert detached.customer is None
    settings = client.v1.customers.retrieve(customer.id).invoice_settings
    assert settings is not None and settings.default_payment_method is None
    assert client.v1.events.list(params={"type": "payment_method.attached"}).data


def test_products_and_prices(client: stripe.StripeClient) -> None:
    product = client.v1.products.create(params={"name": "Base", "metadata": {"tier": "1"}})
    assert product.id.startswith("prod_")
    assert client.v1.products.retrieve(product.id).name == "Base"
    assert [p.id for p in client.v1.products.list().data] == [product.id]
    price = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 1500,
            "product": product.id,
            "recurring": {"interval": "month"},
            "lookup_key": "base_monthly",
        }
    )
    assert price.id.startswith("price_") and price.type == "recurring"
    assert price.recurring is not None and price.recurring.usage_type == "licensed"
    inline = client.v1.prices.create(
        params={"currency": "eur", "unit_amount": 100, "product_data": {"name": "Setup fee"}}
    )
    assert inline.type == "one_time" and inline.product != product.id
    by_key = client.v1.prices.list(params={"lookup_keys": ["base_monthly"]})
    assert [p.id for p in by_key.data] == [price.id]
    with pytest.raises(stripe.InvalidRequestError, match="lookup key"):
        client.v1.prices.create(
            params={
                "currency": "usd",
                "unit_amount": 1,
                "product": product.id,
                "lookup_key": "base_monthly",
            }
        )
    assert [p.id for p in client.v1.prices.list(params={"product": product.id}).data] == [price.id]
    assert client.v1.prices.retrieve(price.id).unit_amount == 1500


def test_meters_and_metered_prices(client: stripe.StripeClient) -> None:
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "Requests",
            "event_name": "api_requests",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    assert meter.id.startswith("mtr_") and meter.status == "active"
    assert meter.default_aggregation.formula == "sum"
    assert client.v1.billing.meters.retrieve(meter.id).event_name == "api_requests"
    assert [m.id for m in client.v1.billing.meters.list().data] == [meter.id]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.create(
            params={
                "display_name": "Again",
                "event_name": "api_requests",
                "default_aggregation": {"formula": "sum"},
            }
        )
    product = client.v1.products.create(params={"name": "Requests"})
    metered = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 2,
            "product": product.id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    assert metered.recurring is not None and metered.recurring.meter == meter.id
    with pytest.raises(stripe.InvalidRequestError, match="meter"):
        client.v1.prices.create(
            params={
                "currency": "usd",
                "unit_amount": 2,
                "product": product.id,
                "recurring": {"interval": "month", "usage_type": "metered"},
            }
        )
