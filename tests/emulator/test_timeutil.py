"""Billing periods counted from the anchor, clamped to short months like Stripe."""

from __future__ import annotations

from datetime import UTC, datetime

from stripe_emulator.timeutil import add_interval, next_period_end


def ts(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp())


def test_month_ends_are_clamped_and_recover() -> None:
    anchor = ts(2026, 1, 31)
    assert [add_interval(anchor, "month", n) for n in (1, 2, 3)] == [
        ts(2026, 2, 28),
        ts(2026, 3, 31),
        ts(2026, 4, 30),
    ]
    assert add_interval(ts(2028, 1, 31), "month", 1) == ts(2028, 2, 29)
    assert add_interval(ts(2024, 2, 29), "year", 1) == ts(2025, 2, 28)


def test_other_intervals() -> None:
    anchor = ts(2026, 3, 1)
    assert add_interval(anchor, "day", 3) == ts(2026, 3, 4)
    assert add_interval(anchor, "week", 2) == ts(2026, 3, 15)
    assert add_interval(anchor, "month", 3) == ts(2026, 6, 1)


def test_next_period_end_counts_from_the_anchor() -> None:
    anchor = ts(2026, 1, 31)
    assert next_period_end(anchor, ts(2026, 2, 28), "month", 1) == ts(2026, 3, 31)
    assert next_period_end(anchor, ts(2026, 1, 31), "month", 1) == ts(2026, 2, 28)
