"""Settings built from an environment the test controls, and certificates made for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from billing.config import Settings
from tests.factories.tls import TlsFiles, write_tls_files

MakeSettings = Callable[..., Settings]


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeSettings:
    """`environment(TEMPORAL_TLS="true", ...)`: Settings read from exactly these variables.

    Every setting the developer may have exported is removed, the working folder
    has no `.env`, and HOME points at an empty folder, so Temporal's default
    profile file (~/.config/temporalio/temporal.toml) is the test's too.
    """
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def make(**variables: str) -> Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return make


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_tls_files(tmp_path_factory.mktemp("tls"))
