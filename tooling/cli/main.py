"""The `billing` command: one entry point for operators and developers.

The root callback resolves the home folder (`--home` / `BILLING_HOME`) and,
lazily, the settings: environment first, then the home's `settings.env` written
by `billing dev`, then `.env`. Every command reads them from there, so there is
one place that decides which stack a command talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from billing.auth import AuthConfigError, check_settings
from billing.config import StripeNotConfiguredError
from tooling.cli import adopt, emulator, members, operations, orgs, request_log
from tooling.cli.context import (
    BillingGroup,
    CliError,
    CliState,
    fail,
    out,
    safe_url,
    state_of,
)
from tooling.home import DEFAULT_HOME, HOME_ENV_VAR, SETTINGS_FILE, read_settings_file

app = typer.Typer(
    cls=BillingGroup,
    name="billing",
    help="Org billing on Temporal and Stripe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(orgs.app, name="orgs")
app.add_typer(members.app, name="members")
app.add_typer(request_log.app, name="requests")
app.add_typer(emulator.app, name="emulator")

usage_app = typer.Typer(help="Usage reporting.", no_args_is_help=True)
usage_app.command("report")(operations.usage_report)
app.add_typer(usage_app, name="usage")

app.command("provision")(operations.provision)
app.command("backfill")(operations.backfill)
app.command("adopt")(adopt.adopt)
app.command("reconcile")(operations.reconcile)
app.command("token")(operations.token)

HomeOption = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar=HOME_ENV_VAR,
        help="Folder of the `billing dev` stack whose settings to use.",
        show_default=True,
    ),
]


@app.callback()
def root(ctx: typer.Context, home: HomeOption = DEFAULT_HOME) -> None:
    """Org billing on Temporal and Stripe."""
    # `billing dev` chooses the settings itself; it must not read what it wrote last time.
    ctx.obj = CliState(home=home.resolve(), load_home_settings=ctx.invoked_subcommand != "dev")
    ctx.call_on_close(ctx.obj.close)


@app.command("migrate")
def migrate(ctx: typer.Context) -> None:
    """Apply database migrations (Alembic) up to the newest."""
    from sqlalchemy.exc import OperationalError

    from billing.db.migrate import upgrade

    state = state_of(ctx)
    if state.database_is_default():
        fail(
            f"{state.no_home_sentence()}; `billing migrate` changes only a database you name: "
            f"{state.how_to_name()}."
        )
    settings = state.settings
    try:
        upgrade(settings.database_url)
    except OperationalError as error:
        raise CliError(
            f"The database at {safe_url(settings.database_url)} is not reachable."
        ) from error
    out.print(f"Database at {safe_url(settings.database_url)} is up to date.")


@app.command("api")
def api(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="API processes sharing the port (uvicorn workers); about one per core.",
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the HTTP API (webhooks, portal, status, health) in this process (or N workers)."""
    from billing.config import get_settings

    settings = state_of(ctx).settings
    try:
        settings.require_stripe()
        check_settings(settings)
    except (StripeNotConfiguredError, AuthConfigError) as error:
        raise CliError(str(error)) from None
    # Each process serving the app (this one, or every worker uvicorn spawns) builds
    # it from the environment: put the settings resolved here (home folder, .env) there.
    os.environ.update(settings.environment())
    get_settings.cache_clear()
    with _shared_metrics(workers):
        _serve_api(host, port, workers, log_level)


@contextlib.contextmanager
def _shared_metrics(workers: int) -> Iterator[None]:
    """Several workers: a folder where they share their metrics (unless one is set)."""
    from api.metrics import MULTIPROCESS_DIR_VARIABLE

    if workers == 1 or os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="billing-api-metrics-") as folder:
        os.environ[MULTIPROCESS_DIR_VARIABLE] = folder
        try:
            yield
        finally:
            del os.environ[MULTIPROCESS_DIR_VARIABLE]


