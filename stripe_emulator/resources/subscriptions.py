"""Subscriptions and invoices: the API side of the lifecycle in `engine`."""

from __future__ import annotations

import copy
from typing import Any

from stripe import params as sp

from stripe_emulator import engine
from stripe_emulator.errors import StripeError
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
from stripe_emulator.timeutil import DAY, add_interval

LIVE_STATUSES = ("incomplete", "trialing", "active", "past_due", "unpaid", "paused")


def plan_of(price: Obj) -> Obj:
    """The legacy `plan` view of a recurring price that subscription items still carry."""
    recurring = price.get("recurring") or {}
    return {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price.get("unit_amount"),
        "amount_decimal": price.get("unit_amount_decimal"),
        "billing_scheme": price.get("billing_scheme", "per_unit"),
        "created": price["created"],
        "currency": price["currency"],
        "interval": recurring.get("interval"),
        "interval_count": recurring.get("interval_count", 1),
        "livemode": False,
        "metadata": copy.deepcopy(price.get("metadata") or {}),
        "meter": recurring.get("meter"),
        "nickname": price.get("nickname"),
        "product": price["product"],
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": recurring.get("usage_type", "licensed"),
    }


def _resolve_price(state: State, spec: Params, index: int) -> Obj:
    price_id = spec.get("price") or spec.get("plan")
    if price_id:
        price = state.get("price", price_id, param=f"items[{index}][price]")
    elif spec.get("price_data"):
        data = spec["price_data"]
        from stripe_emulator.resources.core import create_price

        price = create_price(
            Ctx(state, "", "", ""),
            {
                "currency": data["currency"],
                "product": data["product"],
                "unit_amount": data.get("unit_amount"),
                "unit_amount_decimal": data.get("unit_amount_decimal"),
                "recurring": data.get("recurring"),
            },
            {},
        )
    else:
        raise StripeError(
            f"Missing required param: items[{index}][price].",
            param=f"items[{index}][price]",
            code="parameter_missing",
        )
    if price["type"] != "recurring":
        raise StripeError(
            "The price specified is set to `type=one_time` but this field only accepts prices "
            "with `type=recurring`.",
            param=f"items[{index}][price]",
        )
    if not price["active"]:
        raise StripeError(
            "The price specified is inactive. This field only accepts active prices.",
            param=f"items[{index}][price]",
        )
    return price


def _item(state: State, sub_id: str, spec: Params, index: int, at: int) -> Obj:
    price = _resolve_price(state, spec, index)
    metered = price["recurring"]["usage_type"] == "metered"
    item: Obj = {
        "id": new_id("si", 14),
        "object": "subscription_item",
        "billed_until": None,
        "billing_thresholds": None,
        "created": at,
        "current_period_end": at,
        "current_period_start": at,
        "current_trial": None,
        "discounts": [],
        "metadata": merge_metadata({}, spec.get("metadata")),
        "plan": plan_of(price),
        "price": copy.deepcopy(price),
        "subscription": sub_id,
        "tax_rates": [],
    }
    if metered:
        if spec.get("quantity") is not None:
            raise StripeError(
                "Quantity should not be specified where usage_type is `metered`. Remove quantity "
                f"from `items[{index}]`.",
                param=f"items[{index}][quantity]",
            )
    else:
        item["quantity"] = spec.get("quantity", 1)
    return item


def _check_items(items: list[Obj]) -> None:
    currencies = {item["price"]["currency"] for item in items}
    if len(currencies) > 1:
        raise StripeError(
            "All prices on a subscription must have the same currency.", param="items"
        )
    intervals = {
        (item["price"]["recurring"]["interval"], item["price"]["recurring"]["interval_count"])
        for item in items
    }
    if len(intervals) > 1:
        raise StripeError(
            "All prices on a subscription must have the same `recurring.interval` and "
            "`recurring.interval_count`.",
            param="items",
        )


def _trial_end(p: Params, now: int) -> int | None:
    value = p.get("trial_end")
    if value == "now":
        return None
    if value is not None:
        if int(value) <= now:
            raise StripeError(
                "Invalid timestamp: must be an integer Unix timestamp in the future.",
                param="trial_end",
            )
        return int(value)
    days = p.get("trial_period_days")
    if days:
        return now + int(days) * DAY
    return None


