"""The month with encrypted payloads: nothing of an org's in clear, and every run still readable.

With `--encrypt` every process of the stack (and the harness's own client) gets
a fresh `BILLING_ENCRYPTION_KEYS`; this check reads the histories as anyone with
access to the namespace would (raw, without the key) and counts payloads that
are not encrypted, then replays a sample with the product's codec to show the
runs stay readable to those who hold the key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from temporalio.client import Client, WorkflowExecution, WorkflowHistory
from temporalio.worker import Replayer

from billing.encryption import clear_payloads
from workflows import ALL_WORKFLOWS
from workflows.org_billing import PATCH_IDS

from .checks import Invariant

# Histories read in full for clear payloads; and how many of them are replayed.
READ_AT_MOST = 60
REPLAY_AT_MOST = 10


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
        clear = clear_payloads(history, PATCH_IDS)
        if clear:
            invariant.add(f"{history.workflow_id}: {len(clear)} in clear, first {clear[0]}")
        if index < REPLAY_AT_MOST:
            try:
                await replayer.replay_workflow(history)
            except Exception as err:
                invariant.add(f"{history.workflow_id}: does not replay with the key ({err})")
    return invariant
