"""The `billing dev` home folder: where the stack keeps its data and chosen settings.

`billing dev` writes `settings.env` there; every other command run with the same
home reads it (real environment variables still win), so a second terminal
talks to the running stack with no exports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

HOME_ENV_VAR = "BILLING_HOME"
DEFAULT_HOME = Path(".billing")
SETTINGS_FILE = "settings.env"
PID_FILE = "dev.pid"


def settings_file(home: Path) -> Path:
    return home / SETTINGS_FILE


def read_settings_file(home: Path) -> dict[str, str]:
    """The settings `billing dev` chose last time (empty if it never ran here)."""
    path = settings_file(home)
    if not path.is_file():
        return {}
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def running_dev(home: Path) -> int | None:
    """The pid of the `billing dev` that runs for this home, if one does."""
    import psutil  # type: ignore[import-untyped]  # only here: every command imports this module

    try:
        pid = int((home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid if "billing" in cmdline and " dev" in cmdline else None


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_.:/@+=,%?&" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_settings_file(home: Path, values: Mapping[str, str]) -> Path:
    """Write atomically and private to the user: the file holds secrets."""
    home.mkdir(parents=True, exist_ok=True)
    path = settings_file(home)
    tmp = path.with_suffix(".env.tmp")
    lines = [
        "# Written by `billing dev`; other `billing` commands with this home read it.",
        *(f"{key}={_quote(value)}" for key, value in values.items()),
    ]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
