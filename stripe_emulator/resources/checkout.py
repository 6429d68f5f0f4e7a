"""Checkout Sessions: create, retrieve, list, expire, and what paying on the hosted page does.

`subscription` mode: paying attaches the card, creates the subscription from
the line items (metadata, trial and trial settings from `subscription_data`)
with the card as its default payment method, then completes the session.
`setup` mode: paying attaches the card and records a succeeded SetupIntent;
as in Stripe, making it the customer's default is the integration's job.
"""

from __future__ import annotations

import copy
from typing import Any

from stripe import params as sp
from stripe.params import checkout as cp

from stripe_emulator import engine
from stripe_emulator.errors import StripeError
from stripe_emulator.resources.core import attach, create_customer
from stripe_emulator.resources.subscriptions import create_subscription
from stripe_emulator.routing import Ctx, Params, merge_metadata, newest_first, paginate, router
from stripe_emulator.state import Obj, State, new_id

# Stripe's default and bounds for `expires_at`: 24 hours, at least 30 minutes.
DEFAULT_LIFETIME = 24 * 3600
MIN_LIFETIME = 30 * 60
MODES = ("payment", "setup", "subscription")

# Card numbers of Stripe's test cards, to the test tokens of `core.TEST_CARDS`.
CARD_NUMBERS = {
    "4242424242424242": "visa",
    "4000056655665556": "visa_debit",
    "5555555555554444": "mastercard",
    "378282246310005": "amex",
    "4000000000000341": "chargeCustomerFail",
    "4000000000000002": "chargeDeclined",
}


class CheckoutRefused(Exception):
    """What the hosted page shows instead of completing the session."""


def _line_items(state: State, p: Params) -> list[Obj]:
    items: list[Obj] = []
    for index, spec in enumerate(p.get("line_items") or []):
        param = f"line_items[{index}][price]"
        if not spec.get("price"):
            raise StripeError(
                f"Missing required param: {param}.", param=param, code="parameter_missing"
            )
        price = state.get("price", spec["price"], param=param)
        metered = (price.get("recurring") or {}).get("usage_type") == "metered"
        if p["mode"] == "subscription" and price["type"] != "recurring":
            raise StripeError(
                "You must provide at least one recurring price in `subscription` mode when "
                "using prices.",
                param=param,
            )
        if metered and spec.get("quantity") is not None:
            raise StripeError(
                "Quantity should not be specified where usage_type is `metered`. Remove quantity "
                f"from `line_items[{index}]`.",
                param=f"line_items[{index}][quantity]",
            )
        if not metered and spec.get("quantity") is None:
            raise StripeError(
                f"Missing required param: line_items[{index}][quantity].",
                param=f"line_items[{index}][quantity]",
                code="parameter_missing",
            )
        items.append({"price": price["id"], "quantity": None if metered else spec["quantity"]})
    return items


def _check(state: State, p: Params, customer: Obj | None) -> None:
    mode = p.get("mode")
    if mode not in MODES:
        raise StripeError("Missing required param: mode.", param="mode", code="parameter_missing")
    if mode == "payment":
        raise StripeError("The emulator implements `subscription` and `setup` mode.", param="mode")
    if mode == "subscription" and not p.get("line_items"):
        raise StripeError(
            "`line_items` is required in `subscription` mode.",
            param="line_items",
            code="parameter_missing",
        )
    if mode == "setup":
        if p.get("line_items"):
            raise StripeError("`line_items` cannot be used in `setup` mode.", param="line_items")
        if not p.get("currency") and not p.get("allowed_payment_method_types"):
            raise StripeError(
                "`currency` is required in `setup` mode when `allowed_payment_method_types` is "
                "not set.",
                param="currency",
                code="parameter_missing",
            )
        for name in ("subscription_data", "allow_promotion_codes"):
            if name in p:
                raise StripeError(
                    f"`{name}` can only be used in `subscription` or `payment` mode.", param=name
                )
    if p.get("allow_promotion_codes") and p.get("discounts"):
        raise StripeError(
            "You may only specify one of these parameters: allow_promotion_codes, discounts.",
            param="allow_promotion_codes",
        )
    if p.get("customer") and p.get("customer_email"):
        raise StripeError(
            "You may only specify one of these parameters: customer, customer_email.",
            param="customer_email",
        )
    if p.get("customer_update") and customer is None:
        raise StripeError(
            "`customer_update` can only be used with `customer`.", param="customer_update"
        )
    automatic_tax = bool((p.get("automatic_tax") or {}).get("enabled"))
    address_auto = (p.get("customer_update") or {}).get("address") == "auto"
    if automatic_tax and customer is not None and not customer.get("address") and not address_auto:
        raise StripeError(
            "Automatic tax calculation in Checkout requires a valid address on the Customer. "
            "Add a valid address to the Customer or set either `customer_update[address]` to "
            "'auto' or `customer_update[shipping]` to 'auto' to save the address entered in "
            "Checkout to the Customer.",
            param="customer_update[address]",
        )


