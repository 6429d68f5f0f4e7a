"""`billing dev`: the whole stack on one machine, supervised by one process.

Order of start (and, reversed, of stop): embedded Postgres, migrations, the
Temporal dev server, the Stripe emulator, the Stripe catalog, then the worker and
the API. Children run in their own process groups (`tooling.supervise`), so a
Ctrl-C in the terminal reaches only this supervisor, which then stops them one by
one (terminate, wait, kill) and stops Postgres, which `pg_ctl` runs detached from us.

Once the stack is up, a child that exits on its own (the worker, the API, the
emulator, the Temporal dev server, Postgres) is started again after a short,
growing delay, and the console says so. The stack stops only on Ctrl-C (or
SIGTERM), or when one child keeps crashing.

Everything lives in the home folder: Postgres data, the Temporal SQLite file,
the emulator's state, logs, and `settings.env`, the settings chosen here that
every other `billing` command with the same home reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from billing.auth import MIN_SECRET_BYTES
from billing.config import Settings
from billing.problems import PROBLEM_ORGS_QUERY, RUNNING_ORGS_QUERY
from tooling.home import (
    DEFAULT_HOME,
    PID_FILE,
    read_settings_file,
    running_dev,
    settings_file,
    write_settings_file,
)
from tooling.supervise import (
    HOST,
    STOP_TIMEOUT,
    Child,
    ChildExited,
    EmbeddedPostgres,
    GaveUp,
    NotReady,
    Supervised,
    Supervisor,
    http_ok,
    log_tail,
    port_in_use,
    tcp_open,
    wait_until,
)

READY_TIMEOUT = 90.0
POLL = 0.1
SUPERVISE_EVERY = 0.25

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class DevError(Exception):
    """Startup cannot go on; the message says why in one sentence."""


class _StopRequested(KeyboardInterrupt):
    """Raised from the SIGINT/SIGTERM handler to unwind startup or the wait loop."""


@dataclass(frozen=True)
class DevPorts:
    api: int = 8000
    temporal: int = 7233
    ui: int = 8233
    emulator: int = 12111
    codec: int = 8888


@dataclass(frozen=True)
class DevOptions:
    home: Path = DEFAULT_HOME
    ports: DevPorts = field(default_factory=DevPorts)
    demo: bool = False
    ready_timeout: float = READY_TIMEOUT
    # Where a new home's test clock starts (epoch seconds); None: now.
    clock_start: int | None = None


# Signals ---------------------------------------------------------------------------


class _Signals:
    """SIGINT/SIGTERM stop the supervisor, but never in the middle of a spawn.

    Inside `critical()` a signal is only remembered; it takes effect when the
    block ends, so every child that was started is known to the cleanup.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def ignore(self) -> None:
        """During shutdown: a second Ctrl-C must not cut the cleanup short."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._depth == 0:
            raise _StopRequested(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.received is not None:
            raise _StopRequested(self.received)


# Children --------------------------------------------------------------------------


def billing_command(*args: str) -> list[str]:
    """Run `billing ...` with this interpreter, so children share our venv."""
    return [sys.executable, "-m", "tooling.cli", *args]


# Ports -----------------------------------------------------------------------------


def check_ports(wanted: Mapping[str, int]) -> None:
    seen: dict[int, str] = {}
    for label, port in wanted.items():
        if port in seen:
            raise DevError(f"{label} and {seen[port]} cannot both use port {port}.")
        seen[port] = label
        if port_in_use(port):
            raise DevError(
                f"Port {port} ({label}) is already in use; stop what uses it or choose "
                "another port."
            )


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or HOST, int(port)


# The supervisor --------------------------------------------------------------------


class DevStack:
    """Starts the stack in order and stops it in reverse, whatever happens in between."""

    def __init__(self, options: DevOptions, settings: Settings | None = None) -> None:
        self.options = options
        self.home = options.home
        self.logs = self.home / "logs"
        self.children: list[Child] = []
        self.postgres: EmbeddedPostgres | None = None
        self.signals = _Signals()
        self.supervisor = Supervisor(
            lambda line: err.print(line, soft_wrap=True), guard=self.signals.critical
        )
        # What the environment (and `.env`) says; the stack's own choices go on top.
        self.env_settings = settings or Settings()
        self.values: dict[str, str] = {}
        self.started_at = time.monotonic()
        self.ready_after: float | None = None
        self.clock_time = int(time.time())

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        code = 0
        new_home = not self.home.exists()
        try:
            self._lock_home()
            self.start()
            self._report()
            self.supervise()
        except _StopRequested:
            code = 0
        except DevError as error:
            err.print(f"[red]Error:[/red] {error}", markup=True, soft_wrap=True)
            code = 1
        except BaseException:
            code = 1
            raise
        finally:
            self.signals.ignore()
            self.stop()
            self._unlock_home()
            if new_home and code:
                # A start that failed early (a busy port) leaves no empty home behind.
                _remove_empty_folders(self.home)
            self.signals.restore()
        return code

    def start(self) -> None:
        ports = self.options.ports
        wanted = {"API, --api-port": ports.api, "Stripe emulator, --emulator-port": ports.emulator}
        if not os.environ.get("TEMPORAL_ADDRESS"):
            wanted["Temporal, --temporal-port"] = ports.temporal
            wanted["Temporal UI, --ui-port"] = ports.ui
        if self._encrypting:
            wanted["codec server, --codec-port"] = ports.codec
        check_ports(wanted)
        self.logs.mkdir(parents=True, exist_ok=True)
        previous = read_settings_file(self.home)

        # Servers that do not depend on each other start together.
        temporal_address = self._start_temporal()
        emulator_url = f"http://{HOST}:{ports.emulator}"
        self._spawn(
            "Stripe emulator",
            billing_command(
                "emulator",
                "serve",
                "--host",
                HOST,
                "--port",
                str(ports.emulator),
                "--state-file",
                str(self.home / "emulator.json"),
            ),
            log="stripe-emulator",
            ready=lambda: http_ok(f"{emulator_url}/_emulator/health"),
        )
        database_url = self._start_postgres()
        out.print("Applying database migrations…")
        _migrate(database_url)

        temporal_settings = self.env_settings.model_copy(
            update={"temporal_address": temporal_address}
        )
        self._wait_for(f"Temporal at {temporal_address}", lambda: _temporal_up(temporal_settings))
        self._wait_for(
            f"the Stripe emulator at {emulator_url}",
            lambda: http_ok(f"{emulator_url}/_emulator/health"),
        )
        self.values = self._stripe_setup(emulator_url, previous)
        self.values.update(
            {
                "DATABASE_URL": database_url,
                "TEMPORAL_ADDRESS": temporal_address,
                "TEMPORAL_NAMESPACE": self.env_settings.temporal_namespace,
                "TEMPORAL_TASK_QUEUE": self.env_settings.temporal_task_queue,
                "AUTH_JWT_SECRET": _jwt_secret(previous.get("AUTH_JWT_SECRET")),
                # Not settings of the product: where `curl` and a browser reach the stack
                # (`billing dev env` prints them with the rest).
                "BILLING_API_URL": f"http://{HOST}:{ports.api}",
                **({"TEMPORAL_UI_URL": self._ui_url} if self._ui_url else {}),
            }
        )
        self.values.update(self._codec_values())
        self.values = dict(sorted(self.values.items()))
        write_settings_file(self.home, self.values)
        self._start_codec_server()

        api_url = f"http://{HOST}:{ports.api}"
        self._spawn("worker", billing_command("worker"), log="worker")
        self._spawn(
            "API",
            billing_command("api", "--host", HOST, "--port", str(ports.api)),
            log="api",
            ready=lambda: http_ok(f"{api_url}/readyz"),
        )
        if self.options.demo:
            self._demo()
        self._wait_for(f"the API at {api_url}/readyz", lambda: http_ok(f"{api_url}/readyz"))
        self.ready_after = _seconds_since_process_start()

    def supervise(self) -> None:
        """Until Ctrl-C, restart what exits on its own; stop on a child that keeps crashing."""
        while True:
            try:
                self.supervisor.check()
            except GaveUp as error:
                raise DevError(
                    f"{error}; see {error.child.log_path}." + _tail_block(error.child)
                ) from None
            time.sleep(SUPERVISE_EVERY)

    def stop(self) -> None:
        if self.children or self.postgres is not None:
            err.print("Stopping the dev stack…")
        for child in reversed(self.children):
            if not child.stop(STOP_TIMEOUT):
                err.print(f"The {child.name} did not stop within {STOP_TIMEOUT:.0f} s; killed it.")
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    # -- pieces ----------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], *, log: str, ready: Callable[[], bool] | None = None
    ) -> Child:
        """Start a child logging to `logs/<log>.log`; `ready` says when a restart serves again."""
        log_path = self.logs / f"{log}.log"
        env = {**os.environ, **self.values, "BILLING_HOME": str(self.home)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        child = Child(name, argv, log_path, env=env)
        with self.signals.critical():
            child.start()
            self.children.append(child)
        self.supervisor.watch(child, ready)
        return child

    def _start_temporal(self) -> str:
        external = os.environ.get("TEMPORAL_ADDRESS")
        if external:
            return external
        from tooling.binaries import temporal_dev_server_argv

        ports = self.options.ports
        address = f"{HOST}:{ports.temporal}"
        argv = temporal_dev_server_argv(
            host=HOST,
            port=ports.temporal,
            ui_port=ports.ui,
            db_filename=self.home / "temporal.db",
            namespace=self.env_settings.temporal_namespace,
            log_level="warn",
        )
        if self._encrypting:
            argv += ["--ui-codec-endpoint", self._codec_endpoint]
        reach = self.env_settings.model_copy(update={"temporal_address": address})
        self._spawn("Temporal dev server", argv, log="temporal", ready=lambda: _temporal_up(reach))
        return address

    # -- payload encryption ------------------------------------------------------------

    @property
    def _encrypting(self) -> bool:
        keys = self.env_settings.billing_encryption_keys
        return keys is not None and bool(keys.get_secret_value().strip())

    @property
    def _codec_endpoint(self) -> str:
        """Where the UI and CLI send payloads to decode (the namespace is in the path)."""
        namespace = self.env_settings.temporal_namespace
        return f"http://{HOST}:{self.options.ports.codec}/{namespace}"

    def _codec_values(self) -> dict[str, str]:
        """Keys go to the home's settings, so commands in other terminals read the payloads."""
        keys = self.env_settings.billing_encryption_keys
        if keys is None or not self._encrypting:
            return {}
        ui = self.options.ports.ui
        return {
            "BILLING_ENCRYPTION_KEYS": keys.get_secret_value(),
            "BILLING_CODEC_CORS_ORIGINS": f"http://{HOST}:{ui},http://localhost:{ui}",
        }

    def _start_codec_server(self) -> None:
        if not self._encrypting:
            return
        port = self.options.ports.codec
        self._spawn(
            "codec server",
            billing_command("codec-server", "--host", HOST, "--port", str(port)),
            log="codec-server",
            ready=lambda: http_ok(f"http://{HOST}:{port}/healthz"),
        )
        self._wait_for(
            f"the codec server on port {port}", lambda: http_ok(f"http://{HOST}:{port}/healthz")
        )

    def _start_postgres(self) -> str:
        external = os.environ.get("DATABASE_URL")
        if external:
            return external.replace("postgresql://", "postgresql+psycopg://", 1)
        out.print("Starting embedded Postgres…")
        postgres = EmbeddedPostgres(
            self.home / "pgdata", self.logs / "postgres.log", name="embedded Postgres"
        )
        try:
            with self.signals.critical():
                self.postgres = postgres
                postgres.start()
        except (subprocess.SubprocessError, OSError, RuntimeError) as error:
            raise DevError(
                f"Embedded Postgres did not start ({type(error).__name__}); "
                f"see {postgres.log_path} and {postgres.server_log}."
            ) from None
        self.supervisor.watch(postgres)
        return postgres.url()

    def _wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Startup waits: one deadline for the whole start, and any child exiting fails it."""
        remaining = self.started_at + self.options.ready_timeout - time.monotonic()
        try:
            wait_until(check, what, timeout=remaining, watch=self.children, interval=POLL)
        except ChildExited as exited:
            child = exited.child
            raise DevError(
                f"The {child.name} {child.exit_status()} while waiting for {what}; "
                f"see {child.log_path}." + _tail_block(child)
            ) from None
        except NotReady:
            raise DevError(
                f"Gave up waiting for {what} after {self.options.ready_timeout:.0f} s."
            ) from None

    def _stripe_setup(self, emulator_url: str, previous: Mapping[str, str]) -> dict[str, str]:
        from billing.stripe_gateway import make_stripe_client
        from tooling.catalog import (
            ensure_catalog,
            ensure_test_clock,
            ensure_webhook_endpoint,
        )

        key = previous.get("STRIPE_SECRET_KEY") or f"sk_test_dev{secrets.token_hex(12)}"
        settings = self.env_settings
        client = make_stripe_client(
            key, api_base=emulator_url, max_network_retries=2, blocking=True
        )
        catalog = ensure_catalog(
            client, settings.stripe_users_dimension, settings.stripe_requests_dimension
        )
        webhook_url = f"http://{HOST}:{self.options.ports.api}/api/webhooks/stripe"
        endpoint = ensure_webhook_endpoint(
            client, webhook_url, previous.get("STRIPE_WEBHOOK_SECRET")
        )
        known_clock = previous.get("STRIPE_TEST_CLOCK")
        clock = ensure_test_clock(client, known_clock, self.options.clock_start)
        self.clock_time = client.v1.test_helpers.test_clocks.retrieve(clock).frozen_time
        if self.options.clock_start is not None and clock == known_clock:
            out.print(
                f"The test clock {clock} of this home is kept where it is "
                f"({_readable(self.clock_time)}); --clock-start applies to a new home."
            )
        return {
            "STRIPE_API_BASE": emulator_url,
            "STRIPE_SECRET_KEY": key,
            "STRIPE_WEBHOOK_SECRET": endpoint.secret,
            "STRIPE_PRICE_ID": catalog.base_price_id,
            "STRIPE_USERS_PRICE_ID": catalog.users_price_id,
            "STRIPE_REQUESTS_PRICE_ID": catalog.requests_price_id,
            "STRIPE_USERS_DIMENSION": settings.stripe_users_dimension,
            "STRIPE_REQUESTS_DIMENSION": settings.stripe_requests_dimension,
            "STRIPE_TEST_CLOCK": clock,
        }

    def _demo(self) -> None:
        created = create_demo_data(self.env_settings.model_copy(update=_as_fields(self.values)))
        if created:
            out.print(f"Demo data: created orgs {', '.join(created)}.")
        else:
            out.print("Demo data: already there.")

    # -- home lock ---------------------------------------------------------------------

    def _lock_home(self) -> None:
        """One supervisor per home: a second one would fight the first over its data."""
        self.home.mkdir(parents=True, exist_ok=True)
        other = running_dev(self.home)
        if other is not None and other != os.getpid():
            raise DevError(f"`billing dev` is already running for {self.home} (pid {other}).")
        (self.home / PID_FILE).write_text(str(os.getpid()))

    def _unlock_home(self) -> None:
        pid_file = self.home / PID_FILE
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text().strip()) == os.getpid():
                pid_file.unlink()

    # -- output ------------------------------------------------------------------------

    @property
    def _ui_url(self) -> str | None:
        """The Temporal UI of the dev server we start (none for an external Temporal)."""
        if os.environ.get("TEMPORAL_ADDRESS"):
            return None
        return f"http://{HOST}:{self.options.ports.ui}"

    def _report(self) -> None:
        ports = self.options.ports
        api = f"http://{HOST}:{ports.api}"
        temporal = self.values["TEMPORAL_ADDRESS"]
        home_flag = _home_flag(self.home)
        table = Table(title="billing dev is ready", title_justify="left", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("where", overflow="fold")
        table.add_row("API", f"{api}  (docs: {api}/docs)")
        table.add_row("Temporal UI", self._ui_url or "-")
        table.add_row("Temporal", temporal)
        table.add_row("Stripe emulator", self.values["STRIPE_API_BASE"])
        table.add_row("Database", self.values["DATABASE_URL"])
        if self._encrypting:
            table.add_row(
                "Codec server",
                f"{self._codec_endpoint}  (the UI decodes through it; CLI: temporal workflow "
                f"show --codec-endpoint {self._codec_endpoint} ...)",
            )
        else:
            table.add_row(
                "Encryption",
                'off. To encrypt payloads: BILLING_ENCRYPTION_KEYS="k1:$(openssl rand -base64 '
                '32)" billing dev  (the UI then decodes through a codec server on port '
                f"{self.options.ports.codec})",
            )
        table.add_row("Settings", f"{settings_file(self.home)}  (billing{home_flag} dev env)")
        table.add_row("Logs", str(self.logs))
        table.add_row(
            "Try",
            "\n".join(
                f"billing{home_flag} {command}"
                for command in try_commands(_existing_orgs(self.values["DATABASE_URL"]))
            ),
        )
        out.print(table)
        for what, link in self._ui_links():
            # Below the table, on one line: a folded URL cannot be clicked or copied.
            out.print(f"{what} in the Temporal UI: {link}", soft_wrap=True)
        if self.ready_after is not None:
            out.print(f"Ready in {self.ready_after:.1f} s. Press Ctrl-C to stop.")

    def _ui_links(self) -> list[tuple[str, str]]:
        """The UI's workflow list on the running orgs, and on those that need a person."""
        ui = self._ui_url
        if ui is None:
            return []
        namespace = self.env_settings.temporal_namespace
        return [
            ("Running org workflows", workflows_link(ui, namespace, RUNNING_ORGS_QUERY)),
            ("Orgs with a BillingProblem", workflows_link(ui, namespace, PROBLEM_ORGS_QUERY)),
        ]


