"""A console stand-in for notification tests: an HTTP server that verifies every delivery.

Each request is checked with the `standardwebhooks` library, as a console
would; verified deliveries are kept in arrival order. It can be stopped (the
console is down: connections are refused) and started again on the same port.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from tests.factories.live import free_port


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class Delivery:
    id: str
    body: dict[str, Any]
    answered: int


@dataclass
class Receiver:
    secret: str = field(default_factory=new_secret)
    port: int = field(default_factory=free_port)
    # The status code to answer a verified delivery with (default 204).
    answer: Callable[[dict[str, Any]], int] = lambda body: 204
    deliveries: list[Delivery] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/billing-events"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = Webhook(receiver.secret).verify(raw, headers)
                except Exception as err:
                    with receiver._lock:
                        receiver.unverified.append(f"{err}")
                    self.send_response(400)
                    self.end_headers()
                    return
                code = receiver.answer(body)
                with receiver._lock:
                    receiver.deliveries.append(Delivery(headers["webhook-id"], body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted(self) -> list[Delivery]:
        """Deliveries answered with a 2xx, in arrival order."""
        with self._lock:
            return [d for d in self.deliveries if 200 <= d.answered < 300]

    def raw_json(self) -> str:
        with self._lock:
            return json.dumps([d.body for d in self.deliveries])