def _serve_api(host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    from api.server import HeaderTimeoutProtocol
    from billing.logging import logging_config

    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=HeaderTimeoutProtocol,
        # Applied in every process, workers included: one JSON line per record.
        log_config=logging_config(log_level.upper()),
        log_level=log_level.lower(),
        # The app logs one JSON line per request itself (with its route template).
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@app.command("worker")
def worker(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the Temporal worker (workflows and activities) in this process."""
    from billing.logging import configure_logging
    from worker import run_until_signalled

    settings = state_of(ctx).settings
    try:
        settings.require_stripe()
    except StripeNotConfiguredError as error:
        raise CliError(str(error)) from None
    configure_logging(log_level.upper())

    asyncio.run(run_until_signalled(settings))


@app.command("codec-server")
def codec_server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8888,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Decrypt and encrypt payloads for the Temporal UI and CLI (BILLING_ENCRYPTION_KEYS)."""
    import uvicorn

    from billing.logging import configure_logging
    from tooling.codec_server import CodecServerError, check_startup, create_codec_app

    settings = state_of(ctx).settings
    try:
        codec = check_startup(settings, host)
    except CodecServerError as error:
        raise CliError(str(error)) from None
    configure_logging(log_level.upper())
    namespace = settings.temporal_namespace
    out.print(
        f"Codec server for keys {', '.join(codec.key_ids)} on http://{host}:{port}; "
        f"point the UI or CLI at http://{host}:{port}/{namespace}."
    )
    uvicorn.run(
        create_codec_app(settings, codec),
        host=host,
        port=port,
        log_config=None,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=5,
    )


dev_app = typer.Typer(
    help="The whole stack on this machine; Ctrl-C stops every part of it.",
    invoke_without_command=True,
    subcommand_metavar="[env]",
)
app.add_typer(dev_app, name="dev")

DevHomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Folder for all data (default: the global --home)."),
]


@dev_app.callback()
def dev(
    ctx: typer.Context,
    api_port: Annotated[int, typer.Option("--api-port")] = 8000,
    temporal_port: Annotated[int, typer.Option("--temporal-port")] = 7233,
    ui_port: Annotated[int, typer.Option("--ui-port")] = 8233,
    emulator_port: Annotated[int, typer.Option("--emulator-port")] = 12111,
    codec_port: Annotated[
        int,
        typer.Option("--codec-port", help="The codec server's port, when encryption keys are set."),
    ] = 8888,
    home: DevHomeOption = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Create a few orgs with members and requests.")
    ] = False,
    clock_start: Annotated[
        str | None,
        typer.Option(
            "--clock-start",
            help="Where a new home's Stripe test clock starts (ISO 8601; default now).",
        ),
    ] = None,
) -> None:
    """The whole stack on this machine; Ctrl-C stops every part of it.

    `billing dev env` prints the settings of the stack of this home as `export`
    lines, for `temporal`, `curl` or a shell.
    """
    if home is not None:
        state_of(ctx).home = home.resolve()
    if ctx.invoked_subcommand is not None:
        return
    from tooling.cli.request_log import parse_time
    from tooling.devstack import DevOptions, DevPorts, run_dev

    start = int(parse_time(clock_start).timestamp()) if clock_start is not None else None
    options = DevOptions(
        home=state_of(ctx).home,
        ports=DevPorts(
            api=api_port,
            temporal=temporal_port,
            ui=ui_port,
            emulator=emulator_port,
            codec=codec_port,
        ),
        demo=demo,
        clock_start=start,
    )
    code = run_dev(options, state_of(ctx).settings)
    if code:
        raise typer.Exit(code)


@dev_app.command("env")
def dev_env(ctx: typer.Context) -> None:
    """Print the stack's settings as `export VAR=...` lines: eval "$(billing dev env)"."""
    home = state_of(ctx).home
    values = read_settings_file(home)
    if not values:
        fail(
            f"No `billing dev` home at {home} (it has no {SETTINGS_FILE}); run this where "
            "`billing dev` runs, or pass --home DIR or BILLING_HOME."
        )
    typer.echo(f"# The settings of `billing dev` in {home}")
    for key, value in values.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


def main() -> None:
    """Console entry point: run the app, then leave without interpreter teardown.

    The Temporal client's native threads can abort a normal interpreter shutdown
    ("PyGILState_Release ... finalizing", temporalio/sdk-python#300) and turn a
    successful command into exit code -6; every command has finished its work
    and closed what it opened by the time it returns here.
    """
    code: int = 0
    try:
        app()
    except SystemExit as done:
        if isinstance(done.code, int):
            code = done.code
        elif done.code is not None:
            print(done.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
