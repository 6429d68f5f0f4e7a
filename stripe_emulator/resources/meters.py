"""Billing meters, meter events (identifier dedupe, time window) and event summaries."""

from __future__ import annotations

import copy
import uuid

from stripe.params import billing as bp

from stripe_emulator import engine
from stripe_emulator.errors import StripeError
from stripe_emulator.routing import Ctx, Params, newest_first, paginate, router
from stripe_emulator.state import Obj, new_id, require
from stripe_emulator.timeutil import DAY

PAST_WINDOW = 35 * DAY
FUTURE_WINDOW = 5 * 60
GROUPING_WINDOWS = {"hour": 3600, "day": DAY}


@router.add("POST", "/v1/billing/meters", bp.MeterCreateParams)
def create_meter(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    event_name = require(p.get("event_name"), "event_name")
    for existing in state.collection("billing.meter").values():
        if existing["event_name"] == event_name and existing["status"] == "active":
            raise StripeError(
                f"An active meter with event_name `{event_name}` already exists "
                f"({existing['id']}).",
                param="event_name",
            )
    formula = require(
        (p.get("default_aggregation") or {}).get("formula"), "default_aggregation[formula]"
    )
    if formula not in ("sum", "count", "last"):
        raise StripeError(
            "Invalid default_aggregation[formula]: must be one of count, last, or sum",
            param="default_aggregation[formula]",
        )
    mapping = p.get("customer_mapping") or {}
    now = state.wall_now()
    meter: Obj = {
        "id": new_id("mtr"),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {
            "event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
            "type": mapping.get("type", "by_id"),
        },
        "default_aggregation": {"formula": formula},
        "display_name": require(p.get("display_name"), "display_name"),
        "event_name": event_name,
        "event_time_window": p.get("event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {
            "event_payload_key": (p.get("value_settings") or {}).get("event_payload_key", "value")
        },
    }
    state.put(meter)
    state.emit("billing.meter.created", meter, now)
    return meter


@router.add("GET", "/v1/billing/meters/{id}", bp.MeterRetrieveParams)
def retrieve_meter(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("billing.meter", path["id"])


@router.add("POST", "/v1/billing/meters/{id}", bp.MeterUpdateParams)
def update_meter(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    meter = state.get("billing.meter", path["id"])
    previous = {}
    if "display_name" in p and p["display_name"] != meter["display_name"]:
        previous["display_name"] = meter["display_name"]
        meter["display_name"] = p["display_name"]
        meter["updated"] = state.wall_now()
        state.touch()
        state.emit("billing.meter.updated", meter, meter["updated"], previous=previous)
    return meter


def _set_meter_status(ctx: Ctx, meter_id: str, status: str) -> Obj:
    state = ctx.state
    meter = state.get("billing.meter", meter_id)
    now = state.wall_now()
    if meter["status"] != status:
        previous = {
            "status": meter["status"],
            "status_transitions": copy.deepcopy(meter["status_transitions"]),
        }
        meter["status"] = status
        meter["status_transitions"]["deactivated_at"] = now if status == "inactive" else None
        meter["updated"] = now
        state.touch()
        kind = "deactivated" if status == "inactive" else "reactivated"
        state.emit(f"billing.meter.{kind}", meter, now, previous=previous)
    return meter


@router.add("POST", "/v1/billing/meters/{id}/deactivate", bp.MeterDeactivateParams)
def deactivate_meter(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return _set_meter_status(ctx, path["id"], "inactive")


@router.add("POST", "/v1/billing/meters/{id}/reactivate", bp.MeterReactivateParams)
def reactivate_meter(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return _set_meter_status(ctx, path["id"], "active")


@router.add("GET", "/v1/billing/meters", bp.MeterListParams)
def list_meters(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = [
        m
        for m in newest_first(ctx.state.collection("billing.meter").values())
        if "status" not in p or m["status"] == p["status"]
    ]
    return paginate(items, p, "/v1/billing/meters")


@router.add("POST", "/v1/billing/meter_events", bp.MeterEventCreateParams)
def create_meter_event(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    """Accept a usage event; Stripe checks the customer and meter later, the window now.

    A reused `identifier` is refused like Stripe does: 400 `invalid_request_error`,
    no error code, message `An event already exists with identifier <id>.`.
    """
    state = ctx.state
    event_name = require(p.get("event_name"), "event_name")
    payload = p.get("payload") or {}
    meter = next(
        (
            m
            for m in state.collection("billing.meter").values()
            if m["event_name"] == event_name and m["status"] == "active"
        ),
        None,
    )
    customer_key = meter["customer_mapping"]["event_payload_key"] if meter else "stripe_customer_id"
    customer_id = payload.get(customer_key)
    now = state.now_for(customer_id if isinstance(customer_id, str) else None)
    timestamp = int(p.get("timestamp", now))
    if timestamp < now - PAST_WINDOW:
        state.stats["meter_events_rejected_window"] += 1
        raise StripeError(
            "The event timestamp cannot be more than 35 days in past. Expected a timestamp "
            f"greater than or equal to {now - PAST_WINDOW}.",
            param="timestamp",
        )
    if timestamp > now + FUTURE_WINDOW:
        state.stats["meter_events_rejected_window"] += 1
        raise StripeError(
            "The event timestamp cannot be more than 5 minutes in the future. Expected a "
            f"timestamp less than or equal to {now + FUTURE_WINDOW}.",
            param="timestamp",
        )
    identifier = p.get("identifier") or str(uuid.uuid4())
    if identifier in state.meter_identifiers:
        state.stats["meter_events_duplicate"] += 1
        raise StripeError(f"An event already exists with identifier {identifier}.")
    if meter is None:
        state.stats["meter_events_no_meter"] += 1
    elif not customer_id or state.find("customer", str(customer_id)) is None:
        state.stats["meter_events_unknown_customer"] += 1
    event: Obj = {
        "object": "billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": dict(payload),
        "timestamp": timestamp,
    }
    state.meter_identifiers[identifier] = now
    state.add_meter_event(copy.deepcopy(event), customer_key)
    state.stats["meter_events_accepted"] += 1
    return event


@router.add("GET", "/v1/billing/meters/{id}/event_summaries", bp.MeterListEventSummariesParams)
def list_event_summaries(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    meter = state.get("billing.meter", path["id"])
    customer = require(p.get("customer"), "customer")
    start, end = int(p["start_time"]), int(p["end_time"])
    if end <= start:
        raise StripeError("end_time must be after start_time.", param="end_time")
    window = p.get("value_grouping_window")
    step = GROUPING_WINDOWS.get(window, end - start) if window else end - start
    summaries: list[Obj] = []
    cursor = start
    while cursor < end:
        stop = min(cursor + step, end)
        summaries.append(
            {
                "id": f"mtrusg_{meter['id'][4:]}_{cursor}",
                "object": "billing.meter_event_summary",
                "aggregated_value": engine.aggregate(state, meter, customer, cursor, stop),
                "end_time": stop,
                "livemode": False,
                "meter": meter["id"],
                "start_time": cursor,
            }
        )
        cursor = stop
    return paginate(summaries, p, f"/v1/billing/meters/{meter['id']}/event_summaries")
