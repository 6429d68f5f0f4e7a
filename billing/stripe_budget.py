"""One budget of Stripe requests per second, shared by every worker process of an environment.

Stripe limits an account, not a process: test mode answers 429 above 25
requests per second, live mode above 100. The worker runs as several
processes, so a limiter inside each one cannot hold the account's limit (two
processes at 25/s send 50/s). The budget therefore lives in the one thing all
of them already share, Postgres, as a single row per environment holding the
next free slot (GCRA, the "virtual scheduling" form of a token bucket):

    UPDATE ... SET next_at = greatest(next_at, now()) + 1/rate RETURNING ...

Each request takes the slot the row held and moves the row on by 1/rate
seconds; the caller sleeps until its slot (one it reaches too late, after a
stall of its process, is traded for a new one). One tiny statement per request
(a few hundred microseconds, on its own connection, not the worker's pool)
and no clock but the database's, so skewed hosts cannot overshoot. Slots are
handed out in order, so the sending rate is exactly the budget whenever there
is work, and nothing is lost to polling or refused requests.

A 429 that Stripe answers anyway (another client on the account, Stripe's own
accounting) pauses the budget for everyone: `pause()` moves the row past
`Retry-After` (or one second) and records the pause, which every process
learns with its next slot and every waiter checks before it sends.

Alternatives weighed: Temporal's task-queue rate limit is shared too, but it
counts activities, and ours make one to three requests each (a budget in
activities is either 429s or an idle account); a limiter per process needs the
process count and wastes the share of idle processes; Redis would be a new
piece of infrastructure for one number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import psycopg
import stripe
from sqlalchemy.engine import make_url
from temporalio.common import MetricMeter

log = logging.getLogger(__name__)

# Slots are reserved at most this far ahead; beyond it a caller waits without a slot
# (reserved slots are always used, so a long queue of them would only hold callers
# for longer than an activity may take).
RESERVE_HORIZON_SECONDS = 10.0
# A caller that found no slot within this long gives up: the activity attempt fails
# and Temporal retries it later, instead of it timing out while waiting.
MAX_WAIT_SECONDS = 20.0
# The pause after a 429 that names no Retry-After: Stripe's limiter refills within a second.
DEFAULT_PAUSE_SECONDS = 1.0
MAX_PAUSE_SECONDS = 60.0
# A 429 is retried here, after the pause, this many times before the activity sees it.
MAX_RATE_LIMIT_RETRIES = 5
# Clock arithmetic between the database and this process is this exact.
PAUSE_TOLERANCE_SECONDS = 0.01
# A slot this late (the process was starved of CPU, or its loop blocked) is given
# up for a new one: otherwise every slot that fell due during the stall is sent at
# once, a burst past what Stripe's bucket holds (a second's worth), answered 429.
LATE_SLOT_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 5_000

_RESERVE = """
INSERT INTO stripe_request_budget AS b (name, next_at)
VALUES (%(name)s, clock_timestamp() + %(spacing)s * interval '1 second')
ON CONFLICT (name) DO UPDATE
   SET next_at = greatest(b.next_at, clock_timestamp()) + %(spacing)s * interval '1 second'
 WHERE b.next_at <= clock_timestamp() + %(horizon)s * interval '1 second'
RETURNING
    extract(epoch FROM b.next_at - clock_timestamp())::float8 - %(spacing)s,
    extract(epoch FROM b.paused_until - clock_timestamp())::float8
"""

_AHEAD = """
SELECT extract(epoch FROM next_at - clock_timestamp())::float8,
       extract(epoch FROM paused_until - clock_timestamp())::float8
FROM stripe_request_budget WHERE name = %(name)s
"""

_PAUSE = """
INSERT INTO stripe_request_budget AS b (name, next_at, paused_until)
VALUES (%(name)s, clock_timestamp() + %(seconds)s * interval '1 second',
        clock_timestamp() + %(seconds)s * interval '1 second')
