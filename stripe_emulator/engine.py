"""The subscription lifecycle: trials, renewals, invoices, payments, cancellations.

Every change is a function of an explicit time `at`, so the same code runs
when a test clock moves through a month and when wall time passes. Pending
work of a subscription is derived from its state (`actions`), never kept in
a separate queue, so a restarted emulator picks up exactly where it was.
"""

from __future__ import annotations

import copy
import heapq
import logging
from collections.abc import Iterable
from typing import Any

from stripe_emulator.errors import StripeError
from stripe_emulator.state import Obj, State, new_id
from stripe_emulator.timeutil import DAY, add_interval, next_period_end

log = logging.getLogger(__name__)

TRIAL_WILL_END_NOTICE = 3 * DAY
INCOMPLETE_EXPIRY = 23 * 3600

Action = tuple[int, int, str, str]


# -- meters --------------------------------------------------------------------------------


def meter_for_price(state: State, price: Obj) -> Obj | None:
    meter_id = (price.get("recurring") or {}).get("meter")
    return state.find("billing.meter", meter_id) if meter_id else None


def aggregate(state: State, meter: Obj, customer: str, start: int, end: int) -> float:
    """The meter's formula over the customer's events with start <= timestamp < end."""
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    formula = meter["default_aggregation"]["formula"]
    total = 0.0
    count = 0
    last: tuple[int, int, float] | None = None
    for position, event in enumerate(state.meter_events_for(meter["event_name"], customer)):
        payload = event["payload"]
        if payload.get(customer_key) != customer or not start <= event["timestamp"] < end:
            continue
        count += 1
        try:
            value = float(payload.get(value_key, "0"))
        except ValueError:
            continue
        total += value
        if last is None or (event["timestamp"], position) >= last[:2]:
            last = (event["timestamp"], position, value)
    if formula == "count":
        return float(count)
    if formula == "last":
        return last[2] if last else 0.0
    return total


# -- payment -------------------------------------------------------------------------------


def payment_method_for(state: State, sub: Obj | None, customer_id: str) -> Obj | None:
    """Stripe's order: the subscription's default, then the customer's invoice default."""
    if sub is not None and sub.get("default_payment_method"):
        found = state.find("payment_method", sub["default_payment_method"])
        if found is not None:
            return found
    customer = state.find("customer", customer_id)
    if customer is None:
        return None
    pm_id = (customer.get("invoice_settings") or {}).get("default_payment_method")
    return state.find("payment_method", pm_id) if pm_id else None


def charge(state: State, pm: Obj | None) -> tuple[bool, str | None, str | None]:
    """Outcome of charging a test payment method: (succeeded, decline code, message)."""
    if pm is None:
        if state.settings.missing_payment_method_succeeds:
            return True, None, None
        return (
            False,
            "payment_method_missing",
            "The customer has no default payment method to charge.",
        )
    if state.meta_of(pm["id"]).get("behaviour") == "fail":
        return False, "card_declined", "Your card was declined."
    return True, None, None


# -- invoices ------------------------------------------------------------------------------


def _unit_amount(price: Obj) -> float:
    if price.get("unit_amount") is not None:
        return float(price["unit_amount"])
    return float(price.get("unit_amount_decimal") or 0)


def _line(
    state: State,
    invoice: Obj,
    sub: Obj,
    item: Obj,
    quantity: float,
    period: tuple[int, int],
    trial: bool = False,
) -> Obj:
    price = item["price"]
    product = state.find("product", price["product"])
    name = product["name"] if product else price["product"]
    amount = 0 if trial else round(quantity * _unit_amount(price))
    whole = int(quantity) if float(quantity).is_integer() else None
    description = (
        f"Trial period for {name}"
        if trial
        else f"{whole if whole is not None else quantity} \u00d7 {name}"
    )
    return {
        "id": new_id("il"),
        "object": "line_item",
        "amount": amount,
        "currency": price["currency"],
        "description": description,
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": invoice["id"],
        "livemode": False,
        "metadata": {},
        "parent": {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": sub["id"],
                "subscription_item": item["id"],
            },
        },
        "period": {"start": period[0], "end": period[1]},
        "pretax_credit_amounts": [],
        "pricing": {
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": str(price.get("unit_amount_decimal") or _unit_amount(price)),
        },
        "quantity": whole if whole is not None else round(quantity),
        "quantity_decimal": str(quantity),
        "subscription": sub["id"],
        "subtotal": amount,
        "taxes": [],
    }


