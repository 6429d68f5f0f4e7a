"""The API's one Temporal client, and what the API knows about its health.

If the server is down when the API starts, or the connection settings are
wrong (a certificate file missing, a key refused), the API still serves: it
logs the reason once, readyz names it, webhooks answer 503, and it connects on
first use after that. Once a call has failed for
lack of a server, the next webhook asks for a cheap health check first, so an
outage costs Stripe a fast 503 instead of a request held through the SDK's
retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.metrics import BillingMetrics
from billing.config import Settings
from billing.constants import org_workflow_id
from billing.domain import OrgBillingState
from billing.orchestration import query_state
from billing.temporal_client import TemporalConfigError, connect_client
from billing.temporal_client import TemporalUnavailableError as TemporalUnavailableError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
RECONNECT_INTERVAL_SECONDS = 2.0
HEALTH_TIMEOUT = timedelta(seconds=2)

# Codes that mean "no server to talk to", as opposed to a server answering no.
_UNREACHABLE_CODES = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})


def is_unreachable(err: BaseException) -> bool:
    """Whether a failed call means the server is gone (rather than it refusing)."""
    if isinstance(err, RPCError):
        return err.status in _UNREACHABLE_CODES
    # The core SDK reports failed (re)connects as RuntimeError.
    return isinstance(err, RuntimeError | TimeoutError | OSError)


class TemporalLink:
    """Holds the client, connects lazily, and tracks availability in the gauge."""

    def __init__(
        self, settings: Settings, metrics: BillingMetrics, client: Client | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._client = client
        self._lock = asyncio.Lock()
        self._last_attempt = 0.0
        self._last_error = "not connected yet"
        self._config_error = False
        # Unknown until the startup check; until then a webhook checks health first.
        self._available = False

    @property
    def available(self) -> bool:
        return self._available

    def mark(self, available: bool, reason: str = "") -> None:
        """Record the outcome of a call; the gauge follows."""
        self._available = available
        if not available and reason:
            self._last_error = reason
        self._metrics.set_temporal_available(available)

    async def startup(self) -> None:
        """Connect (unless given a client) and check the server once; failure is only logged."""
        reason = await self.check()
        if reason is None:
            return
        if self._config_error:
            log.error("Temporal cannot be used with these settings: %s", reason)
        else:
            log.warning("Temporal not reachable at startup; will retry on use: %s", reason)

    async def client(self) -> Client:
        """The client, connecting first if needed (at most every couple of seconds)."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is not None:
                return self._client
            since = time.monotonic() - self._last_attempt
            if self._last_attempt and since < RECONNECT_INTERVAL_SECONDS:
                raise TemporalUnavailableError(self._last_error)
            self._last_attempt = time.monotonic()
            try:
                self._client = await connect_client(self._settings, timeout=CONNECT_TIMEOUT_SECONDS)
            except TemporalUnavailableError as err:
                self._config_error = isinstance(err, TemporalConfigError)
                self.mark(False, str(err))
                raise
            self._config_error = False
            target = self._client.service_client.config.target_host
            log.info("Connected to Temporal", extra={"temporal_address": target})
            self.mark(True)
            return self._client

    async def check(self) -> str | None:
        """None when the server answers a health check, else why it does not."""
        try:
            client = await self.client()
            healthy = await client.service_client.check_health(timeout=HEALTH_TIMEOUT)
        except TemporalUnavailableError as err:
            return str(err)
        except (RPCError, RuntimeError, OSError, TimeoutError) as err:
            reason = f"health check failed: {type(err).__name__}: {err}"
            self.mark(False, reason)
            return reason
        if not healthy:
            self.mark(False, "health check reported the service as not serving")
            return self._last_error
        self.mark(True)
        return None

    async def ready_client(self) -> Client:
        """The client, after a health check if the last call found no server."""
        client = await self.client()
        if not self._available:
            reason = await self.check()
            if reason is not None:
                raise TemporalUnavailableError(reason)
        return client


QUERY_TIMEOUT_SECONDS = 3.0


async def workflow_state(link: TemporalLink, org_id: int) -> OrgBillingState | None:
    """The org workflow's live state, or None when it has none to give right now.

    None covers: no workflow yet, no worker to answer within a few seconds, no
    server. Callers fall back to the database row.
    """
    try:
        client = await link.client()
        state = await asyncio.wait_for(query_state(client, org_id), QUERY_TIMEOUT_SECONDS)
    except TemporalUnavailableError:
        return None
    except Exception as err:
        if is_unreachable(err) and not isinstance(err, TimeoutError):
            link.mark(False, f"{type(err).__name__}: {err}")
        log.info(
            "No live workflow state: %s",
            type(err).__name__,
            extra={"org_id": org_id, "workflow_id": org_workflow_id(org_id)},
        )
        return None
    link.mark(True)
    return state
