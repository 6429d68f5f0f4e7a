"""Delivering the notifications outbox to the console (`BILLING_NOTIFY_URL`).

A loop in each worker process, apart from the org workflows: billing work only
writes outbox rows (one DB activity) and never waits on the console. Each pass
leases the oldest due notification of every org (so an org's notifications go
out in order, and two processes never send the same one at once), signs each
with the Standard Webhooks scheme and posts it. A 2xx delivers it; a 4xx other
than 408 or 429 records it as failed at once (the console refused it, resending
the same bytes cannot help); anything else (a 5xx, 408, 429, no connection, a
timeout) is retried on a doubling backoff until the notification is older than
`BILLING_NOTIFY_GIVE_UP_SECONDS` (3 days), then recorded as failed. A failed
notification no longer holds up the org's later ones; `billing notifications
redeliver ID` sends it again. docs/notifications.md describes the format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from billing.config import Settings
from billing.db import notifications

log = logging.getLogger("billing.notify")

# Notifications one pass sends at most (one per org, in parallel).
BATCH = 100
# Statuses that mean "try again later" although they are 4xx.
RETRYABLE_4XX = frozenset({408, 429})


class NotifyNotConfiguredError(RuntimeError):
    """`BILLING_NOTIFY_URL` is set without a valid `BILLING_NOTIFY_SECRET`."""


def signer_of(settings: Settings) -> Webhook:
    """The Standard Webhooks signer for `BILLING_NOTIFY_SECRET` (`whsec_` + base64)."""
    secret = settings.billing_notify_secret
    if secret is None or not secret.get_secret_value():
        raise NotifyNotConfiguredError(
            "BILLING_NOTIFY_URL is set but BILLING_NOTIFY_SECRET is not: set it to a "
            "whsec_... secret (docs/notifications.md)."
        )
    try:
        return Webhook(secret.get_secret_value())
    except Exception as err:  # the library raises binascii errors for bad base64
        raise NotifyNotConfiguredError(
            f"BILLING_NOTIFY_SECRET is not a whsec_ + base64 secret: {err}"
        ) from None


def retry_wait(attempts: int, initial: float, maximum: float) -> timedelta:
    """The wait after failed attempt number `attempts` (1 for the first): doubling, capped."""
    exponent = min(max(attempts, 1) - 1, 32)
    return timedelta(seconds=min(initial * 2**exponent, maximum))


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    delivered: bool
    code: int | None = None
    error: str | None = None
    retryable: bool = True


def outcome_of(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome(delivered=True, code=code)
    final = 400 <= code < 500 and code not in RETRYABLE_4XX
    return Outcome(delivered=False, code=code, error=f"HTTP {code}", retryable=not final)


@dataclass(frozen=True)
class _Claimed:
    id: str
    body: str
    attempts: int
    created_at: datetime


class NotificationDelivery:
    """The delivery loop of one worker process."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        if not settings.billing_notify_url:
            raise NotifyNotConfiguredError("BILLING_NOTIFY_URL is not set")
        self._url = settings.billing_notify_url
        self._signer = signer_of(settings)
        self._sessions = session_factory
        self._settings = settings
        self._lease = timedelta(seconds=2 * settings.billing_notify_timeout_seconds + 5)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; a failing pass (the database away) is retried."""
        s = self._settings
        async with httpx.AsyncClient(timeout=s.billing_notify_timeout_seconds) as http:
            while not stop.is_set():
                try:
                    sent = await self.deliver_due(http)
                except Exception:
                    log.exception("notification delivery pass failed")
                    sent = 0
                if sent:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=s.billing_notify_poll_seconds)

    async def deliver_due(self, http: httpx.AsyncClient) -> int:
        """One pass: send every org's next due notification; returns how many were tried."""
        claimed = await asyncio.to_thread(self._claim, datetime.now(UTC))
        await asyncio.gather(*(self._deliver(http, c) for c in claimed))
        return len(claimed)

    def _claim(self, now: datetime) -> list[_Claimed]:
        with self._sessions.begin() as session:
            rows = notifications.claim_due(session, now, self._lease, BATCH)
            return [_Claimed(r.id, r.body, r.attempts, r.created_at) for r in rows]

    async def _deliver(self, http: httpx.AsyncClient, claimed: _Claimed) -> None:
        sent_at = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": claimed.id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(claimed.id, sent_at, claimed.body),
        }
        try:
            response = await http.post(self._url, content=claimed.body, headers=headers)
            outcome = outcome_of(response.status_code)
        except httpx.HTTPError as err:
            outcome = Outcome(delivered=False, error=f"{type(err).__name__}: {err}")
        await asyncio.to_thread(self._record, claimed, outcome)

    def _record(self, claimed: _Claimed, outcome: Outcome) -> None:
        s = self._settings
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            if outcome.delivered:
                notifications.mark_delivered(session, claimed.id, now, outcome.code or 200)
                return
            retry_at: datetime | None = None
            give_up_at = claimed.created_at + timedelta(seconds=s.billing_notify_give_up_seconds)
            if outcome.retryable and now < give_up_at:
                wait = retry_wait(
                    claimed.attempts + 1,
                    s.billing_notify_retry_initial_seconds,
                    s.billing_notify_retry_max_seconds,
                )
                # The last attempt is made when the notification is as old as allowed.
                retry_at = min(now + wait, give_up_at)
            error = outcome.error or "failed"
            notifications.mark_attempt_failed(
                session, claimed.id, error=error, code=outcome.code, retry_at=retry_at
            )
        if retry_at is None:
            log.error(
                "notification failed for good",
                extra={"notification_id": claimed.id, "error": error},
            )
