"""`worker.py` is a module, so import-linter cannot place it in a layer: check it here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE_THE_WORKER = ("api", "tooling", "stripe_emulator", "bench")


def _imported_packages(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_worker_imports_nothing_above_it() -> None:
    imported = _imported_packages((ROOT / "worker.py").read_text())
    assert "workflows" in imported and "activities" in imported  # the check sees its imports
    assert imported.isdisjoint(ABOVE_THE_WORKER), imported & set(ABOVE_THE_WORKER)


def test_the_check_catches_an_upward_import() -> None:
    assert "api" in _imported_packages("from api.main import create_app\n")
    assert "tooling" in _imported_packages("def f():\n    import tooling.cli.main\n")
