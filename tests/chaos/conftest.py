"""The chaos month in the test suite: the whole stack as processes, under faults."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: runs bench/chaos_month.py (separate processes, injected faults, minutes long)",
    )
