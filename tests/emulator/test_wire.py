"""Stripe's wire format: auth, bracket notation, errors, headers, expansion, pagination."""

from __future__ import annotations

import httpx
import pytest
import stripe

from tests.emulator.helpers import make_catalog, subscription_items


def test_missing_or_bad_api_key_is_401(http: httpx.Client) -> None:
    anonymous = httpx.get(f"{http.base_url}/v1/customers")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "invalid_request_error"
    assert "did not provide an API key" in anonymous.json()["error"]["message"]
    live = httpx.get(
        f"{http.base_url}/v1/customers", headers={"Authorization": "Bearer sk_live_nope"}
    )
    assert live.status_code == 401
    assert "Invalid API Key" in live.json()["error"]["message"]


def test_sdk_sees_authentication_error(emulator: object) -> None:
    from stripe_emulator.server import EmulatorServer

    assert isinstance(emulator, EmulatorServer)
    client = stripe.StripeClient(
        "pk_test_wrong", base_addresses={"api": emulator.url}, max_network_retries=0
    )
    with pytest.raises(stripe.AuthenticationError):
        client.v1.customers.list()


def test_unknown_and_missing_parameters(http: httpx.Client) -> None:
    unknown = http.post("/v1/customers", data={"emial": "a@b.c"})
    assert unknown.status_code == 400
    error = unknown.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "parameter_unknown"
    assert error["param"] == "emial"
    assert error["message"] == "Received unknown parameter: emial"
    nested = http.post("/v1/customers", data={"invoice_settings[colour]": "red"})
    assert nested.json()["error"]["param"] == "invoice_settings[colour]"
    missing = http.post("/v1/billing/meter_events", data={"event_name": "x"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "parameter_missing"
    assert missing.json()["error"]["param"] == "payload"
    bad_int = http.post("/v1/test_helpers/test_clocks", data={"frozen_time": "soon"})
    assert bad_int.json()["error"]["code"] == "parameter_invalid_integer"


def test_malformed_bodies(http: httpx.Client) -> None:
    as_json = http.post("/v1/customers", json={"email": "a@b.c"})
    assert as_json.status_code == 400
    assert "application/x-www-form-urlencoded" in as_json.json()["error"]["message"]
    clash = http.post(
        "/v1/customers",
        content=b"metadata=x&metadata[a]=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert clash.status_code == 400


def test_unknown_url_and_missing_object(http: httpx.Client) -> None:
    nowhere = http.get("/v1/nothing_here")
    assert nowhere.status_code == 404
    assert "Unrecognized request URL" in nowhere.json()["error"]["message"]
    gone = http.get("/v1/customers/cus_missing")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "resource_missing"
    assert gone.json()["error"]["message"] == "No such customer: 'cus_missing'"


def test_headers_request_id_and_version(http: httpx.Client) -> None:
    plain = http.get("/v1/customers")
    assert plain.headers["Request-Id"].startswith("req_")
    assert plain.headers["Stripe-Version"] == stripe.api_version
    pinned = http.get("/v1/customers", headers={"Stripe-Version": "2025-03-31.basil"})
    assert pinned.headers["Stripe-Version"] == "2025-03-31.basil"


def test_bracket_notation_in_bodies_and_queries(http: httpx.Client) -> None:
    created = http.post(
        "/v1/customers",
        data={"metadata[org_id]": "7", "expand[]": "test_clock", "email": "x@y.z"},
    ).json()
    assert created["metadata"] == {"org_id": "7"}
    listed = http.get("/v1/customers", params={"email": "x@y.z", "expand[0]": "data.test_clock"})
    assert [c["id"] for c in listed.json()["data"]] == [created["id"]]


def test_sdk_errors_carry_param_and_code(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.customers.retrieve("cus_nope")
    assert caught.value.code == "resource_missing"
    assert caught.value.http_status == 404


def test_expand_latest_invoice_customer_and_list_data(client: stripe.StripeClient) -> None:
    catalog = make_catalog(client)
    customer = client.v1.customers.create(params={"email": "e@x.io"})
    sub = client.v1.subscriptions.create(
        params={
            "customer": customer.id,
            "items": subscription_items(catalog),
            "trial_period_days": 10,
            "expand": ["latest_invoice", "customer"],
        }
    )
    assert isinstance(sub.latest_invoice, stripe.Invoice)
    assert isinstance(sub.customer, stripe.Customer)
    assert sub.customer.email == "e@x.io"
    listed = client.v1.subscriptions.list(params={"expand": ["data.customer"]})
    first = listed.data[0]
    assert isinstance(first.customer, stripe.Customer)
    nested = client.v1.subscriptions.retrieve(
        sub.id, params={"expand": ["items.data.price.product"]}
    )
    assert isinstance(nested["items"].data[0].price.product, stripe.Product)
    with_subs = client.v1.customers.retrieve(customer.id, params={"expand": ["subscriptions"]})
    assert with_subs.subscriptions is not None
    assert [s.id for s in with_subs.subscriptions.data] == [sub.id]
    with pytest.raises(stripe.InvalidRequestError, match="cannot be expanded"):
        client.v1.subscriptions.retrieve(sub.id, params={"expand": ["nonsense"]})


def test_list_pagination(client: stripe.StripeClient) -> None:
    ids = [client.v1.customers.create(params={"name": f"c{i}"}).id for i in range(7)]
    newest_first = list(reversed(ids))
    page = client.v1.customers.list(params={"limit": 3})
    assert page["object"] == "list" and page.url == "/v1/customers"
    assert [c.id for c in page.data] == newest_first[:3] and page.has_more
    second = client.v1.customers.list(params={"limit": 3, "starting_after": page.data[-1].id})
    assert [c.id for c in second.data] == newest_first[3:6] and second.has_more
    third = client.v1.customers.list(params={"limit": 3, "starting_after": second.data[-1].id})
    assert [c.id for c in third.data] == newest_first[6:] and not third.has_more
    before = client.v1.customers.list(params={"limit": 2, "ending_before": third.data[0].id})
    assert [c.id for c in before.data] == newest_first[4:6]
    assert [c.id for c in client.v1.customers.list().auto_paging_iter()] == newest_first
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.list(params={"limit": 101})
