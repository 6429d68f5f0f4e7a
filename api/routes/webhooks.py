"""`POST /api/webhooks/stripe`: verify, route to an org, hand over, then answer.

Stripe retries anything but a 2xx for days, so the answer is honest: 2xx only
once the event is durably with Temporal (or durably recorded as not ours), 503
while Temporal or the database is down, 4xx for what retrying cannot fix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Literal

import stripe
from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.service import RPCError

from api import store
from api.deps import require_stripe, services_of
from api.errors import (
    answer_example,
    database_unavailable,
    problem,
    responses,
    temporal_unavailable,
)
from api.log_limits import BoundedLog
from api.metrics import UNVERIFIED_EVENT_TYPE, BillingMetrics, event_type_label
from api.temporal import TemporalLink, TemporalUnavailableError, is_unreachable
from api.webhook_events import (
    MAX_BODY_BYTES,
    WEBHOOK_REQUEST_BODY,
    StripeEventCreate,
    customer_id_of,
    metadata_org_id,
    metadata_source,
    parse_org_id,
    signal_of,
)
from api.webhook_store import WebhookStore
from billing.config import Settings
from billing.constants import HANDLED_EVENT_TYPES, org_workflow_id
from billing.logging import bind_log_context
from billing.orchestration import StartSignal, deliver_to_org_workflow, tuning_of
from billing.stripe_gateway import (
    WEBHOOK_TOLERANCE_SECONDS,
    StripeGateway,
    verify_webhook_signature,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

# Bounds how long Stripe waits while the SDK retries a server that just went away;
# a healthy signal-with-start takes milliseconds.
SIGNAL_TIMEOUT_SECONDS = 5.0

Outcome = Literal["signalled", "unroutable", "ignored_type"]


class WebhookReceiptPublic(BaseModel):
    """What became of an accepted event (it is also a row in `stripe_events`)."""

    event_id: str
    outcome: Outcome
    org_id: int | None = None
    detail: str | None = None


class _Rejected(Exception):
    """A delivery refused before its type was known; `outcome` labels the metric."""

    def __init__(self, http: HTTPException, outcome: str) -> None:
        self.http = http
        self.outcome = outcome


def _bad_request(reason: str) -> _Rejected:
    return _Rejected(HTTPException(status.HTTP_400_BAD_REQUEST, detail=reason), "rejected")


def _too_large() -> _Rejected:
    detail = f"Body is larger than {MAX_BODY_BYTES} bytes"
    return _Rejected(HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=detail), "too_large")


async def _read_body(request: Request) -> bytes:
    """The raw body, refused as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad_request("Content-Length is not a number")
        if int(declared) > MAX_BODY_BYTES:
            raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _signed_at(signature: str) -> int | None:
    """The `t=` timestamp of a Stripe-Signature header (None if it has none)."""
    for part in signature.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            return int(value)
    return None


def _verify(
    body: bytes, signature: str | None, secret: str, *, now: float | None = None
) -> StripeEventCreate:
    """Signature, freshness (neither stale nor from the future), then the envelope.

    An event's `created` becomes the workflow's ordering watermark, so one dated
    ahead of its own signature (or of now) would make every real event after it
    look stale: such events are refused here.
    """
    if not signature:
        raise _bad_request("Missing Stripe-Signature header")
    current = time.time() if now is None else now
    signed_at = _signed_at(signature)
    if signed_at is not None and signed_at > current + WEBHOOK_TOLERANCE_SECONDS:
        raise _bad_request("Stripe-Signature timestamp is in the future")
    try:
        parsed = verify_webhook_signature(body, signature, secret)
    except stripe.SignatureVerificationError as err:
        message = str(err)
        if "tolerance" in message:
            reason = "Stripe-Signature timestamp is older than the 300 s tolerance"
        elif "Unable to extract" in message or "expected scheme" in message:
            reason = "Stripe-Signature header is malformed"
        else:
            reason = "Stripe-Signature does not match the body"
        raise _bad_request(reason) from None
    except UnicodeDecodeError:
        raise _bad_request("Body is not UTF-8") from None
    except (ValueError, RecursionError):
        # JSONDecodeError, and integers past Python's digit limit (a ValueError too).
        raise _bad_request("Body is not JSON") from None
    try:
        event = StripeEventCreate.model_validate(parsed)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "event"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise _bad_request(f"Not a Stripe event: {where}: {message}") from None
    # In live mode an event cannot be dated after its own signature. Test mode
    # events of test-clock objects are dated in the clock's simulated time; for
    # them the workflow caps what an event's date can do to its watermark.
    newest = min(current, signed_at if signed_at is not None else current)
    if event.livemode and event.created > newest + WEBHOOK_TOLERANCE_SECONDS:
        raise _bad_request("Event `created` is later than its signature")
    return event


