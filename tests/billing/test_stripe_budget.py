"""The shared Stripe request budget, against the real Postgres and the emulator over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from email.utils import formatdate

import httpx
import pytest
import stripe

from billing.stripe_budget import (
    DEFAULT_PAUSE_SECONDS,
    MAX_PAUSE_SECONDS,
    BudgetedHTTPXClient,
    BudgetUnavailableError,
    PostgresRequestBudget,
    retry_after_seconds,
)
from billing.stripe_gateway import make_stripe_client
from stripe_emulator.server import EmulatorServer

RATE = 20.0
SECONDS = 3.0

# One worker process's use of the budget: `callers` concurrent requesters taking
# slots from `start` until `end` (wall clock, shared by both processes); prints
# the wall-clock time of every slot it got.
USER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from billing.stripe_budget import PostgresRequestBudget

    url, name, rate, start, end, callers = sys.argv[1:7]
    start, end = float(start), float(end)

    async def main() -> None:
        budget = PostgresRequestBudget(url, name=name, rate=float(rate))
        stamps = []
        await asyncio.sleep(max(start - time.time(), 0))

        async def caller() -> None:
            while time.time() < end:
                await budget.acquire()
                if time.time() < end:
                    stamps.append(time.time())

        await asyncio.gather(*(caller() for _ in range(int(callers))))
        await budget.close()
        print(json.dumps(stamps))

    asyncio.run(main())
    """
)


