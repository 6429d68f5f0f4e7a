"""The keys Stripe deduplicates by, derived from business identity.

A retried activity or a restarted worker builds the same key again, so Stripe
answers with the first result instead of creating a second object or counting
a meter event twice.

Every key names the environment (`BILLING_SOURCE`) and the org's `uid`, not
only its id: environments that share one Stripe account (staging and
production, a restored database) number their orgs alike, and must never
replay each other's requests or have each other's meter events counted as
duplicates. Idempotency keys also carry a digest of the request's parameters,
so a corrected request (a fixed price after a failed attempt) is a new intent
instead of Stripe's "same key, other parameters" error; a create is always
preceded by a lookup (customer by metadata, the customer's live
subscription), so a changed key never makes a second object.

Meter identifiers are stored in the usage ledger with each row and re-sent
from there: rows written in the earlier format (`{org_id}:{dimension}:
{period_start}:{seq}`) keep theirs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime

# Hex digits of the digests: 64 bits tell environments and intents apart.
DIGEST_LENGTH = 16


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]


def params_digest(params: Mapping[str, object]) -> str:
    """A short digest of a request's parameters (key order does not matter)."""
    return _digest(json.dumps(params, sort_keys=True, separators=(",", ":"), default=str))


def environment_tag(source: str, org_uid: str) -> str:
    """The org in its environment, in 16 hex digits: what makes identifiers unique
    across environments that share a Stripe account."""
    return _digest(f"{source}\n{org_uid}")


def customer_create_key(
    source: str, org_id: int, org_uid: str, params: Mapping[str, object]
) -> str:
    """Idempotency key of the request that creates the org's customer."""
    return f"customer-create-{source}-{org_id}-{org_uid}-{params_digest(params)}"


def subscription_create_key(
    source: str, org_id: int, org_uid: str, params: Mapping[str, object]
) -> str:
    """Idempotency key of the request that creates the org's subscription."""
    return f"subscription-create-{source}-{org_id}-{org_uid}-{params_digest(params)}"


def meter_event_key(identifier: str) -> str:
    """Idempotency key of the request that sends one meter event."""
    return f"meter-event-{identifier}"


def portal_configuration_key(billing_source: str, params: Mapping[str, object]) -> str:
    """Idempotency key of our billing portal configuration (promotion codes on)."""
    return f"portal-configuration-{billing_source}-promotion-codes-{params_digest(params)}"


def meter_identifier(
    org_id: int, dimension: str, period_start: datetime, seq: int, *, source: str, org_uid: str
) -> str:
    """The meter event's own identifier: one per usage ledger row, so Stripe
    recognises a re-sent row as the event it already counted.

    `{org_id}:{dimension}:{period_start}:{seq}:{environment_tag}`, the period
    named by its start in Unix seconds. At most 100 characters (Stripe's limit)
    with dimensions of up to 48.
    """
    start = int(period_start.timestamp())
    return f"{org_id}:{dimension}:{start}:{seq}:{environment_tag(source, org_uid)}"
