"""`billing migrate`, `billing api` and `billing worker`: what they say before they run."""

from __future__ import annotations

from tests.cli.conftest import Invoke, assert_clean_error


def test_migrate_is_idempotent(invoke: Invoke) -> None:
    result = invoke("migrate")

    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout


def test_migrate_names_an_unreachable_database(invoke: Invoke) -> None:
    result = invoke(
        "migrate",
        env={"DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x?connect_timeout=2"},
    )

    assert_clean_error(result, "not reachable")
    assert "nobody@127.0.0.1:1" in result.stderr


def test_api_and_worker_name_the_missing_stripe_settings(invoke: Invoke) -> None:
    for command in ("api", "worker"):
        result = invoke(command, env={"STRIPE_WEBHOOK_SECRET": "whsec_x"})

        assert_clean_error(result, "STRIPE_SECRET_KEY")
        assert "STRIPE_WEBHOOK_SECRET" not in result.stderr


def test_api_refuses_to_start_with_a_short_jwt_secret(invoke: Invoke) -> None:
    stripe = {"STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_WEBHOOK_SECRET": "whsec_x"}

    result = invoke("api", env={**stripe, "AUTH_JWT_SECRET": "change-me"})

    assert_clean_error(result, "AUTH_JWT_SECRET is 9 bytes long", "at least 32 bytes")


def test_an_invalid_setting_is_named(invoke: Invoke) -> None:
    result = invoke("orgs", "list", env={"STRIPE_TRIAL_DAYS": "many"})

    assert_clean_error(result, "STRIPE_TRIAL_DAYS is invalid")


def test_no_command_shows_help(invoke: Invoke) -> None:
    result = invoke()

    assert "Usage" in result.output
    for command in ("dev", "orgs", "provision", "usage", "emulator", "token", "members"):
        assert command in result.output


def test_python_worker_py_names_the_missing_stripe_settings(tmp_path: object) -> None:
    """`python worker.py` is the other way to start a worker: same one-line error."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    done = subprocess.run(
        [sys.executable, str(root / "worker.py")],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "STRIPE_SECRET_KEY" in done.stderr
    assert "Traceback" not in done.stderr
