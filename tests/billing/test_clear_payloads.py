"""The check for payloads in clear (the chaos month's) sees what a namespace reader would."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory

from billing.encryption import (
    EncryptionCodec,
    clear_payloads,
    new_key_entry,
    parse_keys,
    payloads_in,
)
from workflows.org_billing import PATCH_IDS

HISTORY = Path(__file__).resolve().parents[1] / "histories" / "chaos_failing_card.json"


def _history() -> WorkflowHistory:
    return WorkflowHistory.from_json("org-billing-1", HISTORY.read_text())


def test_a_history_written_without_a_key_shows_its_payloads_in_clear() -> None:
    clear = clear_payloads(_history(), PATCH_IDS)

    assert any("workflow_execution_signaled" in where for where in clear), clear
    assert any("activity_task_scheduled" in where for where in clear), clear
    assert not any("marker_recorded" in where for where in clear), clear  # patch ids only


def test_a_sealed_history_has_nothing_in_clear_but_patch_markers_and_attributes() -> None:
    history = _history()
    codec = EncryptionCodec(parse_keys(new_key_entry("kid1")))
    sealed = 0
    for event in history.events:
        if event.HasField("marker_recorded_event_attributes"):
            continue  # written by Temporal itself
        for payload in payloads_in(event):
            payload.CopyFrom(codec.encrypt(payload))
            sealed += 1

    assert sealed > 40
    assert clear_payloads(history, PATCH_IDS) == []
    # One payload left in clear is found again.
    started = history.events[0].workflow_execution_started_event_attributes
    started.input.payloads[0].metadata["encoding"] = b"json/plain"
    assert clear_payloads(history, PATCH_IDS) == [
        "event 1 workflow_execution_started (json/plain)"
    ]
