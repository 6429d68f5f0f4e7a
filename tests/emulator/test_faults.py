"""Fault injection through the control API and from Python, and the counters."""

from __future__ import annotations

import time

import httpx
import pytest
import stripe

from stripe_emulator.client import make_client
from stripe_emulator.server import EmulatorServer


def test_control_api_reads_sets_and_clears(emulator: EmulatorServer) -> None:
    url = f"{emulator.url}/_emulator/faults"
    assert httpx.get(url).json()["error_rate_429"] == 0
    set_ = httpx.post(url, json={"error_rate_429": 0.3, "latency_ms": 5})
    assert set_.json()["error_rate_429"] == 0.3 and set_.json()["latency_ms"] == 5
    assert httpx.get(url).json()["error_rate_429"] == 0.3
    assert httpx.delete(url).json()["error_rate_429"] == 0
    assert httpx.post(url, json={"no_such_knob": 1}).status_code == 400


def test_429_with_should_retry(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(error_rate_429=1.0)
    answer = http.get("/v1/customers")
    assert answer.status_code == 429
    assert answer.headers["Stripe-Should-Retry"] == "true"
    assert answer.json()["error"]["code"] == "rate_limit"
    with pytest.raises(stripe.RateLimitError):
        make_client(emulator.url).v1.customers.list()


def test_429_can_name_a_retry_after(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(error_rate_429=1.0)
    assert "Retry-After" not in http.get("/v1/customers").headers
    emulator.set_faults(retry_after_seconds=2)
    answer = http.get("/v1/customers")
    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "2"


def test_sdk_retries_through_injected_errors(emulator: EmulatorServer) -> None:
    emulator.set_faults(error_rate_500=0.3, seed=3)
    patient = stripe.StripeClient(
        "sk_test_retry", base_addresses={"api": emulator.url}, max_network_retries=8
    )
    created = [patient.v1.customers.create(params={"name": f"r{i}"}).id for i in range(3)]
    emulator.clear_faults()
    assert len(make_client(emulator.url).v1.customers.list().data) == 3
    assert len(set(created)) == 3
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    assert stats["faults_injected"]["500"] > 0
    assert stats["idempotent_replays"] == 0


def test_500_is_an_api_error(emulator: EmulatorServer, http: httpx.Client) -> None:
    httpx.post(f"{emulator.url}/_emulator/faults", json={"error_rate_500": 1.0})
    answer = http.post("/v1/customers", data={"name": "x"})
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "api_error"
    assert answer.headers["Stripe-Should-Retry"] == "true"
    with pytest.raises(stripe.APIError):
        make_client(emulator.url).v1.customers.create(params={"name": "x"})
    emulator.clear_faults()
    assert http.get("/v1/customers").json()["data"] == []


def test_latency(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(latency_ms=120)
    started = time.monotonic()
    http.get("/v1/customers").raise_for_status()
    assert time.monotonic() - started >= 0.12


def test_rate_limit_token_bucket(emulator: EmulatorServer, http: httpx.Client) -> None:
    # A slow rate, so a loaded machine cannot refill the bucket while we send.
    httpx.post(
        f"{emulator.url}/_emulator/faults",
        json={"rate_limit_per_second": 2, "rate_limit_burst": 10},
    )
    started = time.monotonic()
    statuses = [http.get("/v1/customers").status_code for _ in range(30)]
    elapsed = time.monotonic() - started
    assert statuses[:10] == [200] * 10  # the burst
    assert statuses.count(200) <= 10 + 2 * elapsed + 1
    assert statuses.count(429) >= 30 - (10 + 2 * elapsed + 1)
    assert statuses.count(429) >= 5
    time.sleep(0.6)
    assert http.get("/v1/customers").status_code == 200
    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    assert stats["rate_limited_429"] >= 5
    assert stats["requests"]["GET /v1/customers 429"] == stats["rate_limited_429"]
    assert stats["requests_by_status"]["200"] >= 11


def test_reset_clears_objects(emulator: EmulatorServer, client: stripe.StripeClient) -> None:
    client.v1.customers.create(params={"name": "gone"})
    httpx.post(f"{emulator.url}/_emulator/reset").raise_for_status()
    assert client.v1.customers.list().data == []