def workflows_link(ui: str, namespace: str, query: str) -> str:
    """The Temporal UI's workflow list, already filtered by a visibility query."""
    return f"{ui}/namespaces/{quote(namespace, safe='')}/workflows?query={quote(query, safe='')}"


@dataclass(frozen=True)
class KnownOrg:
    id: int
    name: str
    owner_email: str | None


def try_commands(orgs: list[KnownOrg]) -> list[str]:
    """First steps to print: create an org on a new home; use the orgs a restarted one has."""
    advance = "emulator advance --to period-end"
    if not orgs:
        return [
            "orgs create --name Acme --owner-email ada@acme.test",
            "orgs list",
            "members add 1 --email grace@acme.test",
            "requests record 1 --count 100",
            "usage report 1",
            "token 1 --email ada@acme.test",
            advance,
        ]
    first = orgs[0]
    commands = ["orgs list", f"orgs show {first.id}"]
    if first.owner_email:
        commands.append(f"token {first.id} --email {first.owner_email}")
    commands += [f"requests record {first.id} --count 100", f"usage report {first.id}"]
    return [*commands, advance]


def _existing_orgs(database_url: str) -> list[KnownOrg]:
    """The orgs a restarted stack already has (none on a new home, or when unreadable)."""
    from billing.db import orgs
    from billing.db.session import make_engine, make_session_factory

    engine = make_engine(database_url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            return [KnownOrg(o.id, o.name, o.owner_email) for o in orgs.list_orgs(session)]
    except Exception:
        return []
    finally:
        engine.dispose()


def _readable(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _home_flag(home: Path) -> str:
    default = (Path.cwd() / DEFAULT_HOME).resolve()
    if home == default and not os.environ.get("BILLING_HOME"):
        return ""
    return f" --home {home}"


def _remove_empty_folders(home: Path) -> None:
    for folder in (home / "logs", home):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _tail_block(child: Supervised) -> str:
    tail = log_tail(child.log_path)
    return f"\n{tail}" if tail else ""


def _as_fields(values: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in values.items()}


# Readiness checks ------------------------------------------------------------------


def _jwt_secret(previous: str | None) -> str:
    """The home's token secret, kept across restarts so minted tokens stay valid;
    a new one when there is none or it is too short for the API to start with."""
    if previous and len(previous.encode()) >= MIN_SECRET_BYTES:
        return previous
    return secrets.token_urlsafe(48)


def _migrate(database_url: str) -> None:
    from sqlalchemy.exc import OperationalError

    from billing.db.migrate import upgrade

    try:
        upgrade(database_url)
    except OperationalError as error:
        raise DevError(f"The database is not reachable: {error.orig}".rstrip() + ".") from None


def _temporal_up(settings: Settings) -> bool:
    """The server answers; a configuration it refuses is an error at once, not a wait."""
    from billing.temporal_client import (
        TemporalConfigError,
        TemporalUnavailableError,
        connect_client,
    )

    host, port = _split_address(settings.temporal_address)
    if not tcp_open(port, host):
        return False

    async def probe() -> bool:
        try:
            await connect_client(settings, timeout=2)
        except TemporalConfigError as error:
            raise DevError(str(error)) from None
        except TemporalUnavailableError:
            return False
        return True

    return asyncio.run(probe())


# Demo data -------------------------------------------------------------------------

DEMO_ORGS: tuple[dict[str, Any], ...] = (
    {
        "name": "Acme Corp",
        "owner": ("ada@acme.test", "Ada", "Lovelace"),
        "members": ("grace@acme.test", "alan@acme.test"),
        "requests": 1200,
    },
    {
        "name": "Globex",
        "owner": ("hank@globex.test", "Hank", "Scorpio"),
        "members": ("homer@globex.test", "frank@globex.test", "mindy@globex.test"),
        "requests": 35000,
    },
    {
        "name": "Initech (AWS Marketplace)",
        "owner": ("bill@initech.test", "Bill", "Lumbergh"),
        "members": ("peter@initech.test",),
        "requests": 50,
        "aws_account_id": "123456789012",
    },
)


def create_demo_data(settings: Settings) -> list[str]:
    """A few orgs with members and requests; orgs that already exist are left alone."""
    from billing.db import orgs
    from billing.db.session import make_engine, make_session_factory

    engine = make_engine(settings.database_url, pool_size=1)
    created: list[tuple[int, str]] = []
    try:
        factory = make_session_factory(engine)
        with factory() as session, session.begin():
            for spec in DEMO_ORGS:
                if orgs.find_org_by_name(session, spec["name"]):
                    continue
                email, first, last = spec["owner"]
                org = orgs.create_org_with_owner(
                    session,
                    name=spec["name"],
                    owner_email=email,
                    owner_first_name=first,
                    owner_last_name=last,
                    aws_account_id=spec.get("aws_account_id"),
                )
                for member in spec["members"]:
                    orgs.add_member(session, org.id, member)
                orgs.record_requests(session, org.id, spec["requests"])
                created.append((org.id, org.name))
    finally:
        engine.dispose()
    if created:
        asyncio.run(_start_workflows(settings, [org_id for org_id, _ in created]))
    return [f"{org_id} ({name})" for org_id, name in created]


async def _start_workflows(settings: Settings, org_ids: list[int]) -> None:
    from billing.orchestration import start_provisioning
    from billing.temporal_client import connect_client

    client = await connect_client(settings)
    for org_id in org_ids:
        await start_provisioning(client, settings, org_id)


def _seconds_since_process_start() -> float:
    """Startup as the user sees it: from the `billing dev` process starting, imports included."""
    created: float = psutil.Process(os.getpid()).create_time()
    return time.time() - created


def run_dev(options: DevOptions, settings: Settings | None = None) -> int:
    """Run the stack until Ctrl-C or SIGTERM; the exit code says whether it went well."""
    return DevStack(options, settings).run()