def _is_metered(item: Obj) -> bool:
    return (item["price"].get("recurring") or {}).get("usage_type") == "metered"


def _totals(invoice: Obj) -> None:
    total = sum(line["amount"] for line in invoice["lines"]["data"])
    paid = invoice["amount_paid"]
    invoice.update(
        subtotal=total,
        subtotal_excluding_tax=total,
        total=total,
        total_excluding_tax=total,
        amount_due=total,
        amount_remaining=max(total - paid, 0),
    )
    invoice["lines"]["total_count"] = len(invoice["lines"]["data"])


def new_invoice(state: State, sub: Obj, reason: str, at: int, period: tuple[int, int]) -> Obj:
    customer = state.get("customer", sub["customer"], param="customer")
    invoice_id = new_id("in")
    invoice: Obj = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe Emulator",
        "account_tax_ids": None,
        "amount_due": 0,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": 0,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": True,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": bool(sub["automatic_tax"]["enabled"]),
            "liability": {"type": "self"} if sub["automatic_tax"]["enabled"] else None,
            "provider": "stripe" if sub["automatic_tax"]["enabled"] else None,
            "status": "complete" if sub["automatic_tax"]["enabled"] else None,
        },
        "automatically_finalizes_at": None,
        "billing_reason": reason,
        "collection_method": sub["collection_method"],
        "created": at,
        "currency": sub["currency"],
        "custom_fields": None,
        "customer": sub["customer"],
        "customer_account": None,
        "customer_address": customer.get("address"),
        "customer_email": customer.get("email"),
        "customer_name": customer.get("name"),
        "customer_phone": customer.get("phone"),
        "customer_shipping": customer.get("shipping"),
        "customer_tax_exempt": customer.get("tax_exempt", "none"),
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": {
            "object": "list",
            "data": [],
            "has_more": False,
            "total_count": 0,
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": copy.deepcopy(sub["metadata"]),
                "subscription": sub["id"],
            },
        },
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": period[1],
        "period_start": period[0],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": 0,
        "subtotal_excluding_tax": 0,
        "test_clock": sub.get("test_clock"),
        "threshold_reason": None,
        "total": 0,
        "total_discount_amounts": [],
        "total_excluding_tax": 0,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": None,
    }
    return invoice


def _refresh_metered_lines(state: State, invoice: Obj, sub: Obj) -> None:
    """Metered quantities are read when the invoice finalizes, like Stripe's grace hour."""
    items = {item["id"]: item for item in sub["items"]["data"]}
    for line in invoice["lines"]["data"]:
        details = line["parent"]["subscription_item_details"]
        item = items.get(details["subscription_item"])
        meta = state.meta_of(line["id"])
        if item is None or not meta.get("metered"):
            continue
        meter = meter_for_price(state, item["price"])
        quantity = (
            aggregate(state, meter, sub["customer"], line["period"]["start"], line["period"]["end"])
            if meter
            else 0.0
        )
        fresh = _line(
            state, invoice, sub, item, quantity, (line["period"]["start"], line["period"]["end"])
        )
        fresh["id"] = line["id"]
        line.update(fresh)
    _totals(invoice)


def _number(state: State, customer_id: str) -> str:
    customer = state.find("customer", customer_id)
    if customer is None:
        return f"EMU-{new_id('x', 8)[2:]}"
    sequence = customer.get("next_invoice_sequence") or 1
    customer["next_invoice_sequence"] = sequence + 1
    return f"{customer.get('invoice_prefix') or 'EMU'}-{sequence:04d}"


