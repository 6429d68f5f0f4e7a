"""Billing-period arithmetic done the way Stripe does it.

Periods are counted from the billing cycle anchor, never from the previous
period end, and a day of month that does not exist is clamped to the month's
last day: an anchor on Jan 31 renews on Feb 28 (29), Mar 31, Apr 30, ...
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

DAY = 86400


def _add_months(moment: datetime, months: int) -> datetime:
    total = moment.month - 1 + months
    year = moment.year + total // 12
    month = total % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def add_interval(anchor: int, interval: str, count: int) -> int:
    """`anchor` moved forward by `count` intervals (day, week, month or year)."""
    moment = datetime.fromtimestamp(anchor, UTC)
    if interval == "day":
        result = moment + timedelta(days=count)
    elif interval == "week":
        result = moment + timedelta(weeks=count)
    elif interval == "year":
        result = _add_months(moment, 12 * count)
    else:
        result = _add_months(moment, count)
    return int(result.timestamp())


def next_period_end(anchor: int, after: int, interval: str, interval_count: int) -> int:
    """The first renewal date counted from `anchor` that lies strictly after `after`."""
    periods = 1
    while True:
        end = add_interval(anchor, interval, periods * interval_count)
        if end > after:
            return end
        periods += 1
