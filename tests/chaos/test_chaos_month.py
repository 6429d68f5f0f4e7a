"""A short chaos month must leave every invariant at 0.

Runs `bench/chaos_month.py` as its own process, exactly as an operator would:
20 orgs (some AWS/Azure, some with failing cards, some named by dashboard
subscriptions and by another environment's look-alike customers) billed
through the trial and two months on a test clock, while the light fault plan
kills workers, restarts the API, stops the Temporal dev server and degrades
the Stripe emulator. Every process encrypts workflow payloads
(`BILLING_ENCRYPTION_KEYS`), so the month also shows that nothing of an org's is
in clear in a history and that the key still replays them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "chaos_month.py"
ORGS = 20
DEADLINE_SECONDS = 300
TIMEOUT_SECONDS = 480


def _tail(output: str, lines: int = 60) -> str:
    return "\n".join(output.splitlines()[-lines:])


@pytest.mark.chaos
@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_a_short_chaos_month_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    options = {
        "--orgs": ORGS,
        "--seed": 7,
        "--faults": "light",
        "--deadline": DEADLINE_SECONDS,
        "--step-timeout": 90,
        "--workdir": tmp_path / "run",
        "--json": report_path,
    }
    argv = [sys.executable, str(SCRIPT), "--encrypt"]
    for flag, value in options.items():
        argv += [flag, str(value)]
    with subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as run:
        try:
            output, _ = run.communicate(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            run.terminate()  # SIGTERM: the harness stops every process of its stack
            output, _ = run.communicate(timeout=60)
            pytest.fail(f"the chaos month ran over {TIMEOUT_SECONDS} s:\n{_tail(output)}")
    tail = _tail(output)
    assert report_path.exists(), f"the chaos month wrote no report:\n{tail}"
    report = json.loads(report_path.read_text())

    failing = {i["name"]: i for i in report["invariants"] if i["count"] != 0}
    assert not failing, f"invariants not at 0: {failing}\n{tail}"
    assert len(report["invariants"]) == 14
    assert report["invariants"][-1]["name"].startswith("workflow payloads in clear")
    # The dashboard subscriptions and look-alikes were there, and refused.
    notes = report["notes"]
    # The console's changes happened: a close, renames, new owners, a move to a
    # marketplace and back.
    assert notes["orgs closed"] == 1, notes
    assert notes["orgs renamed or with an owner renamed"] > 0, notes
    assert len(notes["orgs given another owner"]) == 2, notes
    assert len(notes["orgs moved back to Stripe before that period's end"]) == 1, notes
    assert notes["adoptions refused"] > 0, notes
    assert notes["events of another environment not routed"] > 0, notes
    assert report["error"] is None, f"{report['error']}\n{tail}"
    assert report["notes"]["billing periods invoiced"] == 2, tail
    # The faults really happened: each kind at least once.
    assert set(report["fault_counts"]) >= {
        "kill_worker",
        "restart_api",
        "temporal_outage",
        "stripe_errors",
        "webhook_chaos",
    }, report["fault_counts"]
    assert run.returncode == 0, tail
