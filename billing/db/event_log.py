"""What the workflows add to the `stripe_events` log (the API writes the webhook receipts).

A refused adoption gets its own row next to the receipt of the event that
named the object, so an operator reading the log sees both what arrived and
why it was not linked.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from billing.db.models import StripeEventLog

ADOPTION_REFUSED = "adoption_refused"
# The type of a row no event caused (the refusal of a customer at provisioning).
PROVISIONING = "provisioning"
MAX_ID = 255


def adoption_refusal_id(org_id: int, event_id: str | None, object_id: str | None) -> str:
    """One row per refused event (or per org and object when no event named it)."""
    base = f"{event_id}" if event_id else f"org-{org_id}:{object_id or 'unknown'}"
    row_id = f"{base}:{ADOPTION_REFUSED}"
    if len(row_id) <= MAX_ID:
        return row_id
    digest = hashlib.sha256(base.encode()).hexdigest()[:32]
    return f"{base[: MAX_ID - len(ADOPTION_REFUSED) - 34]}~{digest}:{ADOPTION_REFUSED}"


def record_adoption_refusal(
    session: Session,
    *,
    org_id: int,
    event_id: str | None,
    event_type: str | None,
    created: int,
    object_id: str | None,
    detail: str,
) -> None:
    """Upsert on the row id: a retried activity writes the same row again."""
    values = {
        "id": adoption_refusal_id(org_id, event_id, object_id),
        "type": event_type or PROVISIONING,
        "created": created,
        "object_id": object_id,
        "org_id": org_id,
        "outcome": ADOPTION_REFUSED,
        "detail": detail,
    }
    statement = insert(StripeEventLog).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[StripeEventLog.id],
        set_={"detail": statement.excluded.detail, "received_at": func.now()},
    )
    session.execute(statement)
