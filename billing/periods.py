"""Monthly billing periods, stepped the way Stripe steps a monthly subscription.

Used to name the periods a worker outage skipped over: the workflow only sees
the period before and the current one, and reports each one in between.
"""

from __future__ import annotations

import calendar
from datetime import datetime


def add_month(moment: datetime, anchor_day: int) -> datetime:
    """One month later on the anchor day, clamped to the month's length (Jan 31 -> Feb 28)."""
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def periods_between(
    start: datetime, until: datetime, anchor_day: int
) -> list[tuple[datetime, datetime]]:
    """The monthly periods from `start` up to `until` (the last one cut at `until`)."""
    periods: list[tuple[datetime, datetime]] = []
    cursor = start
    while cursor < until:
        end = min(add_month(cursor, anchor_day), until)
        periods.append((cursor, end))
        cursor = end
    return periods
