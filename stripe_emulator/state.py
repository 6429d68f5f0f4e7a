"""The emulator's memory: Stripe objects by kind, events, idempotency records, counters.

Objects are kept in Stripe's public JSON shape, so answering is a copy and
persisting is a JSON dump. What Stripe keeps privately (how a test card
behaves, which trial reminders went out) lives in `meta`, keyed by object id.
One re-entrant lock guards everything: handlers are short, and the test clock
must see a consistent world while it moves time.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import string
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import stripe

from stripe_emulator.errors import StripeError, missing
from stripe_emulator.faults import FaultInjector

API_VERSION = stripe.api_version
_ALPHABET = string.ascii_letters + string.digits

Obj = dict[str, Any]

KINDS_BY_PREFIX = {
    "cus": "customer",
    "sub": "subscription",
    "in": "invoice",
    "price": "price",
    "prod": "product",
    "pm": "payment_method",
    "clock": "test_helpers.test_clock",
    "mtr": "billing.meter",
    "bpc": "billing_portal.configuration",
    "bps": "billing_portal.session",
    "we": "webhook_endpoint",
    "evt": "event",
    "cs": "checkout.session",
    "seti": "setup_intent",
}

PERSISTED = (
    "objects",
    "meta",
    "meter_events",
    "meter_identifiers",
    "idempotency",
    "deliveries",
)


@dataclass
class EngineSettings:
    """Behaviour choices where tests want something other than Stripe's default."""

    missing_payment_method_succeeds: bool = False
    invoice_finalization_delay: int = 3600
    payment_retry_days: tuple[int, ...] = (3, 5, 7)
    dunning_final_status: str = "canceled"
    idempotency_ttl: int = 24 * 3600
    enforce_advance_limit: bool = True
    # Stripe saves the answer of a request once its endpoint started running; a
    # `resource_missing` (e.g. `No such price`) may come from inside it. On: such
    # answers are saved under their key like card errors (off: the key stays free).
    idempotency_saves_missing_resources: bool = False


@dataclass
class RequestContext:
    """What the event's `request` field reports for a change made by an API call."""

    request_id: str | None = None
    idempotency_key: str | None = None


def new_id(prefix: str, length: int = 24) -> str:
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


