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
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

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
                message = await asyncio.wait_for(receive(), self.timeout)
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


def header_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose headers do not arrive in time."""

    class HeaderTimeoutProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _answered: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._answered = self.cycle
            self._deadline = self.loop.call_later(timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._answered:
                self._disarm()  # a new request's headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %.0f s", timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
