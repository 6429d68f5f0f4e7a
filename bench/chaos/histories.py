"""Histories worth replaying, picked from the run: the workflow code must keep replaying them.

- `chaos_continue_as_new`: a run of a paying org that ended in continue-as-new;
- `chaos_failing_card`: the latest run of an org whose card is declined (past
  due, payment retries, cancellation);
- `chaos_worker_killed`: a run in which an activity was retried after its worker
  was killed mid-attempt (start-to-close timeout), or else one whose workflow
  task timed out on a dead worker.

Each one is replayed before it is written, so a saved file always replays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from billing.constants import org_workflow_id
from workflows import ALL_WORKFLOWS

from .scenario import OrgPlan


def _killed_mid_activity(history: WorkflowHistory) -> bool:
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if started.attempt > 1 and started.last_failure.HasField("timeout_failure_info"):
                return True
    return False


def _workflow_task_timed_out(history: WorkflowHistory) -> bool:
    return any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT for e in history.events)


async def _fetch(client: Client, execution: WorkflowExecution) -> WorkflowHistory:
    handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
    return await handle.fetch_history()


async def _replays(history: WorkflowHistory) -> bool:
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter)
    try:
        await replayer.replay_workflow(history)
    except Exception:
        return False
    return True


async def capture(
    client: Client,
    executions: Iterable[WorkflowExecution],
    orgs: list[OrgPlan],
    target: Path,
) -> list[str]:
    """Write the histories it finds to `target`; returns the names written."""
    runs = sorted(executions, key=lambda e: e.start_time)
    paying = {org_workflow_id(p.org_id) for p in orgs if p.billed and not p.failing_card}
    failing = {org_workflow_id(p.org_id) for p in orgs if p.failing_card}
    chosen: dict[str, WorkflowHistory] = {}

    continued = [
        e for e in runs if e.id in paying and e.status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    ]
    if continued:
        biggest = max(continued, key=lambda e: e.history_length)
        chosen["chaos_continue_as_new"] = await _fetch(client, biggest)

    latest_failing = [e for e in runs if e.id in failing]
    if latest_failing:
        longest = max(latest_failing, key=lambda e: e.history_length)
        chosen["chaos_failing_card"] = await _fetch(client, longest)

    semaphore = asyncio.Semaphore(8)

    async def fetch(execution: WorkflowExecution) -> WorkflowHistory | None:
        async with semaphore:
            try:
                return await _fetch(client, execution)
            except Exception:
                return None

    histories = [h for h in await asyncio.gather(*(fetch(e) for e in runs)) if h is not None]
    killed = [h for h in histories if _killed_mid_activity(h)] or [
        h for h in histories if _workflow_task_timed_out(h)
    ]
    if killed:
        chosen["chaos_worker_killed"] = max(killed, key=lambda h: len(h.events))

    target.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, history in chosen.items():
        if await _replays(history):
            (target / f"{name}.json").write_text(history.to_json())
            written.append(name)
    return written
