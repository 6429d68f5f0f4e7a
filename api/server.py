"""How `billing api` serves the app: time limits a slow client cannot stretch.

uvicorn bounds idle keep-alive connections but not a request whose headers
trickle in a byte at a time, nor a body that is announced and never sent. Such
clients would hold sockets and workers for as long as they like. Here:

- headers must be complete within `API_HEADER_TIMEOUT_SECONDS` of the
  connection opening (or of the previous answer on a kept-alive connection),
  else the connection is closed;
- each chunk of a body must arrive within `API_BODY_TIMEOUT_SECONDS` of the
  previous one, else the answer is 408 and the connection is closed.

Limits are documented in docs/http.md.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from billing.config import get_settings

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 10.0


class _BodyTooSlowError(Exception):
    pass


class BodyTimeoutMiddleware:
    """408 when a request body stalls; the connection is closed after the answer."""

    def __init__(self, app: ASGIApp, timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal body_done
            if body_done:  # e.g. waiting for a disconnect while answering: unbounded
                return await receive()
            try:
                # asyncio.timeout, not wait_for: no extra task per chunk.
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise _BodyTooSlowError from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _BodyTooSlowError:
            if started:
                raise
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"connection", b"close"),
                    ],
                }
            )
            body = b'{"detail":"Request body was not sent in time"}'
            await send({"type": "http.response.body", "body": body})


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose headers do not arrive in time.

    The deadline is `header_timeout` seconds, by default `API_HEADER_TIMEOUT_SECONDS`
    from the environment: `billing api --workers N` hands this class to worker
    processes by name, and each one reads its settings there.
    """

    header_timeout: float | None = None
    _deadline: asyncio.TimerHandle | None = None

    def _timeout(self) -> float:
        if self.header_timeout is None:
            return get_settings().api_header_timeout_seconds
        return self.header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._timeout(), self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def on_headers_complete(self) -> None:
        self._disarm()  # this request's headers are in
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request already sent its headers: it starts now, unbounded.
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %.0f s", self._timeout())
            self.transport.close()


def header_timeout_protocol(timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol with an explicit header deadline (an in-process server, tests)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": timeout})