async def _resolve_org(
    event: StripeEventCreate,
    webhooks: WebhookStore,
    gateway: StripeGateway,
    metrics: BillingMetrics,
    source: str,
) -> tuple[int | None, str]:
    """The org the event belongs to, and how that was decided (or why not).

    One database round trip (shared with the other events in flight) answers
    both questions: which org holds the customer id, and whether the org the
    metadata names exists.
    """
    obj = event.object
    customer_id = customer_id_of(obj)
    hint = metadata_org_id(obj)
    hinted = parse_org_id(hint[0]) if hint is not None else None
    facts = (
        await webhooks.routing_facts(customer_id, hinted)
        if customer_id is not None or hinted is not None
        else None
    )
    # The customer id the database holds is authoritative: metadata typed in the
    # dashboard can name another org, and must not move a customer between orgs.
    known = facts.org_for_customer if facts is not None else None
    # Environments sharing the Stripe account number their orgs alike: an object
    # of another one names "our" org id but is none of ours.
    other = metadata_source(obj)
    if known is None and other is not None and other != source:
        return None, f"metadata source {other[:40]!r} is another environment's"
    if hint is not None:
        raw, where = hint
        if known is not None and hinted != known:
            log.warning("%s.org_id %r disagrees with the customer's org %s", where, raw[:40], known)
            return known, f"org from the customer id in the database (not {where})"
        if hinted is None:
            return None, f"{where}.org_id {raw[:40]!r} is not an org id"
        if facts is None or not facts.org_exists:
            return None, f"org {hinted} from {where} does not exist"
        return hinted, f"org from {where}"
    if customer_id is None:
        return None, "event names no org and no customer"
    if known is not None:
        return known, "org from the customer id in the database"
    async with metrics.stripe_call("customer_org_id"):
        raw_org = await gateway.customer_org_id(customer_id)
    if raw_org is None:
        return None, f"customer {customer_id} belongs to no known org"
    org_id = parse_org_id(raw_org)
    if org_id is None or not (await webhooks.routing_facts(None, org_id)).org_exists:
        return None, f"org {raw_org[:40]!r} from customer metadata does not exist"
    return org_id, "org from the customer's metadata in Stripe"


WEBHOOK_PATH = "/api/webhooks/stripe"


@router.post(
    "/stripe",
    response_model=WebhookReceiptPublic,
    responses={
        **responses(400, 413, 500, 503),
        **answer_example(
            200,
            "An event signalled to its org's workflow",
            {"event_id": "evt_1QxYz2AbCdEf", "outcome": "signalled", "org_id": 42},
        ),
    },
    openapi_extra={"requestBody": WEBHOOK_REQUEST_BODY},
    summary="Receive a Stripe webhook event",
)
async def receive_stripe_event(
    request: Request,
    stripe_signature: Annotated[
        str | None, Header(description="Stripe's `t=...,v1=...` signature of the raw body")
    ] = None,
) -> Response:
    """Verify a Stripe event and hand it to its org's workflow; 2xx only once accepted."""
    # Served by `WebhookFastPath` in the app; this route documents it (and serves an
    # app built without the fast path).
    return await accept_stripe_event(request, stripe_signature)


async def accept_stripe_event(request: Request, stripe_signature: str | None) -> Response:
    """The webhook's work: refusals are `HTTPException`s, acceptance ready JSON bytes.

    What the event is and what became of it are bound to the request's log
    context, so the one access line of the delivery carries them.
    """
    services = services_of(request)
    settings, metrics = services.settings, services.metrics
    try:
        gateway = require_stripe(settings, services.stripe)
    except HTTPException:
        metrics.webhook_events.labels(type=UNVERIFIED_EVENT_TYPE, outcome="not_configured").inc()
        raise
    try:
        body = await _read_body(request)
        event = _verify(body, stripe_signature, settings.stripe_webhook_secret)
    except _Rejected as rejected:
        metrics.webhook_events.labels(type=UNVERIFIED_EVENT_TYPE, outcome=rejected.outcome).inc()
        refusals: BoundedLog = request.app.state.webhook_refusals
        if not refusals.warning(str(rejected.http.detail)):
            request.state.quiet = True  # counted, not logged again
        raise rejected.http from None

    bind_log_context(event_id=event.id, event_type=event.type)
    try:
        receipt = await _handle(
            event, gateway, services.webhook_store, services.temporal, settings, metrics
        )
    except HTTPException as err:
        outcome = "unavailable" if err.status_code == 503 else "failed"
        metrics.webhook_events.labels(type=_type_label(event), outcome=outcome).inc()
        raise
    metrics.webhook_events.labels(type=_type_label(event), outcome=receipt.outcome).inc()
    bind_log_context(outcome=receipt.outcome, detail=receipt.detail)
    return Response(receipt.model_dump_json(), media_type="application/json")