ON CONFLICT (name) DO UPDATE
   SET next_at = greatest(b.next_at, excluded.next_at),
       paused_until = greatest(b.paused_until, excluded.paused_until)
RETURNING extract(epoch FROM b.paused_until - clock_timestamp())::float8
"""


class BudgetUnavailableError(RuntimeError):
    """The shared budget could not be read (Postgres down) or had no slot in time.

    Raised before anything is sent to Stripe, so the activity attempt fails
    cleanly and Temporal retries it: no request leaves outside the budget.
    """


class RequestBudget(Protocol):
    async def acquire(self) -> float:
        """Wait for this request's slot; return the seconds waited."""
        ...

    async def pause(self, seconds: float) -> None:
        """Nobody sends for `seconds` (Stripe answered 429)."""
        ...


def libpq_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (`postgresql+psycopg://`) as psycopg's own connection string."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class PostgresRequestBudget:
    """The budget row `name` in `stripe_request_budget`, at `rate` requests per second.

    Every process that uses the same database and name shares the budget. The
    connection is this object's own (opened on first use, reopened after an
    error), so waiting for a slot never competes with activities for the pool.
    """

    def __init__(
        self,
        database_url: str,
        *,
        name: str,
        rate: float,
        horizon: float = RESERVE_HORIZON_SECONDS,
        max_wait: float = MAX_WAIT_SECONDS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._dsn = libpq_dsn(database_url)
        self.name = name
        self.rate = rate
        self._horizon = max(horizon, 2.0 / rate)
        self._max_wait = max_wait
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock: asyncio.Lock | None = None
        # Monotonic time until which the budget is paused, as far as this process knows.
        self._paused_until = 0.0

    async def acquire(self) -> float:
        started = time.monotonic()
        spacing = 1.0 / self.rate
        while True:
            if time.monotonic() - started > self._max_wait:
                raise BudgetUnavailableError(
                    f"no Stripe request slot within {self._max_wait:.0f} s (budget "
                    f"'{self.name}' at {self.rate:g}/s is booked or paused further ahead)"
                )
            paused = self._paused_until - time.monotonic()
            if paused > 0:
                await asyncio.sleep(paused)
            row = await self._execute(
                _RESERVE, {"name": self.name, "spacing": spacing, "horizon": self._horizon}
            )
            if row is None:
                await self._wait_for_horizon()
                continue
            wait, paused_for = row
            self._learn_pause(paused_for)
            slot = time.monotonic() + max(wait or 0.0, 0.0)
            if slot > time.monotonic():
                await asyncio.sleep(slot - time.monotonic())
            if time.monotonic() - slot > LATE_SLOT_SECONDS:
                continue
            # A pause someone set after this slot was taken makes the slot void.
            if self._paused_until <= slot + PAUSE_TOLERANCE_SECONDS:
                return time.monotonic() - started

    async def pause(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
        row = await self._execute(_PAUSE, {"name": self.name, "seconds": seconds})
        if row is not None:
            self._learn_pause(row[0])

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _learn_pause(self, paused_for: float | None) -> None:
        if paused_for is not None and paused_for > 0:
            self._paused_until = max(self._paused_until, time.monotonic() + paused_for)

    async def _wait_for_horizon(self) -> None:
        """Sleep until slots inside the horizon free up, spread so waiters do not stampede."""
        row = await self._execute(_AHEAD, {"name": self.name})
        ahead = row[0] if row is not None and row[0] is not None else 0.0
        if row is not None:
            self._learn_pause(row[1])
        until_inside = max(ahead - self._horizon, 0.0)
        await asyncio.sleep(until_inside + random.uniform(0.05, 0.5))

    async def _execute(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for attempt in (1, 2):
                try:
                    conn = await self._connection()
                    cursor = await conn.execute(sql, params)
                    row = await cursor.fetchone()
                    return tuple(row) if row is not None else None
                except psycopg.Error as err:
                    # Down, restarted, or left mid-statement by a cancelled caller: a
                    # new connection, once.
                    await self._drop_connection()
                    if attempt == 2:
                        raise BudgetUnavailableError(
                            f"the Stripe request budget in Postgres is unavailable: {err}"
                        ) from err
        raise AssertionError("unreachable")

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="billing-stripe-budget",
            )
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                await conn.close()


class StripeRequestMetrics:
    """What the worker exports about its Stripe traffic (Prometheus, via Temporal's runtime)."""

    def __init__(self, meter: MetricMeter | None = None) -> None:
        meter = meter or MetricMeter.noop
        self._requests = meter.create_counter(
            "billing_stripe_requests_total", "Stripe HTTP requests sent, by answer status"
        )
        self._rate_limited = meter.create_counter(
            "billing_stripe_rate_limited_total", "Stripe answers 429 (each pauses the budget)"
        )
        self._wait = meter.create_histogram_timedelta(
            "billing_stripe_budget_wait", "Time a request waited for its slot in the budget"
        )

    def sent(self, status: int | str) -> None:
        self._requests.add(1, {"status": str(status)})
        if status == 429:
            self._rate_limited.add(1)

    def waited(self, seconds: float) -> None:
        self._wait.record(timedelta(seconds=seconds))


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float:
    """`Retry-After` (seconds or an HTTP date) if Stripe sent one, else the default pause."""
    value = _header(headers, "Retry-After")
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = DEFAULT_PAUSE_SECONDS
        return min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
    return DEFAULT_PAUSE_SECONDS


def _is_lock_timeout(content: Any) -> bool:
    """Stripe's other 429: another request holds the object. Not a rate limit."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    return '"lock_timeout"' in text


class BudgetedHTTPXClient(stripe.HTTPXClient):
    """The SDK's async HTTP client with every request drawn from the shared budget.

    Hooked where the SDK sends each HTTP request, so no call site can forget it.
    A 429 pauses the budget for every process and is retried here after the
    pause (up to `max_rate_limit_retries` times), so it costs a slot, not a
    failed activity attempt that redoes the requests before it.
    """

    def __init__(
        self,
        budget: RequestBudget,
        *,
        metrics: StripeRequestMetrics | None = None,
        max_rate_limit_retries: int = MAX_RATE_LIMIT_RETRIES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._budget = budget
        self._metrics = metrics or StripeRequestMetrics()
        self._max_retries = max_rate_limit_retries

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        for attempt in range(self._max_retries + 1):
            self._metrics.waited(await self._budget.acquire())
            try:
                content, status, rheaders = await super().request_async(
                    method, url, headers, post_data
                )
            except stripe.APIConnectionError:
                self._metrics.sent("connection_error")
                raise
            self._metrics.sent(status)
            if status != 429 or _is_lock_timeout(content):
                return content, status, rheaders
            pause = retry_after_seconds(rheaders)
            await self._budget.pause(pause)
            if attempt == self._max_retries or _header(rheaders, "Stripe-Should-Retry") == "false":
                return content, status, rheaders
            log.info(
                "Stripe answered 429; budget paused",
                extra={"pause_seconds": pause, "attempt": attempt + 1, "method": method},
            )
        raise AssertionError("unreachable")

    def _should_retry(
        self,
        response: tuple[Any, int, Mapping[str, str] | None] | None,
        api_connection_error: stripe.APIConnectionError | None,
        num_retries: int,
        max_network_retries: int | None,
    ) -> bool:
        """The SDK's own retries (connection errors, 5xx), but never a 429 again:
        `request_async` has paused the budget and retried it already."""
        if response is not None and response[1] == 429:
            return False
        return bool(
            super()._should_retry(response, api_connection_error, num_retries, max_network_retries)
        )

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[Any, int, Mapping[str, str]]:
        self._metrics.waited(await self._budget.acquire())
        response = await super().request_stream_async(method, url, headers, post_data)
        self._metrics.sent(response[1])
        return response
