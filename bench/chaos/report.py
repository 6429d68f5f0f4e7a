"""The run's verdict: each invariant as a count, then the figures, as text or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .checks import Invariant


@dataclass
class Report:
    """The verdict of one chaos month."""

    orgs: int
    seed: int
    faults: str
    invariants: list[Invariant] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    fault_counts: dict[str, int] = field(default_factory=dict)
    unsettled: list[str] = field(default_factory=list)
    histories: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Every invariant counted and at 0, and the run finished in time."""
        return (
            self.error is None
            and bool(self.invariants)
            and all(i.count == 0 for i in self.invariants)
        )

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["ok"] = self.ok
        return document

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)

    def render(self) -> str:
        """The report as the terminal shows it."""
        width = max((len(i.name) for i in self.invariants), default=40)
        lines = [
            "",
            f"Chaos month: {self.orgs} orgs, seed {self.seed}, faults {self.faults}",
            "",
            "Invariants (each must be 0)",
        ]
        for invariant in self.invariants:
            mark = "ok  " if invariant.count == 0 else "FAIL"
            lines.append(f"  {mark} {invariant.name:<{width}}  {invariant.count}")
            lines.extend(f"         - {example}" for example in invariant.examples)
        lines += ["", "Figures"]
        lines += [f"  {name:<34} {value}" for name, value in self.figures.items()]
        if self.fault_counts:
            done = ", ".join(f"{k} x{v}" for k, v in sorted(self.fault_counts.items()))
            lines += ["", f"Faults injected: {done}"]
        if self.notes:
            lines += ["", "Details"]
            lines += [f"  {name:<34} {value}" for name, value in self.notes.items()]
        if self.unsettled:
            lines += ["", "Waits that ran out of time"]
            lines += [f"  - {line}" for line in self.unsettled]
        if self.histories:
            lines += ["", "Histories saved: " + ", ".join(self.histories)]
        if self.error:
            lines += ["", f"Run error: {self.error}"]
        lines += ["", "PASS: every invariant is 0" if self.ok else "FAIL", ""]
        return "\n".join(lines)
