"""Logging that an unauthenticated caller cannot turn into a flood.

Refused webhook deliveries are counted in metrics one by one; the log gets the
first refusal of each reason in an interval, then one summary line with the
counts of what was held back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class BoundedLog:
    """At most one line per reason per `interval` seconds, plus a summary of the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._logged: set[str] = set()
        self._held: Counter[str] = Counter()

    def warning(self, reason: str) -> bool:
        """Log `reason` unless it was logged in this interval; True when a line was written."""
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._flush(now)
        if reason in self._logged:
            self._held[reason] += 1
            return False
        self._logged.add(reason)
        self._log.warning("%s: %s", self._what, reason)
        return True

    def _flush(self, now: float) -> None:
        if self._held:
            total = sum(self._held.values())
            detail = ", ".join(f"{reason} x{count}" for reason, count in self._held.most_common())
            self._log.warning(
                "%s: %d more in the last %.0f s (%s)",
                self._what,
                total,
                now - self._window_start,
                detail,
                extra={"suppressed": total},
            )
        self._window_start = now
        self._logged.clear()
        self._held.clear()
