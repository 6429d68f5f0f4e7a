"""One emulator for this folder, emptied through its control API before each test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import stripe

from stripe_emulator.client import make_client
from stripe_emulator.server import EmulatorConfig, EmulatorServer
from tests.emulator.helpers import Receiver, start_receiver


@pytest.fixture(scope="session")
def emulator_session() -> Iterator[EmulatorServer]:
    server = EmulatorServer(
        EmulatorConfig(port=0, host="127.0.0.1", webhook_retry_delays=(0.2, 0.4, 0.8))
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def emulator(emulator_session: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator with no objects and no faults."""
    httpx.post(f"{emulator_session.url}/_emulator/reset").raise_for_status()
    yield emulator_session
    httpx.post(f"{emulator_session.url}/_emulator/reset").raise_for_status()
    httpx.post(
        f"{emulator_session.url}/_emulator/settings",
        json={"missing_payment_method_succeeds": False, "invoice_finalization_delay": 3600},
    ).raise_for_status()


@pytest.fixture
def client(emulator: EmulatorServer) -> stripe.StripeClient:
    return make_client(emulator.url)


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    """Raw HTTP for what the SDK cannot send: bad auth, unknown params, odd bodies."""
    with httpx.Client(
        base_url=emulator.url, headers={"Authorization": "Bearer sk_test_raw"}
    ) as raw:
        yield raw


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = start_receiver()
    yield receiver
    receiver.server.shutdown()
