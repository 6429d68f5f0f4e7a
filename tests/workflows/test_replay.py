"""Saved histories of real runs must replay on the current workflow code.

A change that would break orgs already running (non-determinism) fails here;
such a change needs `workflow.patched`. Histories are captured from test runs
with `BILLING_CAPTURE_HISTORIES=1` and committed under tests/histories/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from billing.config import Settings
from billing.encryption import new_key_entry
from billing.temporal_client import data_converter
from workflows import ALL_WORKFLOWS

HISTORIES = sorted((Path(__file__).parent.parent / "histories").glob("*.json"))


def test_histories_are_present() -> None:
    assert HISTORIES, "no saved workflow histories under tests/histories/"


@pytest.mark.asyncio
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


@pytest.mark.asyncio
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_with_encryption_on(path: Path) -> None:
    """Turning `BILLING_ENCRYPTION_KEYS` on keeps runs written in plaintext replaying.

    Encrypted histories replay too: tests/temporal/test_encrypted_histories.py.
    """
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    settings = Settings.model_validate({"billing_encryption_keys": new_key_entry("kid1")})
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=data_converter(settings))
    await replayer.replay_workflow(history)
