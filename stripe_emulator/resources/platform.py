"""Test clocks, webhook endpoints, events and the billing portal."""

from __future__ import annotations

import copy
import secrets

from stripe import params as sp
from stripe.params import billing_portal as portal
from stripe.params import test_helpers as th

from stripe_emulator import engine
from stripe_emulator.errors import StripeError, missing
from stripe_emulator.resources.core import emit_update
from stripe_emulator.routing import (
    Ctx,
    Params,
    merge_metadata,
    newest_first,
    paginate,
    router,
    timestamp_filter,
)
from stripe_emulator.state import Obj, new_id, require
from stripe_emulator.timeutil import add_interval

# -- test clocks -----------------------------------------------------------------------------


@router.add("POST", "/v1/test_helpers/test_clocks", th.TestClockCreateParams)
def create_clock(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    now = state.wall_now()
    clock: Obj = {
        "id": new_id("clock"),
        "object": "test_helpers.test_clock",
        "created": now,
        "deletes_after": now + 30 * 86400,
        "frozen_time": int(require(p.get("frozen_time"), "frozen_time")),
        "livemode": False,
        "name": p.get("name"),
        "status": "ready",
        "status_details": {},
    }
    state.put(clock)
    state.emit("test_helpers.test_clock.created", clock, clock["frozen_time"])
    return clock


@router.add("GET", "/v1/test_helpers/test_clocks/{id}", th.TestClockRetrieveParams)
def retrieve_clock(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("test_helpers.test_clock", path["id"])


@router.add("GET", "/v1/test_helpers/test_clocks", th.TestClockListParams)
def list_clocks(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = newest_first(ctx.state.collection("test_helpers.test_clock").values())
    return paginate(items, p, "/v1/test_helpers/test_clocks")


@router.add("DELETE", "/v1/test_helpers/test_clocks/{id}", th.TestClockDeleteParams)
def delete_clock(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    """Deleting a clock deletes the customers and subscriptions that live on it."""
    state = ctx.state
    clock = state.get("test_helpers.test_clock", path["id"])
    for kind in ("subscription", "invoice", "customer"):
        collection = state.collection(kind)
        for object_id in [k for k, v in collection.items() if v.get("test_clock") == clock["id"]]:
            del collection[object_id]
    del state.collection("test_helpers.test_clock")[clock["id"]]
    state.touch()
    state.emit("test_helpers.test_clock.deleted", clock, clock["frozen_time"])
    return {"id": clock["id"], "object": "test_helpers.test_clock", "deleted": True}


def _advance_limit(ctx: Ctx, clock: Obj) -> int:
    """Stripe's bound: two intervals of the shortest live subscription (else two years)."""
    frozen = int(clock["frozen_time"])
    limits = [add_interval(frozen, "year", 2)]
    for sub in ctx.state.collection("subscription").values():
        if sub.get("test_clock") == clock["id"] and sub["status"] not in (
            "canceled",
            "incomplete_expired",
        ):
            interval, count = engine.interval_of(sub)
            limits.append(add_interval(frozen, interval, 2 * count))
    return min(limits)


@router.add("POST", "/v1/test_helpers/test_clocks/{id}/advance", th.TestClockAdvanceParams)
def advance_clock(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    """Move the clock, playing every transition on its subscriptions in time order.

    Stripe answers `advancing` and finishes in the background; here the work is
    done before answering, so the clock comes back `ready`.
    """
    state = ctx.state
    clock = state.get("test_helpers.test_clock", path["id"])
    target = int(require(p.get("frozen_time"), "frozen_time"))
    start = int(clock["frozen_time"])
    if target <= start:
        raise StripeError(
            f"The test clock's frozen_time must be advanced to a time after its current "
            f"frozen_time ({start}).",
            param="frozen_time",
        )
    limit = _advance_limit(ctx, clock)
    if target > limit and state.settings.enforce_advance_limit:
        raise StripeError(
            "Cannot advance the test clock more than two intervals beyond the shortest "
            f"subscription interval on this clock (at most to {limit}).",
            param="frozen_time",
        )
    clock["status"] = "advancing"
    clock["status_details"] = {"advancing": {"target_frozen_time": target}}
    state.emit("test_helpers.test_clock.advancing", clock, start)
    subs = [
        s for s in state.collection("subscription").values() if s.get("test_clock") == clock["id"]
    ]

    def move(at: int) -> None:
        clock["frozen_time"] = at

    engine.run(state, subs, target, on_time=move)
    clock.update(frozen_time=target, status="ready", status_details={})
    state.touch()
    state.emit("test_helpers.test_clock.ready", clock, target)
    return clock


# -- webhook endpoints -----------------------------------------------------------------------


@router.add("POST", "/v1/webhook_endpoints", sp.WebhookEndpointCreateParams)
def create_endpoint(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    endpoint: Obj = {
        "id": new_id("we"),
        "object": "webhook_endpoint",
        "api_version": p.get("api_version"),
        "application": None,
        "created": state.wall_now(),
        "description": p.get("description"),
        "enabled_events": list(require(p.get("enabled_events"), "enabled_events")),
        "livemode": False,
        "metadata": merge_metadata({}, p.get("metadata")),
        "secret": "whsec_" + secrets.token_hex(24),
        "status": "enabled",
        "url": require(p.get("url"), "url"),
    }
    return state.put(endpoint)


@router.add("GET", "/v1/webhook_endpoints/{id}", sp.WebhookEndpointRetrieveParams)
def retrieve_endpoint(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("webhook_endpoint", path["id"])


@router.add("POST", "/v1/webhook_endpoints/{id}", sp.WebhookEndpointUpdateParams)
def update_endpoint(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    endpoint = ctx.state.get("webhook_endpoint", path["id"])
    for key in ("url", "description"):
        if key in p:
            endpoint[key] = p[key] or None
    if "enabled_events" in p:
        endpoint["enabled_events"] = list(p["enabled_events"])
    if "disabled" in p:
        endpoint["status"] = "disabled" if p["disabled"] else "enabled"
    if "metadata" in p:
        endpoint["metadata"] = merge_metadata(endpoint["metadata"], p["metadata"])
    ctx.state.touch()
    return endpoint


@router.add("DELETE", "/v1/webhook_endpoints/{id}", sp.WebhookEndpointDeleteParams)
def delete_endpoint(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    endpoint = ctx.state.get("webhook_endpoint", path["id"])
    del ctx.state.collection("webhook_endpoint")[endpoint["id"]]
    ctx.state.touch()
    return {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}


@router.add("GET", "/v1/webhook_endpoints", sp.WebhookEndpointListParams)
def list_endpoints(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = newest_first(ctx.state.collection("webhook_endpoint").values())
    return paginate(items, p, "/v1/webhook_endpoints")


# -- events ----------------------------------------------------------------------------------


def _type_matches(pattern: str, event_type: str) -> bool:
    if pattern.endswith("*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


@router.add("GET", "/v1/events", sp.EventListParams)
def list_events(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    types = p.get("types")
    state = ctx.state
    items = []
    for event in newest_first(state.collection("event").values()):
        if "type" in p and not _type_matches(p["type"], event["type"]):
            continue
        if types is not None and not any(_type_matches(t, event["type"]) for t in types):
            continue
        if not timestamp_filter(p.get("created"), event["created"]):
            continue
        if "delivery_success" in p:
            statuses = [d["status"] for d in state.deliveries.get(event["id"], {}).values()]
            delivered = bool(statuses) and all(s == "succeeded" for s in statuses)
            if delivered != p["delivery_success"]:
                continue
        items.append(event)
    return paginate(items, p, "/v1/events")


@router.add("GET", "/v1/events/{id}", sp.EventRetrieveParams)
def retrieve_event(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    event = ctx.state.find("event", path["id"])
    if event is None:
        raise missing("event", path["id"])
    return event


# -- billing portal --------------------------------------------------------------------------


def _configuration(ctx: Ctx, p: Params, is_default: bool) -> Obj:
    now = ctx.state.wall_now()
    profile = p.get("business_profile") or {}
    return {
        "id": new_id("bpc"),
        "object": "billing_portal.configuration",
        "active": True,
        "application": None,
        "business_profile": {
            "headline": profile.get("headline"),
            "privacy_policy_url": profile.get("privacy_policy_url"),
            "terms_of_service_url": profile.get("terms_of_service_url"),
        },
        "created": now,
        "default_return_url": p.get("default_return_url") or None,
        "features": copy.deepcopy(p.get("features") or {}),
        "is_default": is_default,
        "livemode": False,
        "login_page": {"enabled": bool((p.get("login_page") or {}).get("enabled")), "url": None},
        "metadata": merge_metadata({}, p.get("metadata")),
        "name": p.get("name"),
        "updated": now,
    }


@router.add("POST", "/v1/billing_portal/configurations", portal.ConfigurationCreateParams)
def create_configuration(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    first = not state.collection("billing_portal.configuration")
    configuration = state.put(_configuration(ctx, p, is_default=first))
    state.emit("billing_portal.configuration.created", configuration, configuration["created"])
    return configuration


@router.add("GET", "/v1/billing_portal/configurations", portal.ConfigurationListParams)
def list_configurations(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    items = [
        c
        for c in newest_first(ctx.state.collection("billing_portal.configuration").values())
        if ("active" not in p or c["active"] == p["active"])
        and ("is_default" not in p or c["is_default"] == p["is_default"])
    ]
    return paginate(items, p, "/v1/billing_portal/configurations")


@router.add("GET", "/v1/billing_portal/configurations/{id}", portal.ConfigurationRetrieveParams)
def retrieve_configuration(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    return ctx.state.get("billing_portal.configuration", path["id"])


@router.add("POST", "/v1/billing_portal/configurations/{id}", portal.ConfigurationUpdateParams)
def update_configuration(ctx: Ctx, p: Params, path: dict[str, str]) -> Obj:
    state = ctx.state
    configuration = state.get("billing_portal.configuration", path["id"])
    before = copy.deepcopy(configuration)
    for key in ("active", "default_return_url", "name"):
        if key in p:
            configuration[key] = p[key] if p[key] != "" else None
    if "features" in p:
        configuration["features"].update(p["features"])
    if "business_profile" in p:
        configuration["business_profile"].update(p["business_profile"])
    if "metadata" in p:
        configuration["metadata"] = merge_metadata(configuration["metadata"] or {}, p["metadata"])
    if configuration != before:
        configuration["updated"] = state.wall_now()
    emit_update(
        state, configuration, before, "billing_portal.configuration.updated", state.wall_now()
    )
    return configuration


@router.add("POST", "/v1/billing_portal/sessions", portal.SessionCreateParams)
def create_portal_session(ctx: Ctx, p: Params, _: dict[str, str]) -> Obj:
    state = ctx.state
    customer = state.get("customer", require(p.get("customer"), "customer"), param="customer")
    configurations = state.collection("billing_portal.configuration")
    if p.get("configuration"):
        configuration = state.get(
            "billing_portal.configuration", p["configuration"], param="configuration"
        )
    else:
        default = next((c for c in configurations.values() if c["is_default"]), None)
        configuration = default if default is not None else state.put(_configuration(ctx, {}, True))
    return_url = p.get("return_url") or configuration.get("default_return_url")
    session_id = new_id("bps")
    session: Obj = {
        "id": session_id,
        "object": "billing_portal.session",
        "configuration": configuration["id"],
        "created": state.wall_now(),
        "customer": customer["id"],
        "customer_account": None,
        "flow": None,
        "livemode": False,
        "locale": p.get("locale"),
        "on_behalf_of": p.get("on_behalf_of"),
        "return_url": return_url,
        "url": f"{ctx.base_url}/p/session/{session_id}",
    }
    state.put(session)
    state.emit("billing_portal.session.created", session, session["created"])
    return session
