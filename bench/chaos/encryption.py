"""The month with encrypted payloads: nothing of an org's in clear, and every run still readable.

With `--encrypt` every process of the stack (and the harness's own client) gets
a fresh `BILLING_ENCRYPTION_KEYS`; this check reads the histories as anyone with
access to the namespace would (raw, without the key) and counts payloads that
are not encrypted, then replays a sample with the product's codec to show the
runs stay readable to those who hold the key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecution, WorkflowHistory
from temporalio.worker import Replayer

from billing.encryption import ENCODING
from workflows import ALL_WORKFLOWS
from workflows.org_billing import PATCH_IDS

from .checks import Invariant

# Histories read in full for clear payloads; and how many of them are replayed.
READ_AT_MOST = 60
REPLAY_AT_MOST = 10
# Search attributes are plaintext by design (they hold no personal data).
PLAINTEXT_FIELDS = frozenset({"search_attributes"})


def _payloads(event: HistoryEvent) -> Iterator[Payload]:
    """Every payload an event carries that the codec must have sealed.

    Left out: search attributes, and the markers of `workflow.patched`, which
    Temporal writes itself with nothing but one of our patch ids.
    """
    if event.HasField("marker_recorded_event_attributes"):
        details = event.marker_recorded_event_attributes.details
        if set(details) == {"patch-data"} and all(
            _patch_id(p) in PATCH_IDS for p in details["patch-data"].payloads
        ):
            return
    yield from _walk(event)


def _patch_id(payload: Payload) -> str | None:
    try:
        data = json.loads(payload.data)
    except ValueError:
        return None
    return str(data.get("id")) if isinstance(data, dict) else None


def _walk(message: Message) -> Iterator[Payload]:
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None or field.name in PLAINTEXT_FIELDS:
            continue
        if field.message_type.GetOptions().map_entry:
            items: Iterable[Message] = value.values()
        elif isinstance(value, Message):
            items = (value,)
        else:
            items = value  # a repeated field
        for item in items:
            yield from _walk(item)


def clear_payloads(history: WorkflowHistory) -> list[str]:
    """Where a history holds a payload that is not encrypted (an empty list when none)."""
    found: list[str] = []
    for event in history.events:
        for payload in _payloads(event):
            if payload.metadata.get("encoding") != ENCODING:
                kind = payload.metadata.get("encoding", b"?").decode(errors="replace")
                what = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
                found.append(f"event {event.event_id} {what} ({kind})")
    return found


async def check(client: Client, executions: Iterable[WorkflowExecution]) -> Invariant:
    """Count the histories with a payload in clear, and those the key cannot replay."""
    invariant = Invariant("workflow payloads in clear, or unreadable with the key")
    runs = sorted(executions, key=lambda e: e.start_time)[:READ_AT_MOST]
    semaphore = asyncio.Semaphore(8)

    async def fetch(execution: WorkflowExecution) -> WorkflowHistory:
        async with semaphore:
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            return await handle.fetch_history()

    histories = await asyncio.gather(*(fetch(e) for e in runs))
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=client.data_converter)
    for index, history in enumerate(histories):
        clear = clear_payloads(history)
        if clear:
            invariant.add(f"{history.workflow_id}: {len(clear)} in clear, first {clear[0]}")
        if index < REPLAY_AT_MOST:
            try:
                await replayer.replay_workflow(history)
            except Exception as err:
                invariant.add(f"{history.workflow_id}: does not replay with the key ({err})")
    return invariant
