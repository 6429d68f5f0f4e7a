"""`tooling.supervise`: children with logs, readiness waits, polite stops, restarts with backoff.

The children are real processes (`sh`, `sleep`); the supervisor's clock is a
fake one, so backoff delays are checked without waiting for them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from billing.search_attributes import SEARCH_ATTRIBUTES
from tooling.binaries import temporal_dev_server_argv
from tooling.supervise import (
    Backoff,
    Child,
    ChildExited,
    GaveUp,
    NotReady,
    Supervisor,
    describe_exit,
    wait_until,
)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[Child]]:
    """Children a test starts; whatever is left is killed afterwards."""
    made: list[Child] = []
    yield made
    for child in made:
        child.kill()


def _child(children: list[Child], tmp_path: Path, name: str, script: str) -> Child:
    child = Child(name, ["sh", "-c", script], tmp_path / f"{name}.log")
    children.append(child)
    return child


def _gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Backoff --------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_longest_delay_then_gives_up() -> None:
    backoff = Backoff(first=0.5, factor=2, longest=3, restarts=5, window=60)
    crashes: list[float] = []
    delays = []
    for at in range(6):
        crashes.append(float(at))
        delays.append(backoff.delay(crashes, float(at)))

    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, None]


def test_backoff_forgets_crashes_older_than_its_window() -> None:
    backoff = Backoff(first=1, factor=2, longest=30, restarts=2, window=10)

    assert backoff.delay([0.0, 5.0], 5.0) == 2.0
    assert backoff.delay([0.0, 5.0, 9.0], 9.0) is None
    # Two crashes long ago count for nothing: the next one is a first crash.
    assert backoff.delay([0.0, 5.0, 30.0], 30.0) == 1.0


# Children -------------------------------------------------------------------------------


def test_a_child_logs_each_start_and_stops_politely(children: list[Child], tmp_path: Path) -> None:
    # The output differs from the command line, which the log's start lines quote.
    child = _child(children, tmp_path, "echo", "echo up-$((40 + 2)); exec sleep 30")
    child.start()
    wait_until(lambda: "up-42" in child.log_path.read_text(), "the output", timeout=10)
    first = child.pid
    assert child.alive() and child.exit_status() == "is running"

    assert child.stop(timeout=5) is True
    assert not child.alive()
    assert child.exit_status() == "was killed by SIGTERM"

    child.start()
    assert child.pid != first and child.starts == 2
    wait_until(lambda: child.log_path.read_text().count("up-42") == 2, "output", timeout=10)
    child.stop()
    log = child.log_path.read_text()
    assert "start 1: sh -c" in log and "start 2: sh -c" in log


def test_a_child_that_ignores_sigterm_is_killed_with_what_it_started(
    children: list[Child], tmp_path: Path
) -> None:
    child = _child(
        children, tmp_path, "stubborn", "trap '' TERM; sleep 30 & echo $! > grandchild; wait"
    )
    child.cwd = tmp_path
    child.start()
    pid_file = tmp_path / "grandchild"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "it", timeout=10)
    grandchild = int(pid_file.read_text())

    assert child.stop(timeout=0.5) is False
    assert not child.alive()
    assert _gone(grandchild)


def test_kill_is_sigkill(children: list[Child], tmp_path: Path) -> None:
    child = _child(children, tmp_path, "victim", "exec sleep 30")
    child.start()
    child.kill()

    assert child.exit_code() == -signal.SIGKILL
    assert child.exit_status() == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_a_wait_fails_at_once_when_a_watched_child_exits(
    children: list[Child], tmp_path: Path
) -> None:
    child = _child(children, tmp_path, "quitter", "sleep 0.2; exit 3")
    child.start()
    began = time.monotonic()

    with pytest.raises(ChildExited, match="the quitter exited with code 3 while waiting for x"):
        wait_until(lambda: False, "x", timeout=30, watch=[child])
    assert time.monotonic() - began < 10


def test_a_wait_gives_up_after_its_timeout() -> None:
    with pytest.raises(NotReady, match="gave up waiting for nothing after 0 s"):
        wait_until(lambda: False, "nothing", timeout=0.2)


# Supervisor -----------------------------------------------------------------------------


def test_a_crashed_child_is_restarted_after_its_delay_and_reported_back(
    children: list[Child], tmp_path: Path
) -> None:
    child = _child(children, tmp_path, "server", "exec sleep 30")
    child.start()
    said: list[str] = []
    clock = FakeClock()
    ready = {"now": False}
    supervisor = Supervisor(said.append, clock=clock)
    supervisor.watch(child, ready=lambda: ready["now"])
    supervisor.check()
    assert said == []

    first = child.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: child.exit_code() is not None, "the kill", timeout=5)
    supervisor.check()
    assert said == ["The server was killed by SIGKILL; restarting it in 0.5 s."]

    clock.now += 0.4
    supervisor.check()
    assert not child.alive()

    clock.now += 0.1
    supervisor.check()
    assert child.alive() and child.pid != first
    assert said[-1].startswith("The server was killed")  # not back until it is ready

    ready["now"] = True
    supervisor.check()
    assert said[-1] == "The server is back."
    assert supervisor.restarts(child) == 1


def test_a_child_that_keeps_crashing_makes_the_supervisor_give_up(
    children: list[Child], tmp_path: Path
) -> None:
    child = _child(children, tmp_path, "crasher", "exit 3")
    child.start()
    said: list[str] = []
    clock = FakeClock()
    supervisor = Supervisor(
        said.append, backoff=Backoff(first=1, factor=2, restarts=2, window=60), clock=clock
    )
    supervisor.watch(child)

    with pytest.raises(GaveUp) as gave_up:
        for _ in range(100):
            wait_until(lambda: not child.alive(), "the crash", timeout=5)
            supervisor.check()
            clock.now += 1

    assert str(gave_up.value) == (
        "The crasher exited with code 3; it crashed 3 times within 60 s, so it is not started again"
    )
    assert gave_up.value.child is child
    assert [line for line in said if "restarting" in line] == [
        "The crasher exited with code 3; restarting it in 1.0 s.",
        "The crasher exited with code 3; restarting it in 2.0 s.",
    ]
    assert child.starts == 3


class _Unstartable:
    """A child whose restarts fail: `start` raises, as Postgres does when it cannot start."""

    name = "database"
    log_path = Path("/nonexistent.log")

    def __init__(self) -> None:
        self.attempts = 0

    def alive(self) -> bool:
        return False

    def exit_status(self) -> str:
        return "stopped"

    def start(self) -> None:
        self.attempts += 1
        raise RuntimeError("no")


def test_a_start_that_fails_counts_as_one_more_crash() -> None:
    said: list[str] = []
    clock = FakeClock()
    child = _Unstartable()
    supervisor = Supervisor(said.append, backoff=Backoff(first=1, restarts=3), clock=clock)
    supervisor.watch(child)

    supervisor.check()
    clock.now += 1
    supervisor.check()

    assert child.attempts == 1
    assert said == [
        "The database stopped; restarting it in 1.0 s.",
        "The database did not start again (RuntimeError); restarting it in 2.0 s.",
    ]


# The dev server's command line --------------------------------------------------------------


def test_the_dev_server_registers_every_search_attribute() -> None:
    argv = temporal_dev_server_argv(port=7233, ui_port=8233, db_filename=Path("/x/t.db"))
    pairs = {argv[i + 1] for i, arg in enumerate(argv) if arg == "--search-attribute"}

    assert pairs == {f"{name}=Keyword" for name in SEARCH_ATTRIBUTES}
    assert argv[1:3] == ["server", "start-dev"]
    assert argv[argv.index("--ui-port") + 1] == "8233"
    assert argv[argv.index("--db-filename") + 1] == "/x/t.db"
    assert "--headless" not in argv


def test_the_dev_server_without_ui_or_file_is_headless_and_in_memory() -> None:
    argv = temporal_dev_server_argv(port=7233, namespace="bench", log_level="error")

    assert "--headless" in argv and "--ui-port" not in argv
    assert "--db-filename" not in argv
    assert argv[argv.index("--namespace") + 1] == "bench"
    assert argv[argv.index("--log-level") + 1] == "error"
