"""What every command shares: the settings, the database, Temporal, Stripe, output.

The CLI is a composition root: it is one of the places that builds the engine,
the Temporal client and the Stripe client, and it does so here, once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import stripe
import typer
from dotenv import dotenv_values
from psycopg.errors import UndefinedTable
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from typer.core import TyperGroup, TyperOption

from billing.config import Settings
from billing.db.orgs import ServiceError
from billing.db.session import make_engine, make_session_factory
from billing.encryption import PayloadDecryptionError
from billing.stripe_gateway import make_stripe_client
from billing.temporal_client import TemporalUnavailableError, connect_client
from tooling.cli.text import safe
from tooling.home import running_dev, settings_file

T = TypeVar("T")

# No markup on stdout: what is printed there is data (names, ids), never styling.
out = Console(highlight=False, soft_wrap=False, markup=False, emoji=False)
err = Console(stderr=True, highlight=False)

TEMPORAL_CONNECT_TIMEOUT = 5.0


def _hide_flag_types() -> None:
    """Help pages list `--json`, `--help` and every other flag without a `<bool>` value.

    Typer's rich help prints a type after each option, flags included, although a
    flag takes no value (its plain-text help already leaves it out). The check is
    tests/cli/test_help_pages.py.
    """
    shown = TyperOption.display_type_rich
    if getattr(shown, "hides_flag_types", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        return shown(self, ctx)

    display_type_rich.hides_flag_types = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()


class CliError(Exception):
    """An expected failure: the message is printed on stderr, without a traceback."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {escape(safe(message))}", markup=True, highlight=False)


def _stripe_message(error: stripe.StripeError) -> str:
    if isinstance(error, stripe.APIConnectionError):
        return "Stripe is not reachable (is the emulator running?)."
    text = error.user_message or str(error) or type(error).__name__
    return f"Stripe refused the request: {text.rstrip('.')}."


def _expected_error_message(error: BaseException, state: CliState | None = None) -> str | None:
    """One sentence for errors a user can cause or fix; None means a bug (keep the traceback)."""
    if isinstance(
        error, CliError | ServiceError | TemporalUnavailableError | PayloadDecryptionError
    ):
        return str(error)
    if isinstance(error, OperationalError):
        if state is not None and state.database_is_default():
            return (
                f"The default database {state.default_database()} is not reachable; "
                f"{state.how_to_name()}."
            )
        if state is not None and running_dev(state.home) is not None:
            return (
                f"The database is not reachable; `billing dev` runs for {state.home} and starts "
                "its Postgres again by itself, so try again in a few seconds."
            )
        return "The database is not reachable (check DATABASE_URL, or start `billing dev`)."
    if isinstance(error, ProgrammingError) and isinstance(error.orig, UndefinedTable):
        if state is not None and state.database_is_default():
            # Not a database the user named: never suggest migrating it.
            return (
                f"The default database {state.default_database()} has no billing tables, so "
                f"it is not this product's database; {state.how_to_name()}."
            )
        return "The database has no billing tables yet; run `billing migrate`."
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return "The database connection was lost."
    if isinstance(error, stripe.StripeError):
        return _stripe_message(error)
    return None


class BillingGroup(TyperGroup):
    """Turns expected errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:
            obj = ctx.obj if isinstance(ctx.obj, CliState) else None
            message = _expected_error_message(error, obj)
            if message is None:
                raise
            err.print(
                f"[red]Error:[/red] {escape(safe(message))}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None


@dataclass
class CliState:
    """Built once by the root callback; every command reads it from `ctx.obj`."""

    home: Path
    load_home_settings: bool = True
    _settings: Settings | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = build_settings(self.home if self.load_home_settings else None)
            if self.load_home_settings and self.database_is_default():
                temporal = self._settings.temporal_address
                note(f"{self.no_home_sentence()} and Temporal at {temporal}.")
        return self._settings

    def origin(self, variable: str) -> str | None:
        """Where a setting comes from: the environment, `.env`, the home; None: the default."""
        if any(key.upper() == variable for key in os.environ):
            return "the environment"
        if variable in _file_keys(Path(".env")):
            return str(Path(".env").resolve())
        if self.load_home_settings and variable in _file_keys(settings_file(self.home)):
            return str(settings_file(self.home))
        return None

    def database_is_default(self) -> bool:
        """No one named a database: no home here, no DATABASE_URL in the environment or `.env`."""
        return self.origin("DATABASE_URL") is None

    def default_database(self) -> str:
        return safe_url(str(Settings.model_fields["database_url"].default))

    def no_home_sentence(self) -> str:
        return (
            f"No `billing dev` home at {self.home} (no {settings_file(self.home).name} there) and "
            f"no DATABASE_URL, so this command uses the default database {self.default_database()}"
        )

    def how_to_name(self) -> str:
        return (
            "run it in the folder where `billing dev` runs, pass --home DIR (or BILLING_HOME), "
            "or set DATABASE_URL"
        )

    def session_factory(self) -> sessionmaker[Session]:
        """Sessions on the command's engine, for work that opens several transactions."""
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url, pool_size=2)
        return make_session_factory(self._engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on error."""
        with self.session_factory()() as session, session.begin():
            yield session

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    async def temporal(self) -> Client:
        return await connect(self.settings)

    def stripe_client(self) -> stripe.StripeClient:
        settings = self.settings
        if not settings.stripe_secret_key:
            fail("STRIPE_SECRET_KEY is not set; start `billing dev` or set it in the environment.")
        return make_stripe_client(
            settings.stripe_secret_key,
            api_base=settings.stripe_api_base,
            max_network_retries=2,
            blocking=True,
        )


def _file_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {key.upper() for key in dotenv_values(path)}


def note(message: str) -> None:
    """Context for the user on stderr (stdout stays data)."""
    err.print(f"Note: {escape(safe(message))}", highlight=False, soft_wrap=True)


def build_settings(home: Path | None) -> Settings:
    """Environment first, then the dev home's `settings.env`, then `.env`."""
    env_files: list[Path] = [Path(".env")]
    if home is not None and settings_file(home).is_file():
        env_files.append(settings_file(home))
    try:
        return Settings(_env_file=tuple(env_files))
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "a setting"
        raise CliError(f"{name} is invalid: {first['msg']}.") from None


def state_of(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):
        raise RuntimeError("the root callback did not run")
    return obj


async def connect(settings: Settings) -> Client:
    """Connect with a bound; the error says where we tried and what to fix."""
    return await connect_client(settings, timeout=TEMPORAL_CONNECT_TIMEOUT)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def print_json(document: Any) -> None:
    """Exactly one JSON document on stdout, so `--json` output can be piped."""
    typer.echo(json.dumps(to_jsonable_python(document), indent=2, sort_keys=False))


def safe_url(url: str) -> str:
    """A database URL fit to print: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
