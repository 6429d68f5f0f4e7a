"""`/docs` and `/redoc` render the API's operations in a real browser, with no network.

Debian's Chromium (apt `chromium`, which `.ci/run` installs) driven by
Playwright. Every request that leaves 127.0.0.1 is refused and recorded: a page
that still loads its JavaScript from a CDN renders nothing and fails here.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import uvicorn

from api.main import create_app
from billing.config import Settings
from tests.api.support import free_port

CHROMIUM = "/usr/bin/chromium"
# ReDoc's sidebar footer ("API docs by Redocly") shows this image from its bundle; a
# decorative logo, nothing the page needs to render.
REDOC_FOOTER_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
OPERATIONS = ("/api/webhooks/stripe", "/api/payments/stripe/portal", "/api/orgs/{org_id}/billing")


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    """The real app over TCP; the doc pages need neither the database nor Temporal."""
    app = create_app(Settings(stripe_secret_key="sk_test_docs", stripe_webhook_secret="whsec_x"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


def _open_offline(browser: object, url: str) -> tuple[object, list[str]]:
    """A page whose requests outside 127.0.0.1 are aborted and listed."""
    from playwright.sync_api import Browser, Route

    assert isinstance(browser, Browser)
    page = browser.new_page()
    refused: list[str] = []

    def local_only(route: Route) -> None:
        target = route.request.url
        if urlsplit(target).hostname == "127.0.0.1" or target.startswith("data:"):
            route.continue_()
        else:
            refused.append(target)
            route.abort()

    page.route("**/*", local_only)
    page.goto(url, wait_until="load")
    return page, refused


def test_swagger_ui_renders_every_operation_offline(docs_server: str, browser: object) -> None:
    from playwright.sync_api import Page

    page, refused = _open_offline(browser, f"{docs_server}/docs")
    assert isinstance(page, Page)
    page.wait_for_selector(".opblock", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    page.close()
    assert refused == []
    for operation in OPERATIONS:
        assert any(operation in shown.replace("\u200b", "") for shown in paths), paths


def test_redoc_renders_every_operation_offline(docs_server: str, browser: object) -> None:
    from playwright.sync_api import Page

    page, refused = _open_offline(browser, f"{docs_server}/redoc")
    assert isinstance(page, Page)
    page.wait_for_selector("[data-section-id^='operation/']", timeout=15_000)
    text = page.inner_text("body")
    page.close()
    assert [url for url in refused if url != REDOC_FOOTER_LOGO] == []
    assert "Org billing API" in text
    for operation in OPERATIONS:
        assert operation in text, text[:2000]