class State:
    """All emulator state behind one lock, persisted to an optional JSON file."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        state_file: str | None = None,
        persist_interval: float = 0.2,
    ) -> None:
        self.lock = threading.RLock()
        self.settings = settings or EngineSettings()
        self._initial_settings = copy.deepcopy(self.settings)
        self.faults = FaultInjector()
        self.state_file = state_file
        self.persist_interval = persist_interval
        self.objects: dict[str, dict[str, Obj]] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.meter_events: list[Obj] = []
        self.meter_index: dict[tuple[str, str], list[Obj]] = {}
        self.meter_identifiers: dict[str, int] = {}
        self.idempotency: dict[str, Obj] = {}
        self.deliveries: dict[str, dict[str, Obj]] = {}
        self.stats: Counter[str] = Counter()
        self.request_stats: Counter[str] = Counter()
        self.request = RequestContext()
        self.on_event: Callable[[Obj], None] | None = None
        self.on_reset: Callable[[], None] | None = None
        self.clock_source: Callable[[], float] = time.time
        self._dirty = False
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        if state_file and os.path.exists(state_file):
            self.load(state_file)

    # -- objects -----------------------------------------------------------------

    def collection(self, kind: str) -> dict[str, Obj]:
        return self.objects.setdefault(kind, {})

    def put(self, obj: Obj) -> Obj:
        self.collection(obj["object"])[obj["id"]] = obj
        self.touch()
        return obj

    def get(self, kind: str, object_id: str, param: str | None = "id") -> Obj:
        """The object or Stripe's `No such ...` 404."""
        found = self.collection(kind).get(object_id)
        if found is None:
            raise missing(kind.rsplit(".", 1)[-1].replace("_", " "), object_id, param)
        return found

    def find(self, kind: str, object_id: str) -> Obj | None:
        return self.collection(kind).get(object_id)

    def by_id(self, object_id: str) -> Obj | None:
        """Look an id up by its prefix, for `expand[]`."""
        prefix = object_id.split("_", 1)[0]
        kind = KINDS_BY_PREFIX.get(prefix)
        if kind is None:
            return None
        return self.collection(kind).get(object_id)

    def add_meter_event(self, event: Obj, customer_key: str) -> None:
        self.meter_events.append(event)
        self._index_meter_event(event, customer_key)
        self.touch()

    def _index_meter_event(self, event: Obj, customer_key: str) -> None:
        customer = str(event["payload"].get(customer_key, ""))
        self.meter_index.setdefault((event["event_name"], customer), []).append(event)
        event.setdefault("_customer_key", customer_key)

    def meter_events_for(self, event_name: str, customer: str) -> list[Obj]:
        """Usage of one customer for one event name, in the order it arrived."""
        return self.meter_index.get((event_name, customer), [])

    def meta_of(self, object_id: str) -> dict[str, Any]:
        return self.meta.setdefault(object_id, {})

    def touch(self) -> None:
        self._dirty = True

    # -- time ----------------------------------------------------------------------

    def wall_now(self) -> int:
        return int(self.clock_source())

    def clock_of_customer(self, customer_id: str | None) -> Obj | None:
        if not customer_id:
            return None
        customer = self.find("customer", customer_id)
        if customer is None or not customer.get("test_clock"):
            return None
        return self.find("test_helpers.test_clock", customer["test_clock"])

    def now_for(self, customer_id: str | None) -> int:
        """The customer's present: its test clock's frozen time, else wall time."""
        clock = self.clock_of_customer(customer_id)
        if clock is not None:
            return int(clock["frozen_time"])
        return self.wall_now()

    # -- events ----------------------------------------------------------------------

    def emit(
        self,
        event_type: str,
        obj: Obj,
        at: int,
        previous: Obj | None = None,
        from_api: bool = True,
    ) -> Obj:
        """Record the event Stripe would send and hand it to the webhook dispatcher."""
        endpoints = [
            e
            for e in self.collection("webhook_endpoint").values()
            if e.get("status") == "enabled"
            and ("*" in e["enabled_events"] or event_type in e["enabled_events"])
        ]
        request = (
            {"id": self.request.request_id, "idempotency_key": self.request.idempotency_key}
            if from_api
            else {"id": None, "idempotency_key": None}
        )
        data: Obj = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        event: Obj = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": at,
            "data": data,
            "livemode": False,
            "pending_webhooks": len(endpoints),
            "request": request,
            "type": event_type,
        }
        self.put(event)
        self.stats["events_emitted"] += 1
        if endpoints:
            self.deliveries[event["id"]] = {
                e["id"]: {"status": "pending", "attempts": 0} for e in endpoints
            }
            if self.on_event is not None:
                self.on_event(event)
        return event

    # -- idempotency -----------------------------------------------------------------

    def idempotent_lookup(self, scope: str, key: str) -> Obj | None:
        record = self.idempotency.get(f"{scope}:{key}")
        if record is None:
            return None
        if self.wall_now() - record["created"] > self.settings.idempotency_ttl:
            del self.idempotency[f"{scope}:{key}"]
            return None
        return record

    def idempotent_store(self, scope: str, key: str, record: Obj) -> None:
        self.idempotency[f"{scope}:{key}"] = record
        self.touch()

    # -- lifecycle ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every object; fault settings go back to off."""
        with self.lock:
            self.objects = {}
            self.meta = {}
            self.meter_events = []
            self.meter_index = {}
            self.meter_identifiers = {}
            self.idempotency = {}
            self.deliveries = {}
            self.stats = Counter()
            self.request_stats = Counter()
            self.settings = copy.deepcopy(self._initial_settings)
            self.faults.clear()
            self.touch()
        if self.on_reset is not None:
            self.on_reset()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy({name: getattr(self, name) for name in PERSISTED})

    def load(self, path: str) -> None:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        with self.lock:
            for name in PERSISTED:
                if name in data:
                    setattr(self, name, data[name])
            self.meter_index = {}
            for event in self.meter_events:
                self._index_meter_event(event, event.get("_customer_key", "stripe_customer_id"))

    def flush(self) -> None:
        """Write the state file atomically (temp file + rename) if anything changed."""
        if not self.state_file:
            return
        with self.lock:
            if not self._dirty:
                return
            payload = json.dumps({name: getattr(self, name) for name in PERSISTED})
            self._dirty = False
        directory = os.path.dirname(os.path.abspath(self.state_file))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".stripe-emulator-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
            os.replace(tmp, self.state_file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def start_persistence(self) -> None:
        """Flush changes in the background so a burst of requests costs one write."""
        if not self.state_file or self._flusher is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.persist_interval):
                self.flush()

        self._flusher = threading.Thread(target=loop, name="stripe-emulator-persist", daemon=True)
        self._flusher.start()

    def stop_persistence(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
            self._flusher = None
        self.flush()

    @contextmanager
    def api_request(self, request_id: str, idempotency_key: str | None) -> Iterator[None]:
        """Hold the lock and remember which request the emitted events come from."""
        with self.lock:
            previous = self.request
            self.request = RequestContext(request_id, idempotency_key)
            try:
                yield
            finally:
                self.request = previous


def require(value: Any, param: str) -> Any:
    if value is None or value == "":
        raise StripeError(
            f"Missing required param: {param}.", param=param, code="parameter_missing"
        )
    return value
