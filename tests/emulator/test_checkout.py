"""Checkout Sessions: create/retrieve/list/expire through the SDK, and paying on the hosted page."""

from __future__ import annotations

import httpx
import pytest
import stripe
from stripe.params.checkout import SessionCreateParams

from stripe_emulator.server import EmulatorServer
from tests.emulator.helpers import Catalog, Receiver, make_catalog

VISA = "4242 4242 4242 4242"


def subscription_params(catalog: Catalog, customer: str) -> SessionCreateParams:
    return {
        "mode": "subscription",
        "customer": customer,
        "line_items": [
            {"price": catalog.base.id, "quantity": 1},
            {"price": catalog.users.id},
            {"price": catalog.requests.id},
        ],
        "subscription_data": {"metadata": {"org_id": "7", "source": "test"}},
        "metadata": {"org_id": "7"},
        "success_url": "https://console.example/billing?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://console.example/billing",
        "allow_promotion_codes": True,
    }


def pay(url: str | None, **form: str) -> httpx.Response:
    assert url is not None
    return httpx.post(url, data={"cardNumber": VISA, **form}, follow_redirects=False)


def test_subscription_session_paid_on_the_page_subscribes_the_customer(
    client: stripe.StripeClient, emulator: EmulatorServer, receiver: Receiver
) -> None:
    endpoint = client.v1.webhook_endpoints.create(
        params={"url": receiver.url, "enabled_events": ["*"]}
    )
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    session = client.v1.checkout.sessions.create(subscription_params(catalog, customer.id))

    assert session.id.startswith("cs_test_") and session.status == "open"
    assert session.url == f"{emulator.url}/c/pay/{session.id}"
    assert session.mode == "subscription" and session.payment_status == "unpaid"
    assert session.subscription is None and session.allow_promotion_codes is True
    page = httpx.get(str(session.url))
    assert page.status_code == 200 and "cardNumber" in page.text and "20.00 USD" in page.text

    answer = pay(session.url)

    assert answer.status_code == 303
    assert answer.headers["location"] == (f"https://console.example/billing?session={session.id}")
    done = client.v1.checkout.sessions.retrieve(session.id)
    assert done.status == "complete" and done.payment_status == "paid" and done.url is None
    assert done.subscription is not None
    sub = client.v1.subscriptions.retrieve(str(done.subscription))
    assert sub.status == "active" and sub.customer == customer.id
    assert sub.to_dict()["metadata"] == {"org_id": "7", "source": "test"}
    assert [i.price.id for i in sub["items"].data] == [
        catalog.base.id,
        catalog.users.id,
        catalog.requests.id,
    ]
    assert sub.default_payment_method is not None
    receiver.wait_for(
        lambda ds: (
            any('"checkout.session.completed"' in d.body for d in ds)
            and any('"customer.subscription.created"' in d.body for d in ds)
        )
    )
    events = receiver.events(endpoint.secret or "")
    completed = [e for e in events if e.type == "checkout.session.completed"]
    assert len(completed) == 1
    assert completed[0].data.object["subscription"] == sub.id
    assert completed[0].data.object["metadata"].to_dict() == {"org_id": "7"}
    # Paid once: the page of a completed session takes no second payment.
    again = pay(session.url)
    assert again.status_code == 402 and "complete" in again.text
    assert len(list(client.v1.subscriptions.list({"customer": customer.id}).data)) == 1


def test_declined_card_leaves_the_session_open(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    session = client.v1.checkout.sessions.create(subscription_params(catalog, customer.id))

    declined = pay(session.url, cardNumber="4000 0000 0000 0341")
    unknown = pay(session.url, cardNumber="1234")

    assert declined.status_code == 402 and "declined" in declined.text
    assert unknown.status_code == 402 and "test cards" in unknown.text
    assert client.v1.checkout.sessions.retrieve(session.id).status == "open"
    assert not list(client.v1.subscriptions.list({"customer": customer.id}).data)


def test_setup_session_attaches_the_card_with_a_setup_intent(
    client: stripe.StripeClient,
) -> None:
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    session = client.v1.checkout.sessions.create(
        {
            "mode": "setup",
            "customer": customer.id,
            "currency": "usd",
            "metadata": {"org_id": "7"},
            "success_url": "https://console.example/ok",
        }
    )
    assert session.payment_status == "no_payment_required" and session.setup_intent is None

    assert pay(session.url).status_code == 303

    done = client.v1.checkout.sessions.retrieve(session.id, {"expand": ["setup_intent"]})
    intent = done.setup_intent
    assert isinstance(intent, stripe.SetupIntent)
    assert intent.status == "succeeded" and intent.customer == customer.id
    pm = client.v1.payment_methods.retrieve(str(intent.payment_method))
    assert pm.customer == customer.id and pm.card is not None and pm.card.last4 == "4242"
    # As in Stripe: the card is attached, making it the default is the integration's job.
    settings = client.v1.customers.retrieve(customer.id).invoice_settings
    assert settings is not None and settings.default_payment_method is None


def test_automatic_tax_needs_an_address_and_the_page_collects_it(
    client: stripe.StripeClient,
) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    params = subscription_params(catalog, customer.id)
    params["automatic_tax"] = {"enabled": True}
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params)
    assert refused.value.param == "customer_update[address]"

    params["customer_update"] = {"address": "auto"}
    params["billing_address_collection"] = "required"
    session = client.v1.checkout.sessions.create(params)
    assert "postalCode" in httpx.get(str(session.url)).text
    assert pay(session.url).status_code == 402  # no address given
    assert pay(session.url, country="DE", postalCode="10115").status_code == 303
    assert client.v1.customers.retrieve(customer.id).address is not None
    done = client.v1.checkout.sessions.retrieve(session.id)
    sub = client.v1.subscriptions.retrieve(str(done.subscription))
    assert sub.automatic_tax.enabled is True


def test_expire_and_list(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    first = client.v1.checkout.sessions.create(subscription_params(catalog, customer.id))
    second = client.v1.checkout.sessions.create(subscription_params(catalog, customer.id))

    expired = client.v1.checkout.sessions.expire(first.id)

    assert expired.status == "expired" and expired.url is None
    open_ = client.v1.checkout.sessions.list({"customer": customer.id, "status": "open"})
    assert [s.id for s in open_.data] == [second.id]
    with pytest.raises(stripe.InvalidRequestError, match="can be expired"):
        client.v1.checkout.sessions.expire(first.id)
    assert "expired" in httpx.get(str(first.url)).text
    assert pay(str(first.url)).status_code == 402
    assert [e.type for e in client.v1.events.list({"type": "checkout.session.expired"}).data] == [
        "checkout.session.expired"
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"line_items": []}, "line_items"),
        ({"mode": "setup"}, "line_items"),
        ({"discounts": [{"coupon": "x"}]}, "allow_promotion_codes"),
        ({"line_items": [{"price": "price_missing", "quantity": 1}]}, "line_items[0][price]"),
    ],
)
def test_bad_sessions_are_refused_like_stripe(
    client: stripe.StripeClient, change: dict[str, object], param: str
) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "owner@example.com"})
    params = {**subscription_params(catalog, customer.id), **change}
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params)  # type: ignore[arg-type]
    assert refused.value.param == param


def test_unknown_parameter_is_a_400(http: httpx.Client) -> None:
    answer = http.post("/v1/checkout/sessions", data={"mode": "setup", "currency": "usd", "x": "1"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "parameter_unknown"
