"""Slow clients against the real server: headers and bodies have deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import stripe
import uvicorn
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from api.server import header_timeout_protocol
from billing.config import Settings
from tests.api.support import free_port

LIMIT = 1.0


@pytest_asyncio.fixture
async def server_port(
    api_settings: Settings,
    temporal_dev_env: WorkflowEnvironment,
    session_factory: sessionmaker[Session],
    stripe_client: stripe.StripeClient,
) -> AsyncIterator[int]:
    settings = api_settings.model_copy(
        update={"api_header_timeout_seconds": LIMIT, "api_body_timeout_seconds": LIMIT}
    )
    app = create_app(
        settings,
        temporal_client=temporal_dev_env.client,
        session_factory=session_factory,
        stripe_client=stripe_client,
    )
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=header_timeout_protocol(LIMIT),
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield port
    server.should_exit = True
    await task


async def _read_all(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.read(), within)


async def test_headers_sent_a_byte_at_a_time_are_cut_off(server_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    started = time.monotonic()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    closed_after = None
    for byte in request:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
        if reader.at_eof() or writer.is_closing():
            break
        try:
            data = await asyncio.wait_for(reader.read(1), 0.01)
        except TimeoutError:
            continue
        if data == b"":
            break
    closed_after = time.monotonic() - started
    writer.close()
    assert closed_after < LIMIT + 1.5, closed_after


async def test_a_body_that_never_comes_is_a_408(server_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    started = time.monotonic()
    writer.write(
        b"POST /api/webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Stripe-Signature: t=1,v1=00\r\nContent-Length: 1000\r\n\r\n{"id":'
    )
    await writer.drain()
    answer = await _read_all(reader, LIMIT + 5)
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert b"Request body was not sent in time" in answer
    assert LIMIT - 0.2 < elapsed < LIMIT + 2


async def test_an_ordinary_client_is_answered_and_kept_alive(server_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    for _ in range(2):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 200"), status
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
    writer.close()
