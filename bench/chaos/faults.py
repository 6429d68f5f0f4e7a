"""A seeded fault injector: it kills, restarts and degrades the stack while the month runs.

Process faults (SIGKILL a worker, restart the API, stop the Temporal dev server
for a few seconds) run one at a time in the injector's thread; emulator faults
(429s, 500s and latency on the Stripe API; webhooks late, twice and out of
order) are stretches switched on and off through the emulator's control API.
The same seed gives the same sequence of choices.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from .metrics import WebhookLatency
from .processes import Stack

Range = tuple[float, float]

STRIPE_FAULT_KNOBS = ("error_rate_429", "error_rate_500", "latency_ms")
WEBHOOK_FAULT_KNOBS = ("webhook_delay_ms", "webhook_duplicate_rate", "webhook_shuffle_window")


@dataclass(frozen=True)
class FaultPlan:
    """How often each fault comes (seconds between two) and how hard it hits."""

    worker_kill_every: Range
    kill_after_advance: float
    api_restart_every: Range
    temporal_outage_every: Range
    temporal_outage_seconds: Range
    stripe_errors_every: Range
    stripe_errors_seconds: Range
    webhook_chaos_every: Range
    webhook_chaos_seconds: Range
    error_rate_429: Range = (0.1, 0.3)
    error_rate_500: Range = (0.05, 0.15)
    latency_ms: Range = (50.0, 250.0)
    webhook_delay_ms: Range = (20.0, 80.0)
    webhook_duplicate_rate: Range = (0.1, 0.3)
    webhook_shuffle_window: tuple[int, int] = (3, 8)


FULL = FaultPlan(
    worker_kill_every=(20, 45),
    kill_after_advance=0.5,
    api_restart_every=(60, 120),
    temporal_outage_every=(90, 150),
    temporal_outage_seconds=(2, 5),
    stripe_errors_every=(20, 40),
    stripe_errors_seconds=(8, 20),
    webhook_chaos_every=(10, 25),
    webhook_chaos_seconds=(10, 25),
)

LIGHT = FaultPlan(
    worker_kill_every=(60, 90),
    kill_after_advance=0.25,
    api_restart_every=(70, 100),
    temporal_outage_every=(80, 120),
    temporal_outage_seconds=(2, 3),
    stripe_errors_every=(30, 50),
    stripe_errors_seconds=(6, 12),
    webhook_chaos_every=(15, 30),
    webhook_chaos_seconds=(10, 20),
)

PLANS = {"full": FULL, "light": LIGHT}


class EmulatorControl:
    """The emulator's control API (not Stripe's): fault knobs and counters."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def set_faults(self, **knobs: Any) -> None:
        httpx.post(f"{self.url}/_emulator/faults", json=knobs, timeout=10).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_emulator/faults", timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_emulator/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


@dataclass
class FaultLog:
    """What the injector did, for the report."""

    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    temporal_down_seconds: float = 0.0


