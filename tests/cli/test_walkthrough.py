"""docs/walkthrough.md run as written, from a fresh `billing dev` home.

Every `$ ` line of the page's code blocks runs in bash, in order, as a reader
in the second terminal would run it (variables carry over from one line to the
next). The test clock starts on an arbitrary date far from today, at the end of
a month, so a page that depends on the day it was written, or on the default
ports, fails here. The checks below are what the page says each step shows;
read-only steps are retried for a while, as a reader would look again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.test_devstack import DevProcess, _clean_env, _free_ports, dev_home  # noqa: F401

pytestmark = [pytest.mark.devstack, pytest.mark.timeout(240)]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"
# Not the day the walkthrough's sample output was taken on (2031-01-30): a
# year's last day, late in the evening, so the trial ends in another year and
# the first paid period ends on a month's shortened last day (February 28th).
CLOCK_START = "2029-12-31T23:40:00Z"
VENV_BIN = str(Path(sys.executable).parent)


def page_commands(text: str) -> list[str]:
    """The `$ ` lines of the page's fenced blocks, with `\\` continuations joined."""
    commands: list[str] = []
    in_block = False
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if current is not None:
            current.append(line)
        elif line.startswith("$ "):
            current = [line[2:]]
        else:
            continue
        if not line.rstrip().endswith("\\"):
            commands.append("\n".join(current))
            current = None
    return commands


@dataclass
class Ran:
    command: str
    code: int
    stdout: str
    stderr: str


Check = Callable[[Ran], bool]


@dataclass
class Expect:
    """What the page says a step shows; `retry` seconds for steps that only read."""

    pattern: str
    check: Check
    retry: float = 0.0


def _has(*fragments: str) -> Check:
    return lambda ran: all(fragment in ran.stdout for fragment in fragments)


def _row(*cells: str) -> Check:
    """A table row with these cells side by side (a cell may start with the first)."""
    wanted = r"\s*[│┃]\s*".join(re.escape(cell) for cell in cells)
    return lambda ran: re.search(wanted, ran.stdout) is not None


def _all(*checks: Check) -> Check:
    return lambda ran: all(check(ran) for check in checks)


EXPECTED = [
    Expect(r"^billing orgs create --name Acme ", _has("Created org 1 (Acme)")),
    Expect(r"^billing orgs create --name Globex ", _has("Created org 2 (Globex)")),
    Expect(r"^temporal workflow list ", _has("org-billing-1", "org-billing-2"), retry=45),
    Expect(r"^billing orgs show 1$", _row("status", "trialing"), retry=30),
    Expect(r"^billing emulator card 1 --working", _has("now pays with a working card")),
    Expect(r"^billing emulator card 2 --failing", _has("now pays with a failing card")),
    Expect(
        r"^billing emulator advance --to period-end$",
        # The clock started on CLOCK_START: the 30-day trial ends on January 30th.
        _has("Crossed the trial end of orgs 1, 2 (2030-01-30 23:40 UTC)", "invoices are finalized"),
    ),
    Expect(
        r"^billing orgs list$",
        _all(_row("1 Acme", "active"), _row("2 Globex", "past_due")),
        retry=30,
    ),
    Expect(r"^billing requests record 1 --count 250$", _has("250 in total")),
    Expect(r"^billing usage report 1$", _all(_row("3", "250", "2"), _has("Meter events sent: 2."))),
    Expect(r"^billing emulator advance --by ", _has("Crossed no period or trial end")),
    Expect(r"^billing usage report 1$", _all(_row("3", "300"), _has("Meter events sent: 1."))),
    Expect(r"^billing emulator advance --to period-end", _has("Crossed the period end of org")),
    Expect(
        r"^billing orgs show 1$",
        _all(
            _has("Last ended period"),
            _row("users", "3"),
            _row("requests", "320"),
            _row("invoice", "in_"),
            _has("$67.20  paid"),
        ),
        retry=30,
    ),
    Expect(
        r"^curl .*/v1/invoices",
        _has('"status": "paid"', '"billing_reason": "subscription_cycle"', '"quantity": 320,'),
    ),
    Expect(r"^curl -s -X POST .*/portal", _has('{"url":"http://127.0.0.1:')),
    Expect(r"^curl .*/api/orgs/1/billing", _has('"status": "active"', '"source": "workflow"')),
]


class Terminal:
    """The reader's second terminal: one bash per line, variables kept between lines."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.saved = workdir / "walkthrough.env"

    def run(self, command: str) -> Ran:
        script = f"set -a -o pipefail\n{command}\nstatus=$?\nenv -0 > {self.saved}\nexit $status\n"
        done = subprocess.run(
            ["bash", "-c", script],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=150,
        )
        if self.saved.exists():
            pairs = self.saved.read_text().split("\0")
            self.env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        return Ran(command, done.returncode, done.stdout, done.stderr)


def test_the_walkthrough_runs_as_written_on_any_day(dev_home: Path) -> None:  # noqa: F811
    commands = page_commands(PAGE.read_text())
    reader = [c for c in commands if not re.fullmatch(r"billing dev( .*)?", c) or "dev env" in c]
    assert len(reader) > 20, commands

    env = _clean_env(dev_home)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    dev = DevProcess(dev_home, _free_ports(4), env, "--clock-start", CLOCK_START)
    transcript: list[str] = []
    pending = list(EXPECTED)
    try:
        dev.wait_ready(timeout=60)
        terminal = Terminal(env, dev_home.parent)
        started = time.monotonic()
        for command in reader:
            expect = pending[0] if pending and re.search(pending[0].pattern, command) else None
            began = time.monotonic()
            deadline = began + (expect.retry if expect else 0)
            while True:
                ran = terminal.run(command)
                ok = ran.code == 0 and (expect is None or expect.check(ran))
                if ok or time.monotonic() >= deadline:
                    break
                time.sleep(1)
            took = time.monotonic() - began
            transcript.append(f"$ {command}    [{took:.1f} s]\n{ran.stdout}{ran.stderr}")
            assert ran.code == 0, "\n".join(transcript)
            if expect is not None:
                assert expect.check(ran), f"{expect.pattern} not shown:\n" + "\n".join(transcript)
                pending.pop(0)
        print(f"walkthrough ran in {time.monotonic() - started:.1f} s")
    finally:
        code = dev.interrupt()
        print("\n".join(transcript))
    assert code == 0, dev.output.read_text()
    assert [e.pattern for e in pending] == [], "steps the page no longer has"
    assert "no final usage report" not in "\n".join(transcript)
