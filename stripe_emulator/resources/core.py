"""Customers, payment methods, products and prices."""

from __future__ import annotations

import copy
import hashlib
import secrets
import string
from typing import Any

from stripe import params as sp

from stripe_emulator import engine
from stripe_emulator.errors import StripeError, missing
from stripe_emulator.routing import (
    Ctx,
    Params,
    diff,
    merge_metadata,
    newest_first,
    paginate,
    router,
    search,
    timestamp_filter,
)
from stripe_emulator.state import Obj, State, new_id, require

# Stripe's test payment methods: brand, last4, and whether charging them works.
# `pm_card_chargeCustomerFail` attaches fine and declines every charge;
# `pm_card_chargeDeclined` already fails when it is attached.
TEST_CARDS: dict[str, tuple[str, str, str]] = {
    "visa": ("visa", "4242", "succeed"),
    "visa_debit": ("visa", "5556", "succeed"),
    "mastercard": ("mastercard", "4444", "succeed"),
    "amex": ("amex", "8431", "succeed"),
    "chargeCustomerFail": ("visa", "0341", "fail"),
    "chargeDeclined": ("visa", "0002", "decline_on_attach"),
    "visa_chargeDeclined": ("visa", "0002", "decline_on_attach"),
}


def emit_update(state: State, obj: Obj, before: Obj, event: str, at: int) -> None:
    previous = diff(before, obj)
    if previous:
        state.touch()
        state.emit(event, obj, at, previous=previous)


# -- customers -------------------------------------------------------------------------------


def _invoice_prefix() -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(8))


def _set_default_pm(state: State, customer: Obj, pm_id: Any) -> None:
    if pm_id in (None, ""):
        customer["invoice_settings"]["default_payment_method"] = None
        return
    pm = state.find("payment_method", pm_id)
    if pm is None or pm.get("customer") != customer["id"]:
        raise StripeError(
            f"The customer does not have a payment method with the ID {pm_id}. The payment "
            "method must be attached to the customer.",
            param="invoice_settings[default_payment_method]",
            code="resource_missing",
        )
    customer["invoice_settings"]["default_payment_method"] = pm_id


_CUSTOMER_FIELDS = (
    "address",
    "description",
    "email",
    "name",
    "phone",
    "shipping",
    "preferred_locales",
    "tax_exempt",
    "balance",
    "invoice_prefix",
    "next_invoice_sequence",
)


def _apply_customer(state: State, customer: Obj, p: Params) -> None:
    for key in _CUSTOMER_FIELDS:
        if key in p:
            customer[key] = None if p[key] == "" else p[key]
    if "metadata" in p:
        customer["metadata"] = merge_metadata(customer["metadata"], p["metadata"])
    settings = p.get("invoice_settings") or {}
    if "default_payment_method" in settings:
        _set_default_pm(state, customer, settings["default_payment_method"])
    for key in ("footer", "custom_fields", "rendering_options"):
        if key in settings:
            customer["invoice_settings"][key] = settings[key] or None


