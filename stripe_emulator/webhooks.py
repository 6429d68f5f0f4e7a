"""Signed webhook deliveries in the background, with retries and optional chaos.

Each endpoint has its own worker, so a slow receiver delays only itself and
first attempts arrive in the order the events happened. A failed attempt
(non-2xx or no connection) is retried on the configured schedule without
holding back later events, like Stripe. The chaos knobs of `Faults` (delay,
duplicates, shuffle window, drops) act here.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from stripe_emulator.state import Obj, State

log = logging.getLogger(__name__)


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value Stripe computes for `payload`."""
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(
        secret.encode("utf-8"), f"{moment}.{payload}".encode(), hashlib.sha256
    ).hexdigest()
    return f"t={moment},v1={digest}"


@dataclass(order=True)
class _Retry:
    due: float
    seq: int
    endpoint_id: str = field(compare=False)
    event_id: str = field(compare=False)
    generation: int = field(compare=False)


class WebhookDispatcher:
    """Delivers events of `state` to its webhook endpoints."""

    def __init__(
        self,
        state: State,
        retry_delays: tuple[float, ...] = (0.5, 1, 2, 4, 8),
        timeout: float = 10.0,
    ) -> None:
        self.state = state
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        self._queues: dict[str, queue.Queue[tuple[str, int] | None]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._retries: list[_Retry] = []
        self._retry_lock = threading.Condition()
        self._seq = 0
        self._generation = 0
        self._busy = 0
        self._busy_lock = threading.Condition()
        self._stopping = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._client = httpx.Client(timeout=timeout)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._scheduler = threading.Thread(
            target=self._schedule_loop, name="stripe-emulator-webhook-retries", daemon=True
        )
        self._scheduler.start()
        self.state.on_event = self.enqueue
        self.state.on_reset = self.reset
        with self.state.lock:
            pending = [
                (event_id, endpoint_id)
                for event_id, targets in self.state.deliveries.items()
                for endpoint_id, record in targets.items()
                if record["status"] == "pending"
            ]
        for event_id, endpoint_id in pending:
            self._submit(endpoint_id, event_id)

    def stop(self) -> None:
        self._stopping.set()
        with self._retry_lock:
            self._retry_lock.notify_all()
        for q in self._queues.values():
            q.put(None)
        for worker in self._workers.values():
            worker.join(timeout=2)
        if self._scheduler is not None:
            self._scheduler.join(timeout=2)
        self._client.close()

    def reset(self) -> None:
        """Forget queued and scheduled deliveries (after the state was cleared)."""
        self._generation += 1
        with self._retry_lock:
            dropped = len(self._retries)
            self._retries.clear()
        self._busy_add(-dropped)
        for q in self._queues.values():
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._done()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until nothing is queued, in flight or scheduled for retry."""
        deadline = time.monotonic() + timeout
        with self._busy_lock:
            while self._busy > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._busy_lock.wait(remaining)
        return True

    # -- queueing -----------------------------------------------------------------------

    def enqueue(self, event: Obj) -> None:
        """Called by `State.emit` (lock held): queue one delivery per target endpoint."""
        for endpoint_id in self.state.deliveries.get(event["id"], {}):
            self._submit(endpoint_id, event["id"])

    def _busy_add(self, n: int) -> None:
        with self._busy_lock:
            self._busy += n
            if self._busy <= 0:
                self._busy = 0
                self._busy_lock.notify_all()

    def _done(self) -> None:
        self._busy_add(-1)

    def _submit(self, endpoint_id: str, event_id: str) -> None:
        self._busy_add(1)
        self._queue_for(endpoint_id).put((event_id, self._generation))

    def _queue_for(self, endpoint_id: str) -> queue.Queue[tuple[str, int] | None]:
        q = self._queues.get(endpoint_id)
        if q is None:
            q = queue.Queue()
            self._queues[endpoint_id] = q
            worker = threading.Thread(
                target=self._work,
                args=(endpoint_id, q),
                name=f"stripe-emulator-webhook-{endpoint_id}",
                daemon=True,
            )
            self._workers[endpoint_id] = worker
            worker.start()
        return q

    # -- workers ------------------------------------------------------------------------

    def _take_batch(self, q: queue.Queue[tuple[str, int] | None]) -> list[tuple[str, int]] | None:
        first = q.get()
        if first is None:
            return None
        batch = [first]
        window = self.state.faults.settings.webhook_shuffle_window
        if window > 1:
            deadline = time.monotonic() + 0.2
            while len(batch) < window:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = q.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    q.put(None)
                    break
                batch.append(item)
            self.state.faults.shuffle(batch)
        return batch

    def _work(self, endpoint_id: str, q: queue.Queue[tuple[str, int] | None]) -> None:
        while not self._stopping.is_set():
            batch = self._take_batch(q)
            if batch is None:
                return
            for event_id, generation in batch:
                try:
                    if generation == self._generation and not self._stopping.is_set():
                        self._deliver(endpoint_id, event_id, generation)
                except Exception:
                    log.exception("webhook delivery crashed")
                finally:
                    self._done()

    def _deliver(self, endpoint_id: str, event_id: str, generation: int) -> None:
        faults = self.state.faults
        with self.state.lock:
            endpoint = self.state.find("webhook_endpoint", endpoint_id)
            event = self.state.find("event", event_id)
            record = self.state.deliveries.get(event_id, {}).get(endpoint_id)
            if endpoint is None or event is None or record is None or record["status"] != "pending":
                return
            if endpoint.get("status") != "enabled":
                return
            secret = str(endpoint["secret"])
            url = str(endpoint["url"])
            payload = json.dumps(event, indent=2)
            record["attempts"] += 1
            attempt = record["attempts"]
            self.state.stats["webhook_deliveries_attempted"] += 1
        delay = faults.settings.webhook_delay_ms
        if delay > 0:
            time.sleep(delay / 1000)
        if attempt == 1 and faults.chance(faults.settings.webhook_drop_rate):
            with self.state.lock:
                record["status"] = "dropped"
                self.state.stats["webhook_deliveries_dropped"] += 1
                self.state.touch()
            return
        ok = self._post(url, payload, secret)
        if ok and faults.chance(faults.settings.webhook_duplicate_rate):
            with self.state.lock:
                self.state.stats["webhook_deliveries_duplicated"] += 1
            self._post(url, payload, secret)
        with self.state.lock:
            if generation != self._generation:
                return
            if ok:
                record["status"] = "succeeded"
                event["pending_webhooks"] = max(0, int(event["pending_webhooks"]) - 1)
                self.state.stats["webhook_deliveries_succeeded"] += 1
            else:
                self.state.stats["webhook_deliveries_failed"] += 1
                if attempt > len(self.retry_delays):
                    record["status"] = "failed"
                    self.state.stats["webhook_deliveries_given_up"] += 1
                else:
                    self._schedule(endpoint_id, event_id, self.retry_delays[attempt - 1])
            self.state.touch()

    def _post(self, url: str, payload: str, secret: str) -> bool:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign(payload, secret),
        }
        try:
            response = self._client.post(url, content=payload.encode("utf-8"), headers=headers)
        except httpx.HTTPError as exc:
            log.info("webhook to %s failed: %s", url, exc)
            return False
        return 200 <= response.status_code < 300

    # -- retries ------------------------------------------------------------------------

    def _schedule(self, endpoint_id: str, event_id: str, delay: float) -> None:
        self._busy_add(1)
        with self._retry_lock:
            self._seq += 1
            heapq.heappush(
                self._retries,
                _Retry(
                    time.monotonic() + delay, self._seq, endpoint_id, event_id, self._generation
                ),
            )
            self._retry_lock.notify_all()

    def _schedule_loop(self) -> None:
        while not self._stopping.is_set():
            due: list[_Retry] = []
            with self._retry_lock:
                if not self._retries:
                    self._retry_lock.wait(0.5)
                    continue
                wait = self._retries[0].due - time.monotonic()
                if wait > 0:
                    self._retry_lock.wait(min(wait, 0.5))
                    continue
                while self._retries and self._retries[0].due <= time.monotonic():
                    due.append(heapq.heappop(self._retries))
            for retry in due:
                if retry.generation == self._generation:
                    self._queue_for(retry.endpoint_id).put((retry.event_id, retry.generation))
                else:
                    self._done()

    def pending(self) -> dict[str, Any]:
        with self._retry_lock:
            scheduled = len(self._retries)
        return {"scheduled_retries": scheduled, "in_flight_or_queued": self._busy}
