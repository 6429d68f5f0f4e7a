"""Figures measured while the month runs: webhook answer times and worker memory.

The API's webhook histogram lives in the API process, so it is scraped before
every restart and once at the end, and the scrapes are added up.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import psutil  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from tooling.supervise import Child

WEBHOOK_ROUTE = "/api/webhooks/stripe"
DURATION_METRIC = "billing_http_request_duration_seconds"


class WebhookLatency:
    """The API's `billing_http_request_duration_seconds` for the webhook route, summed."""

    def __init__(self) -> None:
        self.buckets: dict[float, float] = {}
        self.count = 0.0
        self._lock = threading.Lock()

    def add_scrape(self, text: str) -> None:
        """Add one API process's histogram (each restart starts a new one)."""
        buckets: dict[float, float] = {}
        count = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != DURATION_METRIC:
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("route") != WEBHOOK_ROUTE or labels.get("method") != "POST":
                    continue
                if sample.name.endswith("_bucket"):
                    bound = float(labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
        with self._lock:
            for bound, value in buckets.items():
                self.buckets[bound] = self.buckets.get(bound, 0.0) + value
            self.count += count

    def quantile(self, q: float) -> float | None:
        """Like Prometheus' `histogram_quantile`: linear inside the bucket that holds it."""
        with self._lock:
            if self.count <= 0:
                return None
            bounds = sorted(self.buckets)
            rank = q * self.count
            lower, below = 0.0, 0.0
            for bound in bounds:
                cumulative = self.buckets[bound]
                if cumulative >= rank:
                    if math.isinf(bound):
                        return lower
                    inside = cumulative - below
                    fraction = (rank - below) / inside if inside else 1.0
                    return lower + (bound - lower) * fraction
                lower, below = bound, cumulative
            return lower


class RssSampler:
    """Samples the resident memory of the worker processes; keeps the peak."""

    def __init__(self, services: Callable[[], list[Child]], interval: float = 0.5) -> None:
        self._services = services
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_bytes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="chaos-rss", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def sample(self) -> None:
        for service in self._services():
            pid = service.pid
            if pid is None or not service.alive():
                continue
            try:
                process = psutil.Process(pid)
                rss = process.memory_info().rss + sum(
                    child.memory_info().rss for child in process.children(recursive=True)
                )
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.peak_bytes = max(self.peak_bytes, int(rss))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()