@router.add("POST", "/v1/checkout/sessions", cp.SessionCreateParams)
def create_session(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    customer = state.get("customer", p["customer"], param="customer") if p.get("customer") else None
    _check(state, p, customer)
    items = _line_items(state, p)
    now = state.wall_now()
    expires_at = int(p.get("expires_at") or now + DEFAULT_LIFETIME)
    if not now + MIN_LIFETIME <= expires_at <= now + DEFAULT_LIFETIME:
        raise StripeError(
            "The `expires_at` timestamp must be between 30 minutes and 24 hours from now.",
            param="expires_at",
        )
    session_id = new_id("cs_test", 58)
    prices = [state.get("price", i["price"]) for i in items]
    currency = p.get("currency") or (prices[0]["currency"] if prices else None)
    subtotal = sum(
        int(price.get("unit_amount") or 0) * int(item["quantity"] or 0)
        for price, item in zip(prices, items, strict=True)
    )
    subscription_data = copy.deepcopy(p.get("subscription_data") or {})
    address_collection = p.get("billing_address_collection") or "auto"
    session: Obj = {
        "id": session_id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": p.get("allow_promotion_codes"),
        "amount_subtotal": subtotal if p["mode"] != "setup" else None,
        "amount_total": subtotal if p["mode"] != "setup" else None,
        "automatic_tax": {
            "enabled": bool((p.get("automatic_tax") or {}).get("enabled")),
            "liability": None,
            "provider": None,
            "status": None,
        },
        "billing_address_collection": p.get("billing_address_collection"),
        "cancel_url": p.get("cancel_url"),
        "client_reference_id": p.get("client_reference_id"),
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": now,
        "currency": currency,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer["id"] if customer else None,
        "customer_creation": None if customer else "always",
        "customer_details": None,
        "customer_email": p.get("customer_email"),
        "expires_at": expires_at,
        "invoice": None,
        "livemode": False,
        "locale": p.get("locale"),
        "metadata": merge_metadata({}, p.get("metadata")),
        "mode": p["mode"],
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": p.get("payment_method_collection") or "always",
        "payment_method_types": list(p.get("allowed_payment_method_types") or ["card"]),
        "payment_status": "no_payment_required" if p["mode"] == "setup" else "unpaid",
        "recovered_from": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_details": None,
        "status": "open",
        "submit_type": None,
        "subscription": None,
        "success_url": p.get("success_url"),
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": f"{ctx.base_url}/c/pay/{session_id}",
    }
    state.put(session)
    meta = state.meta_of(session_id)
    meta["line_items"] = items
    meta["subscription_data"] = subscription_data
    meta["customer_update"] = copy.deepcopy(p.get("customer_update") or {})
    meta["collect_address"] = address_collection == "required" or (
        meta["customer_update"].get("address") == "auto"
    )
    return session


@router.add("GET", "/v1/checkout/sessions/{id}", cp.SessionRetrieveParams)
def retrieve_session(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    expire_due(ctx.state)
    return ctx.state.get("checkout.session", path["id"])


@router.add("GET", "/v1/checkout/sessions", cp.SessionListParams)
def list_sessions(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    expire_due(ctx.state)
    items = [
        s
        for s in newest_first(ctx.state.collection("checkout.session").values())
        if ("customer" not in p or s["customer"] == p["customer"])
        and ("status" not in p or s["status"] == p["status"])
        and ("subscription" not in p or s["subscription"] == p["subscription"])
    ]
    return paginate(items, p, "/v1/checkout/sessions")


@router.add("GET", "/v1/checkout/sessions/{id}/line_items", cp.SessionListLineItemsParams)
def list_line_items(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    session = state.get("checkout.session", path["id"])
    items = []
    for index, item in enumerate(state.meta_of(session["id"]).get("line_items", [])):
        price = copy.deepcopy(state.get("price", item["price"]))
        amount = int(price.get("unit_amount") or 0) * int(item["quantity"] or 0)
        items.append(
            {
                "id": f"li_{session['id'][8:30]}{index}",
                "object": "item",
                "amount_discount": 0,
                "amount_subtotal": amount,
                "amount_tax": 0,
                "amount_total": amount,
                "currency": price["currency"],
                "description": price.get("nickname"),
                "price": price,
                "quantity": item["quantity"],
            }
        )
    return paginate(items, p, f"/v1/checkout/sessions/{session['id']}/line_items")


@router.add("POST", "/v1/checkout/sessions/{id}/expire", cp.SessionExpireParams)
def expire_session(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    session = state.get("checkout.session", path["id"])
    if session["status"] != "open":
        raise StripeError(
            'Only Checkout Sessions with a status in ["open"] can be expired.',
            param="session",
        )
    expire(state, session, state.wall_now())
    return session


def expire(state: State, session: Obj, at: int) -> None:
    session.update(status="expired", url=None)
    state.touch()
    state.emit("checkout.session.expired", session, at)


def expire_due(state: State) -> None:
    """Sessions past their `expires_at` expire (Stripe does it within the hour)."""
    now = state.wall_now()
    for session in list(state.collection("checkout.session").values()):
        if session["status"] == "open" and session["expires_at"] <= now:
            expire(state, session, now)


# -- the hosted page -------------------------------------------------------------------------


def page_fields(state: State, session_id: str) -> Obj | None:
    """What the hosted page shows of a session (None: no such session)."""
    session = state.find("checkout.session", session_id)
    if session is None:
        return None
    meta = state.meta_of(session_id)
    lines = []
    for item in meta.get("line_items", []):
        price = state.find("price", item["price"]) or {}
        product = state.find("product", str(price.get("product"))) or {}
        lines.append(
            {
                "name": product.get("name") or price.get("id"),
                "quantity": item["quantity"],
                "unit_amount": price.get("unit_amount"),
                "currency": price.get("currency"),
                "metered": item["quantity"] is None,
            }
        )
    customer = state.find("customer", session["customer"]) if session["customer"] else None
    return {
        "session": copy.deepcopy(session),
        "lines": lines,
        "collect_address": bool(meta.get("collect_address")),
        "email": (customer or {}).get("email") or session.get("customer_email"),
        "trial_days": (meta.get("subscription_data") or {}).get("trial_period_days"),
    }


def _card_token(number: str) -> str:
    digits = "".join(ch for ch in number if ch.isdigit())
    name = CARD_NUMBERS.get(digits)
    if name is None:
        raise CheckoutRefused(
            "Your card number is not one of Stripe's test cards (use 4242 4242 4242 4242)."
        )
    return f"pm_card_{name}"


def complete(state: State, session_id: str, form: dict[str, str]) -> Obj:
    """Pay on the hosted page: the session completes, or `CheckoutRefused` says why not."""
    session = state.find("checkout.session", session_id)
    if session is None:
        raise CheckoutRefused("This checkout session does not exist.")
    if session["status"] == "open" and session["expires_at"] <= state.wall_now():
        expire(state, session, state.wall_now())
    if session["status"] != "open":
        raise CheckoutRefused(f"This checkout session is {session['status']}.")
    meta = state.meta_of(session_id)
    token = _card_token(form.get("cardNumber", ""))
    address = _address(form) if meta.get("collect_address") else None
    customer_id = session["customer"] or _new_customer(state, form)
    try:
        pm = attach(state, token, customer_id)
    except StripeError as err:
        raise CheckoutRefused(err.message) from None
    name = form.get("billingName") or None
    pm["billing_details"].update(name=name, email=form.get("email") or None)
    if address is not None:
        pm["billing_details"]["address"] = dict(address)
    customer = state.get("customer", customer_id)
    if address is not None and meta.get("customer_update", {}).get("address") == "auto":
        customer["address"] = dict(address)
    if meta.get("customer_update", {}).get("name") == "auto" and name:
        customer["name"] = name
    at = state.now_for(customer_id)
    if session["mode"] == "subscription":
        _subscribe(state, session, meta, customer_id, pm)
    else:
        _setup(state, session, customer_id, pm, at)
    session.update(
        status="complete",
        url=None,
        customer=customer_id,
        customer_details={
            "address": address,
            "email": customer.get("email") or form.get("email") or None,
            "name": name,
            "phone": None,
            "tax_exempt": customer.get("tax_exempt", "none"),
            "tax_ids": [],
        },
    )
    state.touch()
    state.emit("checkout.session.completed", session, at)
    return session


def _address(form: dict[str, str]) -> Obj:
    country = (form.get("country") or "").strip().upper()
    postal = (form.get("postalCode") or "").strip()
    if len(country) != 2 or not country.isalpha() or not postal:
        raise CheckoutRefused("A billing address (country and postal code) is required.")
    return {
        "city": form.get("city") or None,
        "country": country,
        "line1": form.get("line1") or None,
        "line2": None,
        "postal_code": postal,
        "state": None,
    }


def _new_customer(state: State, form: dict[str, str]) -> str:
    email = (form.get("email") or "").strip()
    if "@" not in email:
        raise CheckoutRefused("An email address is required.")
    customer = create_customer(Ctx(state, "", "", ""), {"email": email}, {})
    return str(customer["id"])


def _subscribe(state: State, session: Obj, meta: dict[str, Any], customer_id: str, pm: Obj) -> None:
    data = meta.get("subscription_data") or {}
    trial = bool(data.get("trial_period_days") or data.get("trial_end"))
    if not trial:
        ok, _code, message = engine.charge(state, pm)
        if not ok:
            raise CheckoutRefused(message or "Your card was declined.")
    params: Params = {
        "customer": customer_id,
        "items": [
            {"price": i["price"]} | ({"quantity": i["quantity"]} if i["quantity"] else {})
            for i in meta["line_items"]
        ],
        "metadata": data.get("metadata") or {},
        "default_payment_method": pm["id"],
        "automatic_tax": {"enabled": session["automatic_tax"]["enabled"]},
        "payment_behavior": "error_if_incomplete",
    }
    for key in ("trial_period_days", "trial_end", "trial_settings", "description"):
        if data.get(key) is not None:
            params[key] = data[key]
    sub = create_subscription(Ctx(state, "", "", ""), params, {})
    session.update(
        subscription=sub["id"],
        invoice=sub.get("latest_invoice"),
        payment_status="no_payment_required" if trial else "paid",
    )


def _setup(state: State, session: Obj, customer_id: str, pm: Obj, at: int) -> None:
    intent: Obj = {
        "id": new_id("seti"),
        "object": "setup_intent",
        "application": None,
        "automatic_payment_methods": None,
        "cancellation_reason": None,
        "client_secret": None,
        "created": at,
        "customer": customer_id,
        "description": None,
        "last_setup_error": None,
        "latest_attempt": None,
        "livemode": False,
        "mandate": None,
        "metadata": {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": pm["id"],
        "payment_method_types": list(session["payment_method_types"]),
        "single_use_mandate": None,
        "status": "succeeded",
        "usage": "off_session",
    }
    state.put(intent)
    state.emit("setup_intent.created", intent, at)
    state.emit("setup_intent.succeeded", intent, at)
    session["setup_intent"] = intent["id"]


@router.add("GET", "/v1/setup_intents/{id}", sp.SetupIntentRetrieveParams)
def retrieve_setup_intent(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("setup_intent", path["id"])