class FaultInjector:
    """Runs the plan in a background thread until `stop()`; `after_advance()` aims a kill."""

    def __init__(
        self,
        stack: Stack,
        plan: FaultPlan,
        seed: int,
        latency: WebhookLatency,
        say: Any = print,
    ) -> None:
        self.stack = stack
        self.plan = plan
        self.rng = random.Random(seed)
        self.seed = seed
        self.latency = latency
        self.emulator = EmulatorControl(stack.emulator_url)
        self.log = FaultLog()
        self._say = say
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._aimed_kill: float | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._due: dict[str, float] = {}
        self._stretch_ends: dict[str, float] = {}

    # -- control ------------------------------------------------------------------------

    def start(self) -> None:
        """Seed the emulator's own randomness and schedule the first fault of each kind."""
        self.emulator.set_faults(seed=self.seed)
        now = time.monotonic()
        self._started = now
        plan = self.plan
        for kind, every in (
            ("kill_worker", plan.worker_kill_every),
            ("restart_api", plan.api_restart_every),
            ("temporal_outage", plan.temporal_outage_every),
            ("stripe_errors", plan.stripe_errors_every),
            ("webhook_chaos", plan.webhook_chaos_every),
        ):
            # The first of each comes early, so even a short run sees every kind.
            self._due[kind] = now + self.rng.uniform(0.2, 0.6) * every[0]
        self._thread = threading.Thread(target=self._loop, name="chaos-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End every fault: stretches off, every process back up."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.emulator.clear_faults()
        self.stack.ensure_running()

    def after_advance(self) -> None:
        """A clock advance starts a wave of webhooks and activities: kill a worker inside it."""
        if self.rng.random() < self.plan.kill_after_advance:
            with self._lock:
                self._aimed_kill = time.monotonic() + self.rng.uniform(0.5, 8.0)

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._tick()
            except Exception as err:  # a failed fault must not end the run
                self._note("injector_error", f"{type(err).__name__}: {err}")

    def _tick(self) -> None:
        """End stretches that are over, then run whatever fault is due."""
        now = time.monotonic()
        for kind, end in list(self._stretch_ends.items()):
            if now >= end:
                del self._stretch_ends[kind]
                self._end_stretch(kind)
        with self._lock:
            aimed, self._aimed_kill = (
                (self._aimed_kill, None)
                if self._aimed_kill is not None and now >= self._aimed_kill
                else (None, self._aimed_kill)
            )
        if aimed is not None:
            self._kill_worker("right after a clock advance")
        for kind, due in sorted(self._due.items(), key=lambda item: item[1]):
            if self._stop.is_set() or time.monotonic() < due:
                continue
            getattr(self, f"_{kind}")()
            self._due[kind] = time.monotonic() + self.rng.uniform(*self._every(kind))

    def _every(self, kind: str) -> Range:
        plan = self.plan
        return {
            "kill_worker": plan.worker_kill_every,
            "restart_api": plan.api_restart_every,
            "temporal_outage": plan.temporal_outage_every,
            "stripe_errors": plan.stripe_errors_every,
            "webhook_chaos": plan.webhook_chaos_every,
        }[kind]

    def _note(self, kind: str, detail: str) -> None:
        elapsed = time.monotonic() - self._started
        self.log.counts[kind] += 1
        line = f"[{elapsed:6.1f}s] fault {kind}: {detail}"
        self.log.lines.append(line)
        self._say(line)

    # -- process faults -------------------------------------------------------------------

    def _kill_worker(self, why: str = "at a random moment") -> None:
        worker = self.rng.choice(self.stack.workers)
        pause = self.rng.uniform(0.5, 3.0)
        with self.stack.lock:
            if not worker.alive():
                return
            worker.kill()
        self._note("kill_worker", f"SIGKILL {worker.name} {why}, back in {pause:.1f} s")
        if self._stop.wait(pause):
            return
        with self.stack.lock:
            worker.start()

    def _restart_api(self) -> None:
        text = self.stack.api_metrics()
        if text is not None:
            self.latency.add_scrape(text)
        graceful = self.rng.random() < 0.5
        with self.stack.lock:
            if graceful:
                self.stack.api.stop()
            else:
                self.stack.api.kill()
        how = "SIGTERM" if graceful else "SIGKILL"
        self._note("restart_api", f"{how} the API and start it again")
        self.stack.start_api()

    def _temporal_outage(self) -> None:
        down_for = self.rng.uniform(*self.plan.temporal_outage_seconds)
        began = time.monotonic()
        with self.stack.lock:
            self.stack.temporal.stop()
        self._note("temporal_outage", f"Temporal dev server stopped for {down_for:.1f} s")
        self._stop.wait(down_for)
        with self.stack.lock:
            self.stack.temporal.start()
        self.stack.wait_temporal()
        self.log.temporal_down_seconds += time.monotonic() - began

    # -- emulator stretches ---------------------------------------------------------------

    def _stripe_errors(self) -> None:
        plan = self.plan
        knobs = {
            "error_rate_429": round(self.rng.uniform(*plan.error_rate_429), 3),
            "error_rate_500": round(self.rng.uniform(*plan.error_rate_500), 3),
            "latency_ms": round(self.rng.uniform(*plan.latency_ms)),
        }
        seconds = self.rng.uniform(*plan.stripe_errors_seconds)
        self.emulator.set_faults(**knobs)
        self._stretch_ends["stripe_errors"] = time.monotonic() + seconds
        self._note("stripe_errors", f"{knobs} for {seconds:.0f} s")

    def _webhook_chaos(self) -> None:
        plan = self.plan
        knobs = {
            "webhook_delay_ms": round(self.rng.uniform(*plan.webhook_delay_ms)),
            "webhook_duplicate_rate": round(self.rng.uniform(*plan.webhook_duplicate_rate), 3),
            "webhook_shuffle_window": self.rng.randint(*plan.webhook_shuffle_window),
        }
        seconds = self.rng.uniform(*plan.webhook_chaos_seconds)
        self.emulator.set_faults(**knobs)
        self._stretch_ends["webhook_chaos"] = time.monotonic() + seconds
        self._note("webhook_chaos", f"{knobs} for {seconds:.0f} s")

    def _end_stretch(self, kind: str) -> None:
        knobs = STRIPE_FAULT_KNOBS if kind == "stripe_errors" else WEBHOOK_FAULT_KNOBS
        self.emulator.set_faults(**dict.fromkeys(knobs, 0))
