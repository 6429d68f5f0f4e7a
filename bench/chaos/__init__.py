"""The chaos month: the whole product as separate processes, two billing months, faults.

`bench/chaos_month.py` is the command line; `tests/chaos/` runs a shorter month.
The modules: `processes` starts and stops the stack's processes, `faults` breaks
them on a seeded schedule, `scenario` creates orgs and drives the test clock,
`checks` counts the invariants and figures, `report` prints them.
"""

from __future__ import annotations

from .report import Report
from .run import ChaosOptions, run_chaos

__all__ = ["ChaosOptions", "Report", "run_chaos"]
