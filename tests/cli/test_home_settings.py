"""Which stack a command talks to: said plainly when no home is found; `billing dev env`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.cli.conftest import Invoke, assert_clean_error
from tooling.home import write_settings_file

NOTHING_NAMED = {"DATABASE_URL": None}


def test_outside_a_home_a_command_says_which_settings_it_uses(
    invoke: Invoke, cli_home: Path
) -> None:
    """The default database may be anyone's: never advise migrating it."""
    result = invoke("orgs", "list", env=NOTHING_NAMED)

    assert f"No `billing dev` home at {cli_home} (no settings.env there)" in result.stderr
    assert "default database postgresql+psycopg://postgres@127.0.0.1:5432/postgres" in (
        result.stderr
    )
    assert "billing migrate" not in result.stderr
    assert "Traceback" not in result.output
    if result.exit_code:
        assert "run it in the folder where `billing dev` runs" in result.stderr


def test_outside_a_home_migrate_refuses_the_default_database(
    invoke: Invoke, cli_home: Path
) -> None:
    result = invoke("migrate", env=NOTHING_NAMED)

    assert_clean_error(result, f"No `billing dev` home at {cli_home}", "changes only a database")


def test_a_home_names_the_database_so_nothing_is_said(
    invoke: Invoke, cli_home: Path, database_url: str
) -> None:
    write_settings_file(cli_home, {"DATABASE_URL": database_url})

    result = invoke("orgs", "list", "--json", env=NOTHING_NAMED)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert "Note:" not in result.stderr


def test_dev_env_prints_export_lines_a_shell_reads_back(invoke: Invoke, cli_home: Path) -> None:
    values = {
        "TEMPORAL_ADDRESS": "127.0.0.1:17233",
        "DATABASE_URL": "postgresql+psycopg://postgres:@/postgres?host=/tmp/a b/pgdata",
        "STRIPE_SECRET_KEY": "sk_test_it's$HOME",
    }
    write_settings_file(cli_home, values)

    result = invoke("dev", "env")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"# The settings of `billing dev` in {cli_home}"
    assert all(line.startswith("export ") for line in lines[1:]), lines
    echo = 'printf "%s\\n" "$TEMPORAL_ADDRESS" "$DATABASE_URL" "$STRIPE_SECRET_KEY"'
    script = result.stdout + echo
    echoed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert echoed.stdout.splitlines() == list(values.values())


def test_dev_env_without_a_home_is_a_clear_error(invoke: Invoke, cli_home: Path) -> None:
    assert_clean_error(invoke("dev", "env"), f"No `billing dev` home at {cli_home}")