def finalize(state: State, invoice: Obj, at: int, automatic: bool = True) -> None:
    """Draft to open: freeze the lines, emit `invoice.finalized`, then collect.

    While collection is paused with `keep_as_draft`, automatic finalization
    leaves the invoice a draft that no longer advances by itself.
    """
    sub = state.find(
        "subscription",
        (invoice["parent"] or {}).get("subscription_details", {}).get("subscription", ""),
    )
    pause = (sub or {}).get("pause_collection")
    if automatic and pause and pause.get("behavior") == "keep_as_draft":
        invoice.update(auto_advance=False, automatically_finalizes_at=None)
        _forget_invoice(state, invoice)
        state.touch()
        return
    if sub is not None:
        _refresh_metered_lines(state, invoice, sub)
    invoice.update(
        status="open",
        number=_number(state, invoice["customer"]),
        automatically_finalizes_at=None,
        effective_at=at,
        ending_balance=0,
        hosted_invoice_url=f"https://invoice.stripe.com/i/emulator/{invoice['id']}",
        invoice_pdf=f"https://pay.stripe.com/invoice/emulator/{invoice['id']}/pdf",
    )
    invoice["status_transitions"]["finalized_at"] = at
    state.emit("invoice.finalized", invoice, at, from_api=False)
    if pause:
        behaviour = pause.get("behavior")
        if behaviour == "void":
            close_invoice(state, invoice, "void", at)
        elif behaviour == "mark_uncollectible":
            close_invoice(state, invoice, "uncollectible", at)
        return
    if invoice["collection_method"] == "charge_automatically":
        pay(state, invoice, at, from_api=False)


def close_invoice(state: State, invoice: Obj, status: str, at: int) -> None:
    previous = {"status": invoice["status"]}
    invoice["status"] = status
    key = "voided_at" if status == "void" else "marked_uncollectible_at"
    invoice["status_transitions"][key] = at
    invoice["next_payment_attempt"] = None
    event = "invoice.voided" if status == "void" else "invoice.marked_uncollectible"
    state.emit(event, invoice, at, previous=previous, from_api=False)
    _forget_invoice(state, invoice)


def _forget_invoice(state: State, invoice: Obj) -> None:
    sub_id = ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    if sub_id:
        pending = state.meta_of(sub_id).setdefault("pending_invoices", [])
        if invoice["id"] in pending:
            pending.remove(invoice["id"])


def pay(state: State, invoice: Obj, at: int, from_api: bool) -> bool:
    """Attempt to collect an open invoice; updates the subscription's status after."""
    sub_id = ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    sub = state.find("subscription", sub_id) if sub_id else None
    invoice["attempted"] = True
    if invoice["amount_remaining"] <= 0:
        ok, code, message = True, None, None
    else:
        invoice["attempt_count"] += 1
        pm = payment_method_for(state, sub, invoice["customer"])
        ok, code, message = charge(state, pm)
    if ok:
        invoice.update(
            status="paid",
            amount_paid=invoice["amount_due"],
            amount_remaining=0,
            next_payment_attempt=None,
        )
        invoice["status_transitions"]["paid_at"] = at
        state.emit("invoice.paid", invoice, at, from_api=from_api)
        state.emit("invoice.payment_succeeded", invoice, at, from_api=from_api)
        _forget_invoice(state, invoice)
    else:
        retries = state.settings.payment_retry_days
        attempt = invoice["attempt_count"]
        invoice["next_payment_attempt"] = (
            at + retries[attempt - 1] * DAY if attempt - 1 < len(retries) else None
        )
        invoice["last_finalization_error"] = None
        state.meta_of(invoice["id"])["last_payment_error"] = {"code": code, "message": message}
        state.emit("invoice.payment_failed", invoice, at, from_api=from_api)
        if invoice["next_payment_attempt"] is None:
            _forget_invoice(state, invoice)
    if sub is not None:
        _after_payment(state, sub, invoice, ok, at, from_api)
    return ok


def _after_payment(state: State, sub: Obj, invoice: Obj, ok: bool, at: int, from_api: bool) -> None:
    status = sub["status"]
    if ok:
        if status in ("incomplete", "past_due", "unpaid") and not _unpaid_invoices(state, sub):
            set_fields(state, sub, {"status": "active"}, at, from_api=from_api)
        return
    if status == "incomplete" or invoice["billing_reason"] == "subscription_create":
        return
    if invoice["next_payment_attempt"] is None and invoice["attempt_count"] > len(
        state.settings.payment_retry_days
    ):
        final = state.settings.dunning_final_status
        if final == "canceled":
            cancel_now(state, sub, at, reason="payment_failed", from_api=from_api)
        elif status != final:
            set_fields(state, sub, {"status": final}, at, from_api=from_api)
        return
    if status in ("active", "trialing"):
        set_fields(state, sub, {"status": "past_due"}, at, from_api=from_api)