class _WebhookRoute:
    """What the request metrics read from `scope["route"]`: the route's template."""

    path = WEBHOOK_PATH


class WebhookFastPath:
    """Serves `POST /api/webhooks/stripe` without the framework's per-request machinery.

    Stripe's bursts make this the busiest route by far; FastAPI's routing,
    dependency resolution and exception middleware cost about as much CPU per
    delivery as the work itself. The app's own middleware (metrics, access
    log, body timeout) still wraps it, and the answers are the route's own.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != WEBHOOK_PATH
            or scope["method"] != "POST"
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = _WebhookRoute
        request = Request(scope, receive)
        response: Response
        try:
            response = await accept_stripe_event(request, request.headers.get("stripe-signature"))
        except HTTPException as err:
            response = JSONResponse(
                {"detail": err.detail}, status_code=err.status_code, headers=err.headers
            )
        await response(scope, receive, send)


def _type_label(event: StripeEventCreate) -> str:
    return event_type_label(event.type, HANDLED_EVENT_TYPES)


async def _handle(
    event: StripeEventCreate,
    gateway: StripeGateway,
    webhooks: WebhookStore,
    link: TemporalLink,
    settings: Settings,
    metrics: BillingMetrics,
) -> WebhookReceiptPublic:
    try:
        if event.type not in HANDLED_EVENT_TYPES:
            return await _record(webhooks, event, None, "ignored_type", "event type not handled")
        try:
            org_id, how = await _resolve_org(
                event, webhooks, gateway, metrics, settings.billing_source
            )
        except stripe.StripeError as err:
            log.warning("Stripe unreachable while routing an event: %s", type(err).__name__)
            raise problem(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "Stripe unavailable",
                "The event's customer could not be looked up in Stripe; retry later.",
                **{"Retry-After": "5"},
            ) from None
        if org_id is None:
            log.warning("Stripe event unroutable: %s", how)
            return await _record(webhooks, event, None, "unroutable", how)
        workflow_id = org_workflow_id(org_id)
        bind_log_context(org_id=org_id, workflow_id=workflow_id, routed_by=how)
        await _signal(event, org_id, link, settings)
        log.debug("Stripe event signalled (%s)", how)
        return await _record(webhooks, event, org_id, "signalled", f"signalled {workflow_id}")
    except SQLAlchemyError as err:
        log.warning("Database unavailable for a webhook: %s", type(err).__name__)
        raise database_unavailable() from None


async def _signal(
    event: StripeEventCreate, org_id: int, link: TemporalLink, settings: Settings
) -> None:
    """Signal-with-start the org's workflow; any failure is a 503 so Stripe retries."""
    try:
        client = await link.ready_client()
        async with asyncio.timeout(SIGNAL_TIMEOUT_SECONDS):
            await deliver_to_org_workflow(
                client,
                settings.temporal_task_queue,
                org_id,
                StartSignal.stripe_event(signal_of(event)),
                tuning=tuning_of(settings),
            )
    except TemporalUnavailableError as err:
        log.warning("Temporal unavailable, event not accepted: %s", err)
        raise temporal_unavailable("no server") from None
    except (RPCError, RuntimeError, OSError, TimeoutError) as err:
        if is_unreachable(err):
            link.mark(False, f"{type(err).__name__}: {err}")
        log.warning("Temporal refused the event: %s: %s", type(err).__name__, err)
        raise temporal_unavailable(type(err).__name__) from None
    link.mark(True)


async def _record(
    webhooks: WebhookStore,
    event: StripeEventCreate,
    org_id: int | None,
    outcome: Outcome,
    detail: str,
) -> WebhookReceiptPublic:
    record = store.EventRecord(
        event_id=event.id,
        type=event.type,
        created=event.created,
        object_id=event.object_id,
        org_id=org_id,
        outcome=outcome,
        detail=detail,
    )
    await webhooks.record(record)
    return WebhookReceiptPublic(event_id=event.id, outcome=outcome, org_id=org_id, detail=detail)