def _licensed_total(items: list[Obj]) -> int:
    return sum(
        round(float(i.get("quantity") or 0) * float(i["price"].get("unit_amount") or 0))
        for i in items
        if i["price"]["recurring"]["usage_type"] != "metered"
    )


def _cancel_fields(sub: Obj, p: Params, now: int) -> None:
    """Current API: `cancel_at_period_end` also fills `cancel_at`; both stamp `canceled_at`."""
    if p.get("cancel_at_period_end") is True:
        sub.update(cancel_at_period_end=True, cancel_at=engine.period_end(sub), canceled_at=now)
    elif p.get("cancel_at_period_end") is False:
        sub.update(cancel_at_period_end=False, cancel_at=None, canceled_at=None)
    if "cancel_at" in p:
        value = p["cancel_at"]
        if value in ("", None):
            sub.update(cancel_at=None, cancel_at_period_end=False, canceled_at=None)
        else:
            if value in ("min_period_end", "max_period_end"):
                value = engine.period_end(sub)
            if int(value) <= now:
                raise StripeError(
                    "Invalid timestamp: must be an integer Unix timestamp in the future.",
                    param="cancel_at",
                )
            sub.update(
                cancel_at=int(value),
                cancel_at_period_end=int(value) == engine.period_end(sub),
                canceled_at=now,
            )


@router.add("POST", "/v1/subscriptions", sp.SubscriptionCreateParams)
def create_subscription(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    customer = state.get("customer", require(p.get("customer"), "customer"), param="customer")
    specs = p.get("items") or []
    if not specs:
        raise StripeError("Missing required param: items.", param="items", code="parameter_missing")
    now = state.now_for(customer["id"])
    sub_id = new_id("sub")
    items = [_item(state, sub_id, spec, i, now) for i, spec in enumerate(specs)]
    _check_items(items)
    trial_end = _trial_end(p, now)
    if p.get("default_payment_method"):
        pm = state.get("payment_method", p["default_payment_method"], "default_payment_method")
        if pm.get("customer") != customer["id"]:
            raise StripeError(
                "The payment method must be attached to the customer.",
                param="default_payment_method",
            )
    interval = items[0]["price"]["recurring"]
    if trial_end is not None:
        anchor, end = trial_end, trial_end
    else:
        anchor = now
        end = add_interval(now, interval["interval"], int(interval["interval_count"]))
    for item in items:
        item["current_period_start"], item["current_period_end"] = now, end
    behaviour = p.get("payment_behavior", "allow_incomplete")
    end_behavior = (p.get("trial_settings") or {}).get("end_behavior") or {}
    sub: Obj = {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": bool((p.get("automatic_tax") or {}).get("enabled", False)),
            "liability": None,
        },
        "billing_cycle_anchor": anchor,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic", "updated_at": None},
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": p.get("collection_method", "charge_automatically"),
        "created": now,
        "currency": items[0]["price"]["currency"],
        "customer": customer["id"],
        "customer_account": None,
        "days_until_due": p.get("days_until_due"),
        "default_payment_method": p.get("default_payment_method"),
        "default_source": None,
        "default_tax_rates": [],
        "description": p.get("description"),
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "latest_invoice": None,
        "livemode": False,
        "metadata": merge_metadata({}, p.get("metadata")),
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": now,
        "status": "trialing" if trial_end is not None else "incomplete",
        "status_details": None,
        "test_clock": customer.get("test_clock"),
        "transfer_data": None,
        "trial_end": trial_end,
        "trial_settings": {
            "end_behavior": {
                "billing_cycle_anchor": end_behavior.get("billing_cycle_anchor"),
                "missing_payment_method": end_behavior.get(
                    "missing_payment_method", "create_invoice"
                ),
            }
        },
        "trial_start": now if trial_end is not None else None,
    }
    _cancel_fields(sub, p, now)
    collect = True
    if trial_end is None:
        amount = _licensed_total(items)
        charged = engine.payment_method_for(state, sub, customer["id"])
        ok = amount == 0 or engine.charge(state, charged)[0]
        if sub["collection_method"] == "send_invoice":
            ok, collect = True, False
        if not ok and behaviour == "error_if_incomplete":
            _ok, code, message = engine.charge(state, charged)
            raise StripeError(
                message or "Your card was declined.",
                type="card_error",
                code="card_declined" if code == "card_declined" else code,
            )
        if behaviour == "default_incomplete" and amount > 0:
            ok, collect = False, False
        sub["status"] = "active" if ok else "incomplete"
    state.put(sub)
    state.emit("customer.subscription.created", sub, now)
    invoice = engine.first_invoice(state, sub, now, (now, end), trial=trial_end is not None)
    if collect:
        engine.finalize(state, invoice, now)
    else:
        engine.finalize_without_payment(state, invoice, now)
    engine.settle(state, sub)
    return sub


