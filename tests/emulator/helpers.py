"""Test helpers for the emulator suite: a webhook receiver and catalog builders."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import stripe
from stripe.params import SubscriptionCreateParamsItem


@dataclass
class Delivery:
    body: str
    signature: str
    headers: dict[str, str]


@dataclass
class Receiver:
    """A local HTTP endpoint that records webhook deliveries and answers a chosen status."""

    server: ThreadingHTTPServer
    deliveries: list[Delivery] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/webhooks"

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else 200

    def record(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)

    def bodies(self) -> list[str]:
        with self.lock:
            return [d.body for d in self.deliveries]

    def wait_for(self, predicate: Callable[[list[Delivery]], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(list(self.deliveries)):
                    return
            time.sleep(0.02)
        raise AssertionError(f"webhook deliveries never matched; got {len(self.deliveries)}")

    def events(self, secret: str) -> list[stripe.Event]:
        """Every delivered body, verified with the SDK the way a real receiver would."""
        with self.lock:
            deliveries = list(self.deliveries)
        return [stripe.Webhook.construct_event(d.body, d.signature, secret) for d in deliveries]


def start_receiver() -> Receiver:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode("utf-8")
            receiver = holder["receiver"]
            status = receiver.next_status()
            if status < 300:
                receiver.record(
                    Delivery(body, self.headers.get("Stripe-Signature", ""), dict(self.headers))
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(server)
    holder["receiver"] = receiver
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return receiver


@dataclass
class Catalog:
    """The shape the product sells: a base price plus users (`last`) and requests (`sum`)."""

    base: stripe.Price
    users: stripe.Price
    requests: stripe.Price
    users_meter: stripe.billing.Meter
    requests_meter: stripe.billing.Meter


def make_catalog(client: stripe.StripeClient) -> Catalog:
    users_meter = client.v1.billing.meters.create(
        params={
            "display_name": "Users",
            "event_name": "additional_users",
            "default_aggregation": {"formula": "last"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    requests_meter = client.v1.billing.meters.create(
        params={
            "display_name": "Requests",
            "event_name": "additional_requests",
            "default_aggregation": {"formula": "sum"},
        }
    )
    product = client.v1.products.create(params={"name": "Platform"})
    base = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 2000,
            "product": product.id,
            "recurring": {"interval": "month"},
            "lookup_key": "base",
        }
    )
    users = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 500,
            "product_data": {"name": "Users"},
            "recurring": {"interval": "month", "usage_type": "metered", "meter": users_meter.id},
        }
    )
    requests = client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 1,
            "product_data": {"name": "Requests"},
            "recurring": {
                "interval": "month",
                "usage_type": "metered",
                "meter": requests_meter.id,
            },
        }
    )
    return Catalog(base, users, requests, users_meter, requests_meter)


def subscription_items(catalog: Catalog) -> list[SubscriptionCreateParamsItem]:
    return [
        {"price": catalog.base.id, "quantity": 1},
        {"price": catalog.users.id},
        {"price": catalog.requests.id},
    ]
