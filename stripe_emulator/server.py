"""Run the emulator: in a background thread for tests, or blocking for the CLI.

Subscriptions of customers on a test clock move only when the clock is
advanced. Subscriptions of other customers live in wall time: a ticker thread
plays their due transitions (trial ends, renewals, invoice finalization,
payment retries) about once a second.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from stripe_emulator import engine
from stripe_emulator.app import EmulatorApp
from stripe_emulator.state import EngineSettings, State
from stripe_emulator.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


@dataclass
class EmulatorConfig:
    """How to run one emulator; the defaults follow Stripe's own behaviour."""

    port: int = 12111
    host: str = "127.0.0.1"
    state_file: str | None = None
    missing_payment_method_succeeds: bool = False
    webhook_retry_delays: tuple[float, ...] = (0.5, 1, 2, 4, 8)
    webhook_timeout: float = 10.0
    invoice_finalization_delay: int = 3600
    payment_retry_days: tuple[int, ...] = (3, 5, 7)
    dunning_final_status: str = "canceled"
    wall_tick_seconds: float = 1.0
    persist_interval: float = 0.2
    log_level: str = "warning"


def tick_wall_time(state: State) -> int:
    """Play due transitions of subscriptions that are not on a test clock."""
    with state.lock:
        subs = [s for s in state.collection("subscription").values() if not s.get("test_clock")]
        if not subs:
            return 0
        return engine.run(state, subs, state.wall_now())


class EmulatorServer:
    """The emulator on a real port, with its webhook workers and wall-time ticker."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.state = State(
            EngineSettings(
                missing_payment_method_succeeds=self.config.missing_payment_method_succeeds,
                invoice_finalization_delay=self.config.invoice_finalization_delay,
                payment_retry_days=tuple(self.config.payment_retry_days),
                dunning_final_status=self.config.dunning_final_status,
            ),
            state_file=self.config.state_file,
            persist_interval=self.config.persist_interval,
        )
        self.webhooks = WebhookDispatcher(
            self.state, self.config.webhook_retry_delays, self.config.webhook_timeout
        )
        self.app = EmulatorApp(
            self.state, extra_stats=self.webhooks.pending, tick=lambda: tick_wall_time(self.state)
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stop_ticker = threading.Event()
        self._socket: socket.socket | None = None
        self.port = self.config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        sock.listen(512)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        return sock

    def _start_background(self) -> None:
        self.state.start_persistence()
        self.webhooks.start()
        self._stop_ticker.clear()

        def tick() -> None:
            while not self._stop_ticker.wait(self.config.wall_tick_seconds):
                try:
                    tick_wall_time(self.state)
                except Exception:
                    log.exception("wall-time tick failed")

        self._ticker = threading.Thread(target=tick, name="stripe-emulator-ticker", daemon=True)
        self._ticker.start()

    def _stop_background(self) -> None:
        self._stop_ticker.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        self.webhooks.stop()
        self.state.stop_persistence()

    def start(self) -> None:
        """Serve in a background thread; returns once the port accepts connections."""
        self._socket = self._bind()
        config = uvicorn.Config(
            self.app,
            log_level=self.config.log_level,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._start_background()
        sockets = [self._socket]
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=sockets), name="stripe-emulator-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Stripe emulator did not start on {self.url}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving, finish webhook workers and write the state file one last time."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._stop_background()

    def set_faults(self, **faults: Any) -> None:
        """Same knobs as `POST /_emulator/faults` (error_rate_429, latency_ms, ...)."""
        self.state.faults.configure(faults)

    def clear_faults(self) -> None:
        self.state.faults.clear()

    def reset(self) -> None:
        self.state.reset()

    def wait_for_webhooks(self, timeout: float = 10.0) -> bool:
        """Block until every queued delivery and scheduled retry has run."""
        return self.webhooks.wait_idle(timeout)

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C)."""
        sock = self._bind()
        config = uvicorn.Config(
            self.app,
            log_level=self.config.log_level,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._start_background()
        print(f"Stripe emulator listening on {self.url}", file=sys.stderr, flush=True)
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()
            self._stop_background()


def serve(
    host: str = "127.0.0.1",
    port: int = 12111,
    state_file: str | None = None,
    **options: Any,
) -> None:
    """Blocking entry point for `billing emulator serve`."""
    config = EmulatorConfig(port=port, host=host, state_file=state_file, **options)
    EmulatorServer(config).serve_forever()