def _unpaid_invoices(state: State, sub: Obj) -> list[Obj]:
    return [
        inv
        for inv in state.collection("invoice").values()
        if inv["status"] == "open"
        and ((inv.get("parent") or {}).get("subscription_details") or {}).get("subscription")
        == sub["id"]
    ]


def first_invoice(state: State, sub: Obj, at: int, period: tuple[int, int], trial: bool) -> Obj:
    """The `subscription_create` invoice: licensed items for the first period (zero in a trial)."""
    invoice = new_invoice(state, sub, "subscription_create", at, (at, at))
    for item in sub["items"]["data"]:
        if not _is_metered(item):
            quantity = float(item.get("quantity") or 1)
            invoice["lines"]["data"].append(
                _line(state, invoice, sub, item, quantity, period, trial)
            )
    _totals(invoice)
    state.put(invoice)
    sub["latest_invoice"] = invoice["id"]
    state.emit("invoice.created", invoice, at, from_api=False)
    return invoice


def finalize_without_payment(state: State, invoice: Obj, at: int) -> None:
    """Open the invoice but leave collection to someone else (send_invoice, default_incomplete)."""
    invoice.update(status="open", number=_number(state, invoice["customer"]), effective_at=at)
    invoice["status_transitions"]["finalized_at"] = at
    state.emit("invoice.finalized", invoice, at, from_api=False)


# -- subscription changes ------------------------------------------------------------------


def set_fields(
    state: State,
    sub: Obj,
    changes: dict[str, Any],
    at: int,
    from_api: bool = True,
    event: str = "customer.subscription.updated",
) -> dict[str, Any]:
    """Apply top-level changes and emit one update event naming the previous values."""
    previous: dict[str, Any] = {
        k: copy.deepcopy(sub.get(k)) for k, v in changes.items() if sub.get(k) != v
    }
    sub.update(changes)
    state.touch()
    if previous:
        state.emit(event, sub, at, previous=previous, from_api=from_api)
    return previous


def period_end(sub: Obj) -> int:
    return min(int(item["current_period_end"]) for item in sub["items"]["data"])


def period_start(sub: Obj) -> int:
    return min(int(item["current_period_start"]) for item in sub["items"]["data"])


def interval_of(sub: Obj) -> tuple[str, int]:
    recurring = sub["items"]["data"][0]["price"].get("recurring") or {}
    return recurring.get("interval", "month"), int(recurring.get("interval_count") or 1)


def _move_periods(sub: Obj, start: int, end: int) -> Obj:
    previous_items: Obj = copy.deepcopy(sub["items"])
    for item in sub["items"]["data"]:
        item["current_period_start"] = start
        item["current_period_end"] = end
    return previous_items


def cancel_now(
    state: State,
    sub: Obj,
    at: int,
    reason: str | None = None,
    from_api: bool = True,
    canceled_at: int | None = None,
) -> None:
    """End the subscription: status canceled, `customer.subscription.deleted`."""
    previous = {
        "status": sub["status"],
        "ended_at": sub.get("ended_at"),
        "canceled_at": sub.get("canceled_at"),
    }
    sub.update(
        status="canceled",
        ended_at=at,
        canceled_at=canceled_at if canceled_at is not None else at,
    )
    if reason is not None:
        sub["cancellation_details"] = {"comment": None, "feedback": None, "reason": reason}
    pending = state.meta_of(sub["id"]).setdefault("pending_invoices", [])
    for invoice_id in list(pending):
        invoice = state.find("invoice", invoice_id)
        if invoice is not None and invoice["status"] == "open":
            invoice["next_payment_attempt"] = None
            pending.remove(invoice_id)
    state.touch()
    state.emit("customer.subscription.deleted", sub, at, previous=previous, from_api=from_api)


