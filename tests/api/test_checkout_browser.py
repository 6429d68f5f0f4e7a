"""A canceled org pays again in a real browser: the owner asks the API for a checkout link,
opens it in Chromium, pays with Stripe's test card on the (emulated) hosted page, and
the org's subscription is live again, in the workflow and in the org row.

Debian's Chromium (apt `chromium`, which `.ci/run` installs) driven by
Playwright; every request that leaves 127.0.0.1 is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
import stripe
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.domain import BillingStatus
from stripe_emulator.server import EmulatorServer
from tests.factories.checkout import CHECKOUT_URL, canceled_org, owner_headers
from tests.factories.live import LiveStack, live_stack
from tests.factories.stack import eventually, wait_for_status

pytestmark = pytest.mark.asyncio

CHROMIUM = "/usr/bin/chromium"


@pytest_asyncio.fixture
async def stack(
    temporal_dev_env: WorkflowEnvironment,
    emulator: EmulatorServer,
    stripe_client: stripe.StripeClient,
    session_factory: sessionmaker[Session],
    database_url: str,
    task_queue: str,
    catalog: dict[str, str],
) -> AsyncIterator[LiveStack]:
    done = f"{emulator.url}/_emulator/health"
    async with live_stack(
        temporal_dev_env.client,
        emulator,
        stripe_client,
        session_factory,
        database_url,
        task_queue,
        catalog,
        stripe_checkout_success_url=f"{done}?session_id={{CHECKOUT_SESSION_ID}}",
        stripe_checkout_cancel_url=done,
    ) as live:
        yield live


async def test_canceled_org_pays_in_the_browser_and_is_entitled_again(
    stack: LiveStack,
) -> None:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it).")
    from playwright.async_api import Route, async_playwright

    state = await canceled_org(stack)
    old = state.stripe_subscription_id

    async def entitlement() -> Any:
        async with httpx.AsyncClient(base_url=stack.api_url) as http:
            answer = await http.get(
                f"/api/orgs/{state.org_id}/entitlement", headers=owner_headers(stack, state.org_id)
            )
        assert answer.status_code == 200, answer.text
        return answer.json()

    # Access really ended: the canceled trial's end is past, nothing is entitled before paying.
    before = await entitlement()
    assert (before["entitled"], before["reason"], before["status"]) == (
        False,
        "canceled",
        "canceled",
    ), before
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        answer = await http.post(CHECKOUT_URL, headers=owner_headers(stack, state.org_id))
    assert answer.status_code == 200, answer.text
    url = answer.json()["url"]

    refused: list[str] = []

    async def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            await page.route("**/*", local_only)
            await page.goto(url, wait_until="load")
            assert await page.locator("h1").inner_text() == "Subscribe"
            await page.fill("#cardNumber", "4242 4242 4242 4242")
            await page.fill("#cardExpiry", "12 / 34")
            await page.fill("#cardCvc", "123")
            await page.fill("#billingName", "Ada Lovelace")
            async with page.expect_navigation(url="**/_emulator/health*"):
                await page.click("#submit")
            landed = page.url
        finally:
            await browser.close()
    assert refused == []
    session_id = url.rsplit("/", 1)[-1]
    assert landed.endswith(f"session_id={session_id}")

    state = await wait_for_status(stack.client, state.org_id, {BillingStatus.ACTIVE})
    assert state.stripe_subscription_id and state.stripe_subscription_id != old

    async def row() -> Any:
        return stack.org(state.org_id)

    org = await eventually(
        row,
        lambda o: (
            o.stripe_subscription_id == state.stripe_subscription_id
            and o.subscription_status == "active"
        ),
    )
    sub = stack.subscription(org.stripe_subscription_id)
    assert sub.status == "active" and sub.customer == state.stripe_customer_id
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        billing = await http.get(
            f"/api/orgs/{state.org_id}/billing", headers=owner_headers(stack, state.org_id)
        )
    assert billing.status_code == 200, billing.text
    assert billing.json()["status"] == "active"

    entitled = await eventually(entitlement, lambda e: e["status"] == "active")
    assert (entitled["entitled"], entitled["reason"]) == (True, "active"), entitled
    await eventually(row, lambda o: o.entitled is True)
