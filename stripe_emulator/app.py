"""The HTTP face: Stripe's wire format in, Stripe's JSON out, plus the control API.

Everything goes through one dispatcher so that the cross-cutting rules of
Stripe (auth, fault injection, idempotency, expansion, error JSON, headers)
apply the same way to every route.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

import stripe_emulator.resources  # noqa: F401  (registers the routes)
from stripe_emulator import engine
from stripe_emulator.errors import StripeError
from stripe_emulator.forms import parse_query
from stripe_emulator.resources import checkout
from stripe_emulator.routing import Ctx, render, router, strip_private
from stripe_emulator.schema import coerce_struct
from stripe_emulator.state import API_VERSION, Obj, State, new_id

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FORM = "application/x-www-form-urlencoded"


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, indent=2),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


class EmulatorApp:
    """ASGI application serving the emulated Stripe API for one `State`."""

    def __init__(
        self,
        state: State,
        extra_stats: Callable[[], dict[str, Any]] | None = None,
        tick: Callable[[], int] | None = None,
    ) -> None:
        self.state = state
        self.extra_stats = extra_stats
        self.tick = tick

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path
        if path.startswith("/_emulator"):
            response = await self.control(request)
        elif path.startswith("/p/session/"):
            response = self.portal_page(path.rsplit("/", 1)[-1])
        elif path.startswith("/c/pay/"):
            response = await self.checkout_page(request, path.rsplit("/", 1)[-1])
        else:
            response = await self.api(request)
        await response(scope, receive, send)

    # -- Stripe API -----------------------------------------------------------------------

    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        key = ""
        if header.lower().startswith("bearer "):
            key = header[7:].strip()
        elif header.lower().startswith("basic "):
            import base64

            try:
                key = base64.b64decode(header[6:]).decode().split(":", 1)[0]
            except ValueError:
                key = ""
        if not key:
            raise StripeError(
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                "or we can help at https://support.stripe.com/.",
                status=401,
            )
        if not key.startswith(("sk_test_", "rk_test_")):
            shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:]
            raise StripeError(f"Invalid API Key provided: {shown}", status=401)
        return key

    async def _params(self, request: Request) -> tuple[dict[str, Any], bytes]:
        params = parse_query(request.url.query)
        body = await request.body()
        if body:
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            if content_type not in (FORM, ""):
                raise StripeError(
                    "Invalid request (check that your POST content type is "
                    f"application/x-www-form-urlencoded). Received {content_type}.",
                )
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise StripeError("Invalid request: the body is not valid UTF-8.") from None
            form = parse_query(text)
            for key in form:
                if key in params:
                    raise StripeError(
                        f"Parameter '{key}' was sent both in the query string and the body.",
                        param=key,
                    )
            params.update(form)
        return params, body

    async def api(self, request: Request) -> Response:
        state = self.state
        request_id = new_id("req", 14)
        method = request.method.upper()
        headers = {
            "Request-Id": request_id,
            "Stripe-Version": request.headers.get("stripe-version") or API_VERSION,
            "Access-Control-Allow-Origin": "*",
        }
        template = request.url.path
        status = 500
        try:
            api_key = self._authenticate(request)
            route, path_params = router.match(method, request.url.path)
            template = route.template
            fault = state.faults.check_request()
            latency = state.faults.settings.latency_ms
            if latency > 0:
                await asyncio.sleep(latency / 1000)
            if fault is not None:
                state.stats[f"faults_injected_{fault.status}"] += 1
                raise fault
            raw, body = await self._params(request)
            params = coerce_struct(route.params, raw) if route.params is not None else raw
            key = request.headers.get("idempotency-key") if method == "POST" else None
            fingerprint = self._fingerprint(method, request.url.path, request.url.query, body)
            ctx = Ctx(state, str(request.base_url).rstrip("/"), api_key, request_id)
            with state.api_request(request_id, key):
                # One lock around lookup, work and record: a concurrent retry with the
                # same key waits and then replays instead of running twice.
                if key:
                    replay = self._replay(api_key, key, fingerprint, headers)
                    if replay is not None:
                        status = replay.status_code
                        return replay
                try:
                    result = route.handler(ctx, params, path_params)
                    body_out = render(state, result, params.get("expand"))
                    if not (method == "POST" and route.template == "/v1/webhook_endpoints"):
                        strip_private(body_out)
                except StripeError as exc:
                    # Stripe keeps the result once an endpoint ran, but not for requests
                    # that failed validation: an invalid_request_error (bad or unknown ids
                    # included, unless `idempotency_saves_missing_resources`) leaves the
                    # key free for a corrected retry.
                    if key and exc.status < 500 and self._saved(exc):
                        self._remember(
                            api_key,
                            key,
                            fingerprint,
                            exc.status,
                            exc.body(request_id),
                            request_id,
                            exc.headers,
                        )
                    raise
                if key:
                    self._remember(api_key, key, fingerprint, 200, body_out, request_id, {})
            status = 200
            return _json(body_out, 200, headers)
        except StripeError as exc:
            status = exc.status
            if status == 429:
                state.stats["rate_limited_429"] += 1
            return _json(exc.body(request_id), exc.status, {**headers, **exc.headers})
        except Exception:
            log.exception("emulator failure on %s %s", method, request.url.path)
            status = 500
            error = StripeError(
                "An unknown error occurred in the Stripe emulator.", type="api_error", status=500
            )
            return _json(error.body(request_id), 500, headers)
        finally:
            with state.lock:
                state.request_stats[f"{method} {template} {status}"] += 1

    def _saved(self, exc: StripeError) -> bool:
        """Whether an error answer is kept under its idempotency key."""
        if exc.type != "invalid_request_error":
            return True
        return (
            self.state.settings.idempotency_saves_missing_resources
            and exc.code == "resource_missing"
        )

    @staticmethod
    def _fingerprint(method: str, path: str, query: str, body: bytes) -> str:
        pairs = sorted(parse_qsl(query, keep_blank_values=True)) + sorted(
            parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        )
        return hashlib.sha256(f"{method} {path} {pairs!r}".encode()).hexdigest()

    def _replay(
        self, api_key: str, key: str, fingerprint: str, headers: dict[str, str]
    ) -> Response | None:
        with self.state.lock:
            record = self.state.idempotent_lookup(api_key, key)
        if record is None:
            return None
        if record["fingerprint"] != fingerprint:
            raise StripeError(
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type="idempotency_error",
            )
        self.state.stats["idempotent_replays"] += 1
        replay_headers = {
            **headers,
            **record.get("headers", {}),
            "Idempotent-Replayed": "true",
            "Original-Request": record["request_id"],
        }
        return _json(record["body"], record["status"], replay_headers)

    def _remember(
        self,
        api_key: str,
        key: str,
        fingerprint: str,
        status: int,
        body: Obj,
        request_id: str,
        headers: dict[str, str],
    ) -> None:
        with self.state.lock:
            self.state.idempotent_store(
                api_key,
                key,
                {
                    "fingerprint": fingerprint,
                    "status": status,
                    "body": body,
                    "request_id": request_id,
                    "headers": headers,
                    "created": self.state.wall_now(),
                },
            )

    # -- control API ----------------------------------------------------------------------

    async def control(self, request: Request) -> Response:
        """Non-Stripe endpoints for tests: faults, stats, reset, settings, tick."""
        path = request.url.path.rstrip("/")
        method = request.method.upper()
        state = self.state
        try:
            payload: dict[str, Any] = {}
            if method in ("POST", "PUT"):
                body = await request.body()
                payload = json.loads(body) if body else {}
                if not isinstance(payload, dict):
                    raise StripeError("The control API takes a JSON object.")
            if path == "/_emulator/faults":
                if method == "GET":
                    return JSONResponse(state.faults.settings.as_dict())
                if method in ("POST", "PUT"):
                    return JSONResponse(state.faults.configure(payload).as_dict())
                if method == "DELETE":
                    state.faults.clear()
                    return JSONResponse(state.faults.settings.as_dict())
            if path == "/_emulator/stats" and method == "GET":
                return JSONResponse(self.stats())
            if path == "/_emulator/reset" and method == "POST":
                state.reset()
                return JSONResponse({"reset": True})
            if path == "/_emulator/settings":
                if method in ("POST", "PUT"):
                    with state.lock:
                        for key, value in payload.items():
                            if not hasattr(state.settings, key):
                                raise StripeError(f"Unknown setting: {key}", param=key)
                            current = getattr(state.settings, key)
                            setattr(state.settings, key, type(current)(value))
                if method in ("GET", "POST", "PUT"):
                    return JSONResponse(
                        {k: getattr(state.settings, k) for k in vars(state.settings)}
                    )
            if path == "/_emulator/tick" and method == "POST" and self.tick is not None:
                return JSONResponse({"transitions": self.tick()})
            if path == "/_emulator/health":
                return JSONResponse({"ok": True})
            raise StripeError(f"Unknown control endpoint {method} {path}", status=404)
        except StripeError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except (ValueError, TypeError) as exc:
            return JSONResponse(StripeError(str(exc)).body(), status_code=400)

    def stats(self) -> dict[str, Any]:
        state = self.state
        with state.lock:
            counters = dict(state.stats)
            requests = dict(state.request_stats)
        by_status: dict[str, int] = {}
        for key, count in requests.items():
            status = key.rsplit(" ", 1)[-1]
            by_status[status] = by_status.get(status, 0) + count
        return {
            "requests": requests,
            "requests_by_status": by_status,
            "rate_limited_429": counters.get("rate_limited_429", 0),
            "faults_injected": {
                "429": counters.get("faults_injected_429", 0),
                "500": counters.get("faults_injected_500", 0),
            },
            "webhooks": {
                "attempted": counters.get("webhook_deliveries_attempted", 0),
                "succeeded": counters.get("webhook_deliveries_succeeded", 0),
                "failed": counters.get("webhook_deliveries_failed", 0),
                "given_up": counters.get("webhook_deliveries_given_up", 0),
                "duplicated": counters.get("webhook_deliveries_duplicated", 0),
                "dropped": counters.get("webhook_deliveries_dropped", 0),
                **(self.extra_stats() if self.extra_stats else {}),
            },
            "meter_events": {
                "accepted": counters.get("meter_events_accepted", 0),
                "duplicate": counters.get("meter_events_duplicate", 0),
                "rejected_window": counters.get("meter_events_rejected_window", 0),
                "no_meter": counters.get("meter_events_no_meter", 0),
                "unknown_customer": counters.get("meter_events_unknown_customer", 0),
            },
            "events_emitted": counters.get("events_emitted", 0),
            "idempotent_replays": counters.get("idempotent_replays", 0),
        }

    # -- billing portal page --------------------------------------------------------------

    def portal_page(self, session_id: str) -> Response:
        """A stand-in for Stripe's hosted portal: enough to show whose portal it is."""
        with self.state.lock:
            session = self.state.find("billing_portal.session", session_id)
            if session is None:
                return HTMLResponse("<h1>Portal session not found</h1>", status_code=404)
            customer = self.state.find("customer", session["customer"]) or {}
            subs = [
                s
                for s in self.state.collection("subscription").values()
                if s["customer"] == session["customer"]
            ]
            rows = "".join(f"<li>{_subscription_line(s)}</li>" for s in subs)
        name = html.escape(
            str(customer.get("name") or customer.get("email") or session["customer"])
        )
        back = html.escape(str(session.get("return_url") or ""))
        page = (
            "<!doctype html><html><head><title>Billing portal (Stripe emulator)</title></head>"
            f"<body><h1>Billing portal for {name}</h1>"
            f"<p>Customer <code>{html.escape(session['customer'])}</code>"
            f" &middot; {html.escape(str(customer.get('email') or ''))}</p>"
            f"<ul>{rows}</ul>"
            + (f'<p><a href="{back}">Return</a></p>' if back else "")
            + "</body></html>"
        )
        return HTMLResponse(page)

    # -- hosted checkout page -------------------------------------------------------------

    async def checkout_page(self, request: Request, session_id: str) -> Response:
        """A stand-in for Stripe's hosted Checkout: a test-card form that completes the session.

        GET shows the form; POST pays (attaches the card, subscribes or sets up)
        and redirects to the session's `success_url`, or shows the form again
        with what went wrong (a declined card, a missing address).
        """
        error: str | None = None
        if request.method.upper() == "POST":
            body = (await request.body()).decode("utf-8", "replace")
            form = dict(parse_qsl(body, keep_blank_values=True))
            try:
                with self.state.lock:
                    session = checkout.complete(self.state, session_id, form)
            except checkout.CheckoutRefused as refused:
                error = str(refused)
            else:
                target = session.get("success_url")
                if target:
                    target = str(target).replace("{CHECKOUT_SESSION_ID}", session_id)
                    return RedirectResponse(target, status_code=303)
                return HTMLResponse(_page("Thanks", "<p id='complete'>Payment complete.</p>"))
        elif request.method.upper() != "GET":
            return HTMLResponse(_page("Not allowed", "<p>GET or POST</p>"), status_code=405)
        with self.state.lock:
            checkout.expire_due(self.state)
            fields = checkout.page_fields(self.state, session_id)
        if fields is None:
            return HTMLResponse(_page("Not found", "<h1>Session not found</h1>"), status_code=404)
        return HTMLResponse(_checkout_form(fields, error), status_code=200 if not error else 402)


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><title>{html.escape(title)} (Stripe emulator)</title>"
        f"</head><body>{body}</body></html>"
    )


