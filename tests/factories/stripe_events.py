"""Stripe webhook deliveries as Stripe sends them (current API shapes), signed."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import stripe


def subscription_object(
    *,
    org_id: int | str | None = None,
    customer: str | None = None,
    subscription_id: str | None = None,
    status: str = "active",
) -> dict[str, Any]:
    """A subscription as in `customer.subscription.*` events; the org id lives in metadata."""
    return {
        "id": subscription_id or f"sub_{uuid.uuid4().hex[:14]}",
        "object": "subscription",
        "customer": customer or f"cus_{uuid.uuid4().hex[:14]}",
        "status": status,
        "metadata": {} if org_id is None else {"org_id": str(org_id)},
    }


def invoice_object(
    *,
    org_id: int | str | None = None,
    customer: str | None = None,
    subscription_id: str | None = None,
) -> dict[str, Any]:
    """An invoice of the current API shape: subscription details under `parent`."""
    sub = subscription_id or f"sub_{uuid.uuid4().hex[:14]}"
    return {
        "id": f"in_{uuid.uuid4().hex[:14]}",
        "object": "invoice",
        "customer": customer or f"cus_{uuid.uuid4().hex[:14]}",
        "metadata": {},
        "parent": {
            "type": "subscription_details",
            "subscription_details": {
                "subscription": sub,
                "metadata": {} if org_id is None else {"org_id": str(org_id)},
            },
        },
    }


def stripe_event(
    event_type: str,
    obj: dict[str, Any],
    *,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:20]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "type": event_type,
        "created": created if created is not None else int(time.time()),
        "livemode": False,
        "data": {"object": obj},
    }


def event_body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def sign_stripe_payload(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header value for `payload`, as Stripe computes it."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload.decode("utf-8"), secret, timestamp=timestamp
    )
    return header
