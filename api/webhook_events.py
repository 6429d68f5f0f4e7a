"""Reading a verified Stripe event: its envelope, and the hints that name its org.

Pure functions over the event JSON, so the routing rules (which field names the
org in which API shape) are stated once and tested without a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.domain import StripeEventSignal

MAX_BODY_BYTES = 1024 * 1024
# Stripe ids and type names are printable ASCII; anything else cannot be stored or shown safely.
_PRINTABLE = r"^[!-~]+$"


class StripeEventCreate(BaseModel):
    """The part of a Stripe event the API reads; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=255, pattern=_PRINTABLE)
    type: str = Field(min_length=1, max_length=128, pattern=_PRINTABLE)
    created: int = Field(ge=0, le=2**53)
    # Test mode events of objects on a test clock carry the clock's (simulated) time.
    livemode: bool = True
    data: dict[str, Any] = Field(
        json_schema_extra={
            "required": ["object"],
            "properties": {
                "object": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {
                        "id": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 255,
                            "pattern": _PRINTABLE,
                        }
                    },
                }
            },
        }
    )

    @field_validator("data")
    @classmethod
    def _has_object(cls, data: dict[str, Any]) -> dict[str, Any]:
        obj = data.get("object")
        if not isinstance(obj, dict):
            raise ValueError("data.object must be an object")
        object_id = obj.get("id")
        if not (isinstance(object_id, str) and re.fullmatch(_PRINTABLE, object_id)):
            raise ValueError("data.object.id must be a Stripe id")
        if len(object_id) > 255:
            raise ValueError("data.object.id is too long")
        return data

    @property
    def object(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.data["object"]
        return obj

    @property
    def object_id(self) -> str:
        return str(self.object["id"])


# The OpenAPI body of the webhook route: Stripe's event envelope, read raw.
WEBHOOK_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "A Stripe event, exactly as Stripe sent it (the signature covers these bytes).",
    "content": {"application/json": {"schema": StripeEventCreate.model_json_schema()}},
}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _id_of(value: Any) -> str | None:
    """A Stripe reference is an id string, or an expanded object with an `id`."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str) and len(value) <= 255 and re.fullmatch(_PRINTABLE, value):
        return value
    return None


def metadata_org_id(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """The org id written in metadata, and where it was found.

    Subscriptions carry it in their own metadata; invoices (current API shape)
    in `parent.subscription_details.metadata`, older shapes in
    `subscription_details.metadata`.
    """
    candidates = (
        ("metadata", _mapping(obj.get("metadata"))),
        (
            "parent.subscription_details.metadata",
            _mapping(
                _mapping(_mapping(obj.get("parent")).get("subscription_details")).get("metadata")
            ),
        ),
        (
            "subscription_details.metadata",
            _mapping(_mapping(obj.get("subscription_details")).get("metadata")),
        ),
    )
    for where, metadata in candidates:
        value = metadata.get("org_id")
        if value not in (None, ""):
            return str(value), where
    return None


def metadata_source(obj: Mapping[str, Any]) -> str | None:
    """The environment (`source`) the object's metadata names, if any.

    Looked up where `metadata_org_id` looks, in the same order.
    """
    for metadata in (
        _mapping(obj.get("metadata")),
        _mapping(_mapping(_mapping(obj.get("parent")).get("subscription_details")).get("metadata")),
        _mapping(_mapping(obj.get("subscription_details")).get("metadata")),
    ):
        value = metadata.get("source")
        if isinstance(value, str) and value:
            return value
    return None


def parse_org_id(value: str) -> int | None:
    """An org id as written in metadata, or None when it cannot be one."""
    text = value.strip()
    # Length first: a digit string of thousands of characters is no id (and
    # int() refuses strings past Python's digit limit).
    if len(text) > 10 or not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if 0 < number <= 2**31 - 1 else None


def customer_id_of(obj: Mapping[str, Any]) -> str | None:
    if obj.get("object") == "customer":
        return _id_of(obj)
    return _id_of(obj.get("customer"))


def subscription_id_of(obj: Mapping[str, Any]) -> str | None:
    if obj.get("object") == "subscription":
        return _id_of(obj)
    details = _mapping(_mapping(obj.get("parent")).get("subscription_details"))
    return _id_of(details.get("subscription")) or _id_of(obj.get("subscription"))


def signal_of(event: StripeEventCreate) -> StripeEventSignal:
    """The small payload the org's workflow receives for this event."""
    obj = event.object
    return StripeEventSignal(
        event_id=event.id,
        type=event.type,
        created=event.created,
        object_id=event.object_id,
        customer_id=customer_id_of(obj),
        subscription_id=subscription_id_of(obj),
    )