def _money(amount: Any, currency: Any) -> str:
    if amount is None:
        return ""
    return f"{int(amount) / 100:.2f} {html.escape(str(currency or '').upper())}"


def _checkout_form(fields: dict[str, Any], error: str | None) -> str:
    session = fields["session"]
    escape = html.escape
    if session["status"] != "open":
        return _page(
            "Checkout",
            f"<h1>Checkout</h1><p id='status'>This checkout session is "
            f"{escape(str(session['status']))}.</p>",
        )
    rows = "".join(
        f"<li>{escape(str(line['name']))}: "
        + ("billed by usage" if line["metered"] else f"{line['quantity']} x ")
        + ("" if line["metered"] else _money(line["unit_amount"], line["currency"]))
        + "</li>"
        for line in fields["lines"]
    )
    heading = "Save a card" if session["mode"] == "setup" else "Subscribe"
    trial = f"<p>{int(fields['trial_days'])} days free</p>" if fields.get("trial_days") else ""
    address = (
        "<fieldset><legend>Billing address</legend>"
        "<label>Address <input name='line1' id='line1'></label>"
        "<label>City <input name='city' id='city'></label>"
        "<label>Postal code <input name='postalCode' id='postalCode' required></label>"
        "<label>Country <input name='country' id='country' maxlength='2' required></label>"
        "</fieldset>"
        if fields["collect_address"]
        else ""
    )
    email = escape(str(fields.get("email") or ""))
    problem = f"<p id='error' role='alert'>{escape(error)}</p>" if error else ""
    cancel = (
        f"<p><a id='cancel' href='{escape(str(session['cancel_url']))}'>Cancel</a></p>"
        if session.get("cancel_url")
        else ""
    )
    body = (
        f"<h1>{heading}</h1><ul>{rows}</ul>{trial}{problem}"
        f"<form method='post' id='payment-form'>"
        f"<label>Email <input name='email' id='email' value='{email}'></label>"
        "<label>Card number <input name='cardNumber' id='cardNumber' required></label>"
        "<label>Expiry <input name='cardExpiry' id='cardExpiry' placeholder='MM / YY'></label>"
        "<label>CVC <input name='cardCvc' id='cardCvc'></label>"
        "<label>Name on card <input name='billingName' id='billingName'></label>"
        f"{address}"
        f"<button type='submit' id='submit'>{'Save card' if session['mode'] == 'setup' else 'Pay'}"
        "</button></form>"
        f"{cancel}"
    )
    return _page("Checkout", body)


def _readable(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _subscription_line(sub: Obj) -> str:
    """One subscription as a person reads it: its status and the next date that matters."""
    status = str(sub["status"])
    if status in ("canceled", "incomplete_expired"):
        when = f"ended {_readable(int(sub.get('ended_at') or engine.period_end(sub)))}"
    elif status == "trialing" and sub.get("trial_end"):
        when = f"trial ends {_readable(int(sub['trial_end']))}"
    elif sub.get("cancel_at_period_end") or sub.get("cancel_at"):
        when = f"ends {_readable(int(sub.get('cancel_at') or engine.period_end(sub)))}"
    else:
        when = f"renews {_readable(engine.period_end(sub))}"
    return f"{html.escape(str(sub['id']))}: {html.escape(status)}, {when}"