@router.add("POST", "/v1/customers", sp.CustomerCreateParams)
def create_customer(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    clock_id = p.get("test_clock")
    if clock_id:
        state.get("test_helpers.test_clock", clock_id, param="test_clock")
    customer: Obj = {
        "id": new_id("cus", 14),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": 0,
        "currency": None,
        "customer_account": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": None,
        "invoice_prefix": _invoice_prefix(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": {},
        "name": None,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": clock_id or None,
    }
    state.put(customer)
    customer["created"] = state.now_for(customer["id"])
    if p.get("payment_method"):
        attach(state, p["payment_method"], customer["id"], emit=False)
    try:
        _apply_customer(state, customer, p)
    except StripeError:
        del state.collection("customer")[customer["id"]]
        raise
    state.emit("customer.created", customer, customer["created"])
    return customer


@router.add("GET", "/v1/customers/{id}", sp.CustomerRetrieveParams)
def retrieve_customer(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    customer = ctx.state.find("customer", path["id"])
    if customer is None:
        deleted = ctx.state.meta.get(path["id"], {}).get("deleted")
        if deleted:
            return {"id": path["id"], "object": "customer", "deleted": True}
        raise missing("customer", path["id"])
    return customer


@router.add("POST", "/v1/customers/{id}", sp.CustomerUpdateParams)
def update_customer(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    customer = state.get("customer", path["id"])
    before = copy.deepcopy(customer)
    _apply_customer(state, customer, p)
    emit_update(state, customer, before, "customer.updated", state.now_for(customer["id"]))
    return customer


@router.add("DELETE", "/v1/customers/{id}", sp.CustomerDeleteParams)
def delete_customer(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    customer = state.get("customer", path["id"])
    at = state.now_for(customer["id"])
    for sub in list(state.collection("subscription").values()):
        if sub["customer"] == customer["id"] and sub["status"] not in (
            "canceled",
            "incomplete_expired",
        ):
            engine.cancel_now(state, sub, at)
    del state.collection("customer")[customer["id"]]
    state.meta_of(customer["id"])["deleted"] = True
    state.touch()
    state.emit("customer.deleted", customer, at)
    return {"id": customer["id"], "object": "customer", "deleted": True}


@router.add("GET", "/v1/customers", sp.CustomerListParams)
def list_customers(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = [
        c
        for c in newest_first(ctx.state.collection("customer").values())
        if ("email" not in p or (c.get("email") or "").lower() == p["email"].lower())
        and ("test_clock" not in p or c.get("test_clock") == p["test_clock"])
        and timestamp_filter(p.get("created"), c["created"])
    ]
    return paginate(items, p, "/v1/customers")


@router.add("GET", "/v1/customers/search", sp.CustomerSearchParams)
def search_customers(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = newest_first(ctx.state.collection("customer").values())
    return search(items, p, "/v1/customers/search")


# -- payment methods -------------------------------------------------------------------------


def _card_pm(state: State, card: str, customer: str | None, at: int) -> Obj:
    brand, last4, behaviour = TEST_CARDS[card]
    pm: Obj = {
        "id": new_id("pm"),
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {
            "address": {
                "city": None,
                "country": None,
                "line1": None,
                "line2": None,
                "postal_code": None,
                "state": None,
            },
            "email": None,
            "name": None,
            "phone": None,
            "tax_id": None,
        },
        "card": {
            "brand": brand,
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": brand,
            "exp_month": 12,
            "exp_year": 2034,
            "fingerprint": hashlib.sha256(card.encode()).hexdigest()[:16],
            "funding": "credit",
            "generated_from": None,
            "last4": last4,
            "networks": {"available": [brand], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": at,
        "customer": customer,
        "customer_account": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }
    state.meta_of(pm["id"])["behaviour"] = behaviour
    return pm


def _test_card_name(token: str) -> str | None:
    for prefix in ("pm_card_", "tok_"):
        if token.startswith(prefix) and token[len(prefix) :] in TEST_CARDS:
            return token[len(prefix) :]
    return None


def _decline() -> StripeError:
    return StripeError(
        "Your card was declined.",
        type="card_error",
        code="card_declined",
        extra={"decline_code": "generic_decline"},
    )


def attach(state: State, pm_id: str, customer_id: str, emit: bool = True) -> Obj:
    """Attach a test token (a fresh `pm_...` each time) or a stored payment method."""
    customer = state.get("customer", customer_id, param="customer")
    at = state.now_for(customer_id)
    card = _test_card_name(pm_id)
    if card is not None:
        if TEST_CARDS[card][2] == "decline_on_attach":
            raise _decline()
        pm = _card_pm(state, card, customer["id"], at)
        state.put(pm)
    else:
        found = state.find("payment_method", pm_id)
        if found is None:
            raise missing("PaymentMethod", pm_id, "payment_method")
        pm = found
        if pm.get("customer") and pm["customer"] != customer_id:
            raise StripeError(
                "The payment method you provided has already been attached to a customer.",
                param="payment_method",
            )
        if state.meta_of(pm["id"]).get("behaviour") == "decline_on_attach":
            raise _decline()
        pm["customer"] = customer_id
        state.touch()
    if emit:
        state.emit("payment_method.attached", pm, at)
    return pm


@router.add("POST", "/v1/payment_methods", sp.PaymentMethodCreateParams)
def create_payment_method(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    if p.get("type") not in (None, "card"):
        raise StripeError("The emulator only creates `card` payment methods.", param="type")
    card_params = p.get("card") or {}
    token = card_params.get("token") if isinstance(card_params, dict) else None
    name = _test_card_name(str(token or "tok_visa"))
    if name is None:
        raise StripeError(
            f"Invalid token id: {token}. Use a test token such as tok_visa.", param="card[token]"
        )
    pm = _card_pm(ctx.state, name, None, ctx.state.wall_now())
    if "metadata" in p:
        pm["metadata"] = merge_metadata({}, p["metadata"])
    return ctx.state.put(pm)


@router.add("POST", "/v1/payment_methods/{id}/attach", sp.PaymentMethodAttachParams)
def attach_payment_method(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return attach(ctx.state, path["id"], require(p.get("customer"), "customer"))


@router.add("POST", "/v1/payment_methods/{id}/detach", sp.PaymentMethodDetachParams)
def detach_payment_method(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    pm = state.get("payment_method", path["id"])
    customer_id = pm.get("customer")
    if not customer_id:
        raise StripeError(
            f"The payment method {pm['id']} is not attached to a customer.", param="payment_method"
        )
    at = state.now_for(customer_id)
    previous = {"customer": customer_id}
    pm["customer"] = None
    customer = state.find("customer", customer_id)
    if customer and customer["invoice_settings"].get("default_payment_method") == pm["id"]:
        before = copy.deepcopy(customer)
        customer["invoice_settings"]["default_payment_method"] = None
        emit_update(state, customer, before, "customer.updated", at)
    state.touch()
    state.emit("payment_method.detached", pm, at, previous=previous)
    return pm


@router.add("GET", "/v1/payment_methods/{id}", sp.PaymentMethodRetrieveParams)
def retrieve_payment_method(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("payment_method", path["id"])


def _list_pms(ctx: Ctx, p: Params, customer: str | None, url: str) -> Obj:
    if customer:
        ctx.state.get("customer", customer, param="customer")
    items = [
        pm
        for pm in newest_first(ctx.state.collection("payment_method").values())
        if pm.get("customer") == customer and p.get("type", "card") in (pm["type"], None)
    ]
    return paginate(items, p, url)


@router.add("GET", "/v1/payment_methods", sp.PaymentMethodListParams)
def list_payment_methods(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    return _list_pms(ctx, p, p.get("customer"), "/v1/payment_methods")


@router.add("GET", "/v1/customers/{id}/payment_methods", sp.CustomerListPaymentMethodsParams)
def list_customer_payment_methods(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return _list_pms(ctx, p, path["id"], f"/v1/customers/{path['id']}/payment_methods")


# -- products --------------------------------------------------------------------------------


@router.add("POST", "/v1/products", sp.ProductCreateParams)
def create_product(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    return make_product(ctx.state, p)


def make_product(state: State, p: Params) -> Obj:
    now = state.wall_now()
    product_id = p.get("id") or new_id("prod", 14)
    if state.find("product", product_id):
        raise StripeError(
            f"Product already exists with id {product_id}.",
            param="id",
            code="resource_already_exists",
        )
    product: Obj = {
        "id": product_id,
        "object": "product",
        "active": p.get("active", True),
        "attributes": [],
        "created": now,
        "default_price": None,
        "description": p.get("description"),
        "images": p.get("images", []),
        "livemode": False,
        "marketing_features": [],
        "metadata": merge_metadata({}, p.get("metadata")),
        "name": require(p.get("name"), "name"),
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": p.get("statement_descriptor"),
        "tax_code": p.get("tax_code"),
        "type": "service",
        "unit_label": p.get("unit_label"),
        "updated": now,
        "url": p.get("url"),
    }
    state.put(product)
    state.emit("product.created", product, now)
    return product


@router.add("GET", "/v1/products/{id}", sp.ProductRetrieveParams)
def retrieve_product(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("product", path["id"])


@router.add("POST", "/v1/products/{id}", sp.ProductUpdateParams)
def update_product(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    product = state.get("product", path["id"])
    before = copy.deepcopy(product)
    for key in (
        "active",
        "description",
        "name",
        "statement_descriptor",
        "unit_label",
        "url",
        "tax_code",
        "default_price",
        "images",
    ):
        if key in p:
            product[key] = None if p[key] == "" else p[key]
    if "metadata" in p:
        product["metadata"] = merge_metadata(product["metadata"], p["metadata"])
    if product != before:
        product["updated"] = state.wall_now()
    emit_update(state, product, before, "product.updated", state.wall_now())
    return product


@router.add("GET", "/v1/products", sp.ProductListParams)
def list_products(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    ids = p.get("ids")
    items = [
        prod
        for prod in newest_first(ctx.state.collection("product").values())
        if ("active" not in p or prod["active"] == p["active"])
        and (ids is None or prod["id"] in ids)
        and timestamp_filter(p.get("created"), prod["created"])
    ]
    return paginate(items, p, "/v1/products")


@router.add("GET", "/v1/products/search", sp.ProductSearchParams)
def search_products(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    return search(newest_first(ctx.state.collection("product").values()), p, "/v1/products/search")


# -- prices ----------------------------------------------------------------------------------


def _claim_lookup_key(state: State, key: str | None, transfer: bool, owner: str) -> None:
    if not key:
        return
    for price in state.collection("price").values():
        if price.get("lookup_key") == key and price["id"] != owner:
            if not transfer:
                raise StripeError(
                    f"A price ({price['id']}) already uses that lookup key.",
                    param="lookup_key",
                )
            price["lookup_key"] = None


@router.add("POST", "/v1/prices", sp.PriceCreateParams)
def create_price(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    currency = str(require(p.get("currency"), "currency")).lower()
    if p.get("product"):
        product = state.get("product", p["product"], param="product")
    elif p.get("product_data"):
        product = make_product(state, p["product_data"])
    else:
        raise StripeError(
            "Missing required param: product.", param="product", code="parameter_missing"
        )
    recurring_in = p.get("recurring")
    recurring: Obj | None = None
    if recurring_in:
        interval = require(recurring_in.get("interval"), "recurring[interval]")
        if interval not in ("day", "week", "month", "year"):
            raise StripeError(
                "Invalid recurring[interval]: must be one of day, month, week, or year",
                param="recurring[interval]",
            )
        usage_type = recurring_in.get("usage_type", "licensed")
        meter = recurring_in.get("meter")
        if usage_type == "metered":
            if not meter:
                raise StripeError(
                    "Metered prices must be backed by a billing meter: pass recurring[meter].",
                    param="recurring[meter]",
                    code="parameter_missing",
                )
            state.get("billing.meter", meter, param="recurring[meter]")
        elif meter:
            raise StripeError(
                "recurring[meter] can only be set when recurring[usage_type] is `metered`.",
                param="recurring[meter]",
            )
        recurring = {
            "interval": interval,
            "interval_count": recurring_in.get("interval_count", 1),
            "meter": meter,
            "trial_period_days": recurring_in.get("trial_period_days"),
            "usage_type": usage_type,
        }
    unit_amount = p.get("unit_amount")
    decimal = p.get("unit_amount_decimal")
    if unit_amount is None and decimal is None and p.get("custom_unit_amount") is None:
        raise StripeError(
            "Missing required param: unit_amount.", param="unit_amount", code="parameter_missing"
        )
    if unit_amount is None and decimal is not None and decimal == int(decimal):
        unit_amount = int(decimal)
    price_id = new_id("price")
    _claim_lookup_key(state, p.get("lookup_key"), bool(p.get("transfer_lookup_key")), price_id)
    now = state.wall_now()
    price: Obj = {
        "id": price_id,
        "object": "price",
        "active": p.get("active", True),
        "billing_scheme": p.get("billing_scheme", "per_unit"),
        "created": now,
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": p.get("lookup_key"),
        "metadata": merge_metadata({}, p.get("metadata")),
        "nickname": p.get("nickname"),
        "product": product["id"],
        "recurring": recurring,
        "tax_behavior": p.get("tax_behavior", "unspecified"),
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(decimal if decimal is not None else unit_amount),
    }
    state.put(price)
    state.emit("price.created", price, now)
    return price


@router.add("GET", "/v1/prices/{id}", sp.PriceRetrieveParams)
def retrieve_price(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("price", path["id"])


@router.add("POST", "/v1/prices/{id}", sp.PriceUpdateParams)
def update_price(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    price = state.get("price", path["id"])
    before = copy.deepcopy(price)
    if "lookup_key" in p:
        key = p["lookup_key"] or None
        _claim_lookup_key(state, key, bool(p.get("transfer_lookup_key")), price["id"])
        price["lookup_key"] = key
    for key in ("active", "nickname", "tax_behavior"):
        if key in p:
            price[key] = None if p[key] == "" else p[key]
    if "metadata" in p:
        price["metadata"] = merge_metadata(price["metadata"], p["metadata"])
    emit_update(state, price, before, "price.updated", state.wall_now())
    return price


@router.add("GET", "/v1/prices", sp.PriceListParams)
def list_prices(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    lookup_keys = p.get("lookup_keys")
    recurring = p.get("recurring") or {}
    items = [
        price
        for price in newest_first(ctx.state.collection("price").values())
        if ("active" not in p or price["active"] == p["active"])
        and ("product" not in p or price["product"] == p["product"])
        and ("currency" not in p or price["currency"] == p["currency"])
        and ("type" not in p or price["type"] == p["type"])
        and (lookup_keys is None or price.get("lookup_key") in lookup_keys)
        and all((price.get("recurring") or {}).get(k) == v for k, v in recurring.items())
        and timestamp_filter(p.get("created"), price["created"])
    ]
    return paginate(items, p, "/v1/prices")


@router.add("GET", "/v1/prices/search", sp.PriceSearchParams)
def search_prices(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    return search(newest_first(ctx.state.collection("price").values()), p, "/v1/prices/search")