def start_period(
    state: State,
    sub: Obj,
    at: int,
    reason: str,
    from_api: bool,
    finalize_now: bool = False,
    extra: dict[str, Any] | None = None,
) -> Obj:
    """A fresh period anchored at `at` (trial end, resume): new anchor, invoice, events."""
    interval, count = interval_of(sub)
    end = add_interval(at, interval, count)
    previous_items = _move_periods(sub, at, end)
    changes: dict[str, Any] = {"billing_cycle_anchor": at, **(extra or {})}
    previous = {k: copy.deepcopy(sub.get(k)) for k, v in changes.items() if sub.get(k) != v}
    previous["items"] = previous_items
    previous["latest_invoice"] = sub.get("latest_invoice")
    sub.update(changes)
    invoice = new_invoice(state, sub, reason, at, (at, at))
    sub["latest_invoice"] = invoice["id"]
    state.emit("customer.subscription.updated", sub, at, previous=previous, from_api=from_api)
    _bill_prepared(state, sub, invoice, at, (at, end), finalize_now)
    return invoice


def _bill_prepared(
    state: State, sub: Obj, invoice: Obj, at: int, period: tuple[int, int], finalize_now: bool
) -> None:
    for item in sub["items"]["data"]:
        if not _is_metered(item):
            invoice["lines"]["data"].append(
                _line(state, invoice, sub, item, float(item.get("quantity") or 1), period)
            )
    _totals(invoice)
    state.put(invoice)
    state.emit("invoice.created", invoice, at, from_api=False)
    delay = state.settings.invoice_finalization_delay
    if finalize_now or delay <= 0:
        finalize(state, invoice, at)
    else:
        invoice["automatically_finalizes_at"] = at + delay
        state.meta_of(sub["id"]).setdefault("pending_invoices", []).append(invoice["id"])


def end_trial(state: State, sub: Obj, at: int, from_api: bool = False) -> None:
    """Trial over: bill the first period, or pause/cancel without a payment method."""
    if not state.meta_of(sub["id"]).get("trial_will_end_sent"):
        state.meta_of(sub["id"])["trial_will_end_sent"] = True
        state.emit("customer.subscription.trial_will_end", sub, at, from_api=from_api)
    pm = payment_method_for(state, sub, sub["customer"])
    has_pm = pm is not None or state.settings.missing_payment_method_succeeds
    behaviour = ((sub.get("trial_settings") or {}).get("end_behavior") or {}).get(
        "missing_payment_method"
    ) or "create_invoice"
    if not has_pm and behaviour == "cancel":
        cancel_now(state, sub, at, reason="cancellation_requested", from_api=from_api)
        return
    if not has_pm and behaviour == "pause":
        sub["status_details"] = {
            "paused": {"subscription": {"type": "trial_end_without_payment_method"}}
        }
        set_fields(
            state, sub, {"status": "paused", "pause_collection": None}, at, from_api=from_api
        )
        state.emit("customer.subscription.paused", sub, at, from_api=from_api)
        return
    start_period(
        state,
        sub,
        at,
        "subscription_cycle",
        from_api,
        finalize_now=from_api,
        extra={"status": "active"},
    )


def renew(state: State, sub: Obj, at: int) -> None:
    """Period end: advance the items' period and invoice usage of the period that ended."""
    interval, count = interval_of(sub)
    old = (period_start(sub), period_end(sub))
    end = next_period_end(int(sub["billing_cycle_anchor"]), at, interval, count)
    previous_items = _move_periods(sub, at, end)
    previous = {"items": previous_items, "latest_invoice": sub.get("latest_invoice")}
    invoice = new_invoice(state, sub, "subscription_cycle", at, old)
    sub["latest_invoice"] = invoice["id"]
    state.emit("customer.subscription.updated", sub, at, previous=previous, from_api=False)
    for item in sub["items"]["data"]:
        if _is_metered(item):
            line = _line(state, invoice, sub, item, 0.0, old)
            state.meta_of(line["id"])["metered"] = True
            invoice["lines"]["data"].append(line)
    _bill_prepared(state, sub, invoice, at, (at, end), finalize_now=False)


# -- scheduling ----------------------------------------------------------------------------