@router.add("GET", "/v1/subscriptions/{id}", sp.SubscriptionRetrieveParams)
def retrieve_subscription(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("subscription", path["id"])


def _update_items(state: State, sub: Obj, specs: list[Params], now: int) -> None:
    by_id = {item["id"]: item for item in sub["items"]["data"]}
    for index, spec in enumerate(specs):
        if spec.get("id"):
            item = by_id.get(spec["id"])
            if item is None:
                raise StripeError(
                    f"No such subscription item: '{spec['id']}'",
                    param=f"items[{index}][id]",
                    code="resource_missing",
                )
            if spec.get("deleted"):
                sub["items"]["data"].remove(item)
                continue
            if spec.get("price") or spec.get("price_data"):
                price = _resolve_price(state, spec, index)
                item["price"] = copy.deepcopy(price)
                item["plan"] = plan_of(price)
            if "quantity" in spec and item["price"]["recurring"]["usage_type"] != "metered":
                item["quantity"] = spec["quantity"]
            if "metadata" in spec:
                item["metadata"] = merge_metadata(item["metadata"], spec["metadata"])
        else:
            item = _item(state, sub["id"], spec, index, now)
            item["current_period_start"] = engine.period_start(sub)
            item["current_period_end"] = engine.period_end(sub)
            sub["items"]["data"].append(item)
    if not sub["items"]["data"]:
        raise StripeError("A subscription must have at least one item.", param="items")
    _check_items(sub["items"]["data"])
    sub["items"]["total_count"] = len(sub["items"]["data"])


@router.add("POST", "/v1/subscriptions/{id}", sp.SubscriptionUpdateParams)
def update_subscription(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    sub = state.get("subscription", path["id"])
    now = state.now_for(sub["customer"])
    if sub["status"] in ("canceled", "incomplete_expired"):
        allowed = {"metadata", "cancellation_details", "expand"}
        if set(p) - allowed:
            raise StripeError(
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
    before = copy.deepcopy(sub)
    if "metadata" in p:
        sub["metadata"] = merge_metadata(sub["metadata"], p["metadata"])
    for key in ("description", "collection_method", "days_until_due"):
        if key in p:
            sub[key] = None if p[key] == "" else p[key]
    if "default_payment_method" in p:
        pm_id = p["default_payment_method"] or None
        if pm_id:
            pm = state.get("payment_method", pm_id, "default_payment_method")
            if pm.get("customer") != sub["customer"]:
                raise StripeError(
                    "The payment method must be attached to the customer.",
                    param="default_payment_method",
                )
        sub["default_payment_method"] = pm_id
    if "automatic_tax" in p:
        sub["automatic_tax"]["enabled"] = bool(p["automatic_tax"].get("enabled"))
    if "cancellation_details" in p:
        details = p["cancellation_details"] or {}
        sub["cancellation_details"].update(
            {k: (v or None) for k, v in details.items() if k in ("comment", "feedback")}
        )
    if "pause_collection" in p:
        value = p["pause_collection"]
        sub["pause_collection"] = (
            None
            if value in ("", None)
            else {"behavior": value["behavior"], "resumes_at": value.get("resumes_at")}
        )
    if "trial_settings" in p:
        behavior = p["trial_settings"].get("end_behavior") or {}
        sub["trial_settings"]["end_behavior"].update(behavior)
    if "items" in p:
        _update_items(state, sub, p["items"], now)
    end_trial_now = False
    if "trial_end" in p:
        if p["trial_end"] == "now":
            end_trial_now = sub["status"] == "trialing"
        else:
            new_end = int(p["trial_end"])
            if new_end <= now:
                raise StripeError(
                    "Invalid timestamp: must be an integer Unix timestamp in the future.",
                    param="trial_end",
                )
            if sub["status"] not in ("trialing",):
                raise StripeError(
                    "The emulator can only move the trial end of a trialing subscription.",
                    param="trial_end",
                )
            sub.update(trial_end=new_end, billing_cycle_anchor=new_end)
            for item in sub["items"]["data"]:
                item["current_period_end"] = new_end
            state.meta_of(sub["id"]).pop("trial_will_end_sent", None)
    _cancel_fields(sub, p, now)
    previous = diff(before, sub)
    if previous:
        state.touch()
        state.emit("customer.subscription.updated", sub, now, previous=previous)
    if end_trial_now:
        sub["trial_end"] = now
        for item in sub["items"]["data"]:
            item["current_period_end"] = now
        engine.end_trial(state, sub, now, from_api=True)
    engine.settle(state, sub)
    return sub


@router.add("DELETE", "/v1/subscriptions/{id}", sp.SubscriptionCancelParams)
def cancel_subscription(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    sub = state.get("subscription", path["id"])
    if sub["status"] in ("canceled", "incomplete_expired"):
        raise StripeError(f"This subscription ({sub['id']}) has already been canceled.", status=400)
    details = p.get("cancellation_details") or {}
    if details:
        sub["cancellation_details"].update({k: v or None for k, v in details.items()})
    engine.cancel_now(state, sub, state.now_for(sub["customer"]), reason="cancellation_requested")
    return sub


@router.add("POST", "/v1/subscriptions/{id}/pause", sp.SubscriptionPauseParams)
def pause_subscription(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    sub = state.get("subscription", path["id"])
    if sub["status"] not in ("active", "trialing", "past_due", "unpaid"):
        raise StripeError(
            f"You cannot pause a subscription with status `{sub['status']}`.", param="subscription"
        )
    now = state.now_for(sub["customer"])
    sub["status_details"] = {"paused": {"subscription": {"type": "pause_requested"}}}
    engine.set_fields(state, sub, {"status": "paused"}, now)
    state.emit("customer.subscription.paused", sub, now)
    return sub


@router.add("POST", "/v1/subscriptions/{id}/resume", sp.SubscriptionResumeParams)
def resume_subscription(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    sub = state.get("subscription", path["id"])
    if sub["status"] != "paused":
        raise StripeError(
            "You can only resume subscriptions with a status of `paused`.", param="subscription"
        )
    now = state.now_for(sub["customer"])
    extra: dict[str, Any] = {
        "status": "active",
        "status_details": None,
        "trial_end": sub["trial_end"],
    }
    anchor = p.get("billing_cycle_anchor")
    if (anchor.get("type") if isinstance(anchor, dict) else anchor) == "unchanged":
        previous = {"status": sub["status"]}
        sub.update(status="active", status_details=None)
        state.emit("customer.subscription.updated", sub, now, previous=previous)
    else:
        engine.start_period(
            state, sub, now, "subscription_update", from_api=True, finalize_now=True, extra=extra
        )
    state.emit("customer.subscription.resumed", sub, now)
    engine.settle(state, sub)
    return sub


def _subscription_filter(sub: Obj, p: Params) -> bool:
    status = p.get("status")
    if status is None:
        if sub["status"] in ("canceled", "incomplete_expired"):
            return False
    elif status == "ended":
        if sub["status"] not in ("canceled", "incomplete_expired"):
            return False
    elif status != "all" and sub["status"] != status:
        return False
    if "customer" in p and sub["customer"] != p["customer"]:
        return False
    if "test_clock" in p and sub.get("test_clock") != p["test_clock"]:
        return False
    if "price" in p and all(i["price"]["id"] != p["price"] for i in sub["items"]["data"]):
        return False
    return timestamp_filter(p.get("created"), sub["created"])


@router.add("GET", "/v1/subscriptions", sp.SubscriptionListParams)
def list_subscriptions(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = [
        s
        for s in newest_first(ctx.state.collection("subscription").values())
        if _subscription_filter(s, p)
    ]
    return paginate(items, p, "/v1/subscriptions")


@router.add("GET", "/v1/subscriptions/search", sp.SubscriptionSearchParams)
def search_subscriptions(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = newest_first(ctx.state.collection("subscription").values())
    return search(items, p, "/v1/subscriptions/search")


@router.add("GET", "/v1/subscription_items", sp.SubscriptionItemListParams)
def list_subscription_items(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    sub = ctx.state.get(
        "subscription", require(p.get("subscription"), "subscription"), param="subscription"
    )
    return paginate(list(sub["items"]["data"]), p, "/v1/subscription_items")


# -- invoices --------------------------------------------------------------------------------


def invoice_subscription(invoice: Obj) -> str | None:
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    value = details.get("subscription")
    return value if isinstance(value, str) else None


@router.add("GET", "/v1/invoices", sp.InvoiceListParams)
def list_invoices(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = [
        inv
        for inv in newest_first(ctx.state.collection("invoice").values())
        if ("customer" not in p or inv["customer"] == p["customer"])
        and ("subscription" not in p or invoice_subscription(inv) == p["subscription"])
        and ("status" not in p or inv["status"] == p["status"])
        and ("collection_method" not in p or inv["collection_method"] == p["collection_method"])
        and timestamp_filter(p.get("created"), inv["created"])
    ]
    return paginate(items, p, "/v1/invoices")


@router.add("GET", "/v1/invoices/search", sp.InvoiceSearchParams)
def search_invoices(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    return search(newest_first(ctx.state.collection("invoice").values()), p, "/v1/invoices/search")


@router.add("GET", "/v1/invoices/{id}", sp.InvoiceRetrieveParams)
def retrieve_invoice(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("invoice", path["id"])


@router.add("GET", "/v1/invoices/{id}/lines", sp.InvoiceListLinesParams)
def list_invoice_lines(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    invoice = ctx.state.get("invoice", path["id"])
    return paginate(list(invoice["lines"]["data"]), p, f"/v1/invoices/{invoice['id']}/lines")


@router.add("POST", "/v1/invoices/{id}/finalize", sp.InvoiceFinalizeInvoiceParams)
def finalize_invoice(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    invoice = state.get("invoice", path["id"])
    if invoice["status"] != "draft":
        raise StripeError("This invoice is already finalized.", param="invoice")
    if p.get("auto_advance") is False:
        invoice["auto_advance"] = False
        engine.finalize_without_payment(state, invoice, state.now_for(invoice["customer"]))
    else:
        engine.finalize(state, invoice, state.now_for(invoice["customer"]), automatic=False)
    return invoice


@router.add("POST", "/v1/invoices/{id}/pay", sp.InvoicePayParams)
def pay_invoice(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    invoice = state.get("invoice", path["id"])
    now = state.now_for(invoice["customer"])
    if invoice["status"] == "draft":
        engine.finalize_without_payment(state, invoice, now)
    if invoice["status"] == "paid":
        raise StripeError("Invoice is already paid", param="invoice")
    if invoice["status"] != "open":
        raise StripeError(f"You cannot pay an invoice with status {invoice['status']}.")
    if p.get("payment_method"):
        pm = state.get("payment_method", p["payment_method"], "payment_method")
        sub_id = invoice_subscription(invoice)
        sub = state.find("subscription", sub_id) if sub_id else None
        saved = sub.get("default_payment_method") if sub else None
        if sub is not None:
            sub["default_payment_method"] = pm["id"]
        try:
            ok = engine.pay(state, invoice, now, from_api=True)
        finally:
            if sub is not None:
                sub["default_payment_method"] = saved
    else:
        ok = engine.pay(state, invoice, now, from_api=True)
    if not ok:
        error = state.meta_of(invoice["id"]).get("last_payment_error") or {}
        raise StripeError(
            error.get("message") or "Your card was declined.",
            type="card_error",
            code=error.get("code") or "card_declined",
        )
    return invoice


@router.add("POST", "/v1/invoices/{id}/void", sp.InvoiceVoidInvoiceParams)
def void_invoice(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    invoice = state.get("invoice", path["id"])
    if invoice["status"] != "open":
        raise StripeError(f"You can only void open invoices, not {invoice['status']} ones.")
    engine.close_invoice(state, invoice, "void", state.now_for(invoice["customer"]))
    return invoice