def name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def max_in_one_second(stamps: list[float]) -> int:
    best, first = 0, 0
    for last, t in enumerate(stamps):
        while t - stamps[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_two_processes_together_stay_within_one_budget(database_url: str) -> None:
    budget = name()
    start = (
        time.time() + 10.0
    )  # both processes are up and connected by then, even on a busy machine
    end = start + SECONDS
    args = [database_url, budget, str(RATE), str(start), str(end), "8"]
    procs = [
        subprocess.Popen([sys.executable, "-c", USER, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    per_process = [json.loads(out) for out in outputs]
    stamps = sorted(t for got in per_process for t in got)

    # Each process alone would take RATE per second: together they must not.
    assert len(stamps) <= RATE * SECONDS + 2, len(stamps)
    assert max_in_one_second(stamps) <= RATE + 2, max_in_one_second(stamps)
    # And the budget is used, not wasted: both processes get a share of it.
    assert len(stamps) >= 0.9 * RATE * SECONDS, len(stamps)
    assert all(len(got) >= 0.25 * RATE * SECONDS for got in per_process)


@pytest.mark.asyncio
async def test_a_pause_voids_the_slots_already_handed_out(database_url: str) -> None:
    budget = PostgresRequestBudget(database_url, name=name(), rate=2.0)
    try:
        await budget.acquire()  # now; the next slot is half a second away
        started = time.monotonic()
        second = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.1)
        await budget.pause(1.5)
        await second
        assert time.monotonic() - started >= 1.5
    finally:
        await budget.close()


@pytest.mark.asyncio
async def test_slots_missed_during_a_stall_are_not_sent_as_one_burst(database_url: str) -> None:
    """The loop blocks for 1.5 s while 30 callers wait for slots 50 ms apart.

    Sending every slot that fell due meanwhile at once would be a burst of about
    25 requests, past Stripe's bucket of a second's worth: the late ones take new
    slots instead, so the sends after the stall keep close to the budget's pace.
    """
    budget = PostgresRequestBudget(database_url, name=name(), rate=RATE)
    sent: list[float] = []

    async def caller() -> None:
        await budget.acquire()
        sent.append(time.monotonic())

    try:
        callers = [asyncio.create_task(caller()) for _ in range(30)]
        await asyncio.sleep(0.3)  # every caller holds a slot; a few were sent
        time.sleep(1.5)  # the process stalls (blocked loop, starved CPU)
        resumed = time.monotonic()
        await asyncio.gather(*callers)
    finally:
        await budget.close()

    after = sorted(t for t in sent if t >= resumed)
    burst = max(sum(1 for u in after if t <= u < t + 0.15) for t in after)
    # Slots at most LATE_SLOT_SECONDS late still go (about 10), then 50 ms apart.
    assert burst <= 15, f"{burst} requests within 150 ms after the stall"
    assert len(sent) == 30


@pytest.mark.asyncio
async def test_a_429_with_retry_after_pushes_every_process_back(
    database_url: str, emulator: EmulatorServer
) -> None:
    shared = name()
    # Two budgets on two connections: what two worker processes hold.
    first = PostgresRequestBudget(database_url, name=shared, rate=50.0)
    second = PostgresRequestBudget(database_url, name=shared, rate=50.0)
    refused = stripe.StripeClient(
        "sk_test_a",
        base_addresses={"api": emulator.url},
        http_client=BudgetedHTTPXClient(first, max_rate_limit_retries=1),
    )
    other = make_stripe_client("sk_test_b", api_base=emulator.url, budget=second)
    try:
        await other.v1.customers.list_async()  # connected, slot taken: no startup delay below
        emulator.set_faults(error_rate_429=1.0, retry_after_seconds=2)
        # The first process's request is refused on both tries: each 429 pauses the
        # budget for the Retry-After, and the last one reaches the caller.
        with pytest.raises(stripe.RateLimitError):
            await refused.v1.customers.list_async()
        emulator.clear_faults()
        # Two tries, both paused the budget; the SDK did not retry the 429 on top.
        refusals = httpx.get(f"{emulator.url}/_emulator/stats").json()["rate_limited_429"]
        assert refusals == 2
        started = time.monotonic()
        await other.v1.customers.list_async()
        waited = time.monotonic() - started
        assert 1.5 <= waited <= 3.0, waited
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_429s_are_retried_inside_the_client_without_failing_the_call(
    database_url: str, emulator: EmulatorServer
) -> None:
    budget = PostgresRequestBudget(database_url, name=name(), rate=100.0)
    client = make_stripe_client("sk_test_c", api_base=emulator.url, budget=budget)
    # Stripe allows less than the budget says (another client on the account).
    emulator.set_faults(rate_limit_per_second=10, rate_limit_burst=1, retry_after_seconds=0.2)
    try:
        # One after the other, 10 ms apart by the budget: the bucket has refilled a tenth
        # of a request, so the second is refused, pauses everyone, then goes through.
        lists = [await client.v1.customers.list_async() for _ in range(6)]
    finally:
        await budget.close()
        emulator.clear_faults()
    assert len(lists) == 6
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    assert stats["rate_limited_429"] > 0
    assert stats["requests"]["GET /v1/customers 200"] == 6


@pytest.mark.asyncio
async def test_without_the_database_nothing_is_sent(emulator: EmulatorServer) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    budget = PostgresRequestBudget(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/billing", name=name(), rate=25.0
    )
    client = make_stripe_client("sk_test_d", api_base=emulator.url, budget=budget)
    with pytest.raises(BudgetUnavailableError, match="unavailable"):
        await client.v1.customers.list_async()
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    assert "GET /v1/customers 200" not in stats["requests"]


def test_retry_after_is_read_in_seconds_or_as_a_date() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert retry_after_seconds({}) == DEFAULT_PAUSE_SECONDS
    assert retry_after_seconds({"Retry-After": "soon"}) == DEFAULT_PAUSE_SECONDS
    assert retry_after_seconds({"Retry-After": "86400"}) == MAX_PAUSE_SECONDS
    in_ten = retry_after_seconds({"Retry-After": formatdate(time.time() + 10, usegmt=True)})
    assert 8 <= in_ten <= 10


def test_settings_of_the_budget_and_the_worker_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from billing.config import Settings

    for name in ("STRIPE_REQUESTS_PER_SECOND", "WORKER_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRIPE_ACTIVITIES_PER_SECOND", "")
    defaults = Settings(_env_file=None)
    assert defaults.stripe_requests_per_second == 25
    assert defaults.worker_metrics_port is None  # an empty variable: no endpoint
    assert defaults.stripe_activities_per_second is None

    monkeypatch.setenv("STRIPE_REQUESTS_PER_SECOND", "100")
    monkeypatch.setenv("WORKER_METRICS_PORT", "9464")
    live = Settings(_env_file=None)
    assert (live.stripe_requests_per_second, live.worker_metrics_port) == (100, 9464)

    monkeypatch.setenv("STRIPE_REQUESTS_PER_SECOND", "0")
    with pytest.raises(ValueError, match="greater than 0"):
        Settings(_env_file=None)
