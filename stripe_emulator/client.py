"""A `stripe.StripeClient` aimed at an emulator, for tests and local tools."""

from __future__ import annotations

import stripe


def make_client(url: str, api_key: str = "sk_test_emulator") -> stripe.StripeClient:
    """Every base address points at the emulator; the SDK's retries are off so tests see faults."""
    base = url.rstrip("/")
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=0,
    )