def actions(state: State, sub: Obj) -> list[Action]:
    """What will happen to this subscription next, as (time, priority, kind, target)."""
    out: list[Action] = []
    status = sub["status"]
    meta = state.meta_of(sub["id"])
    if meta.get("engine_error"):
        return out
    cancel_at = sub.get("cancel_at")
    if status == "trialing" and sub.get("trial_end"):
        trial_end = int(sub["trial_end"])
        if cancel_at and cancel_at <= trial_end:
            out.append((int(cancel_at), 3, "cancel", sub["id"]))
        else:
            if not meta.get("trial_will_end_sent"):
                notice = max(trial_end - TRIAL_WILL_END_NOTICE, int(sub.get("trial_start") or 0))
                out.append((notice, 0, "trial_will_end", sub["id"]))
            out.append((trial_end, 4, "trial_end", sub["id"]))
    elif status in ("active", "past_due", "unpaid"):
        end = period_end(sub)
        if cancel_at:
            out.append((int(cancel_at), 3, "cancel", sub["id"]))
        if not cancel_at or cancel_at > end:
            out.append((end, 5, "renew", sub["id"]))
        resumes = (sub.get("pause_collection") or {}).get("resumes_at")
        if resumes:
            out.append((int(resumes), 0, "unpause", sub["id"]))
    elif status == "incomplete":
        out.append((int(sub["created"]) + INCOMPLETE_EXPIRY, 6, "expire", sub["id"]))
    for invoice_id in meta.get("pending_invoices", []):
        invoice = state.find("invoice", invoice_id)
        if invoice is None:
            continue
        if invoice["status"] == "draft" and invoice.get("automatically_finalizes_at"):
            out.append((int(invoice["automatically_finalizes_at"]), 1, "finalize", invoice_id))
        elif invoice["status"] == "open" and invoice.get("next_payment_attempt"):
            out.append((int(invoice["next_payment_attempt"]), 2, "retry", invoice_id))
    return out


def execute(state: State, sub: Obj, action: Action) -> None:
    at, _, kind, target = action
    if kind == "trial_will_end":
        state.meta_of(sub["id"])["trial_will_end_sent"] = True
        state.emit("customer.subscription.trial_will_end", sub, at, from_api=False)
    elif kind == "trial_end":
        end_trial(state, sub, at)
    elif kind == "renew":
        renew(state, sub, at)
    elif kind == "cancel":
        cancel_now(state, sub, at, from_api=False, canceled_at=sub.get("canceled_at") or at)
    elif kind == "unpause":
        set_fields(state, sub, {"pause_collection": None}, at, from_api=False)
    elif kind == "expire":
        for invoice in _unpaid_invoices(state, sub):
            close_invoice(state, invoice, "void", at)
        previous = {"status": sub["status"]}
        sub.update(status="incomplete_expired", ended_at=at)
        state.emit("customer.subscription.deleted", sub, at, previous=previous, from_api=False)
    elif kind == "finalize":
        invoice = state.get("invoice", target)
        finalize(state, invoice, at)
    elif kind == "retry":
        invoice = state.get("invoice", target)
        pay(state, invoice, at, from_api=False)
    state.touch()


def run(state: State, subs: Iterable[Obj], until: int, on_time: Any = None) -> int:
    """Play every due action of `subs` up to `until`, oldest first; returns how many ran."""
    heap: list[tuple[int, int, int, str, str, str]] = []
    counter = 0
    by_id: dict[str, Obj] = {}

    def push(sub: Obj) -> None:
        nonlocal counter
        for at, priority, kind, target in actions(state, sub):
            if at <= until:
                counter += 1
                heapq.heappush(heap, (at, priority, counter, kind, target, sub["id"]))

    for sub in subs:
        by_id[sub["id"]] = sub
        push(sub)
    done = 0
    while heap:
        at, priority, _, kind, target, sub_id = heapq.heappop(heap)
        sub = by_id[sub_id]
        if (at, priority, kind, target) not in actions(state, sub):
            continue
        if on_time is not None:
            on_time(at)
        try:
            execute(state, sub, (at, priority, kind, target))
        except Exception as exc:
            # A broken subscription must not stop time for every other one.
            log.exception("billing transition %s of %s failed", kind, sub_id)
            state.meta_of(sub_id)["engine_error"] = f"{kind}: {exc}"
        done += 1
        if done > 100000:
            raise StripeError("Too many billing transitions in one step", type="api_error")
        push(sub)
    return done


def settle(state: State, sub: Obj) -> None:
    """Run what is already due for one subscription at its customer's present time."""
    run(state, [sub], state.now_for(sub["customer"]))
