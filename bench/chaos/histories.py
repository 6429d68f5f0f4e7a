"""Histories worth replaying, picked from the run: the workflow code must keep replaying them.

- `chaos_continue_as_new`: a run of a paying org that ended in continue-as-new;
- `chaos_failing_card`: a run of an org whose card is declined that saw the
  payment fail (and, if one did, the subscription canceled by dunning);
- `chaos_worker_killed`: a run in which an activity was retried after its worker
  was killed mid-attempt (start-to-close timeout), or else one whose workflow
  task timed out on a dead worker.

Each one is replayed before it is written, so a saved file always replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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


def _signal_types(history: WorkflowHistory) -> set[str]:
    """The Stripe event types the run was signalled with."""
    found: set[str] = set()
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        for payload in event.workflow_execution_signaled_event_attributes.input.payloads:
            with contextlib.suppress(ValueError, AttributeError):
                found.add(str(json.loads(payload.data).get("type")))
    return found


async def _replays(history: WorkflowHistory) -> bool:
    # Saved histories are replayed by the tests without any key: never encrypted ones.
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter)
    try:
        await replayer.replay_workflow(history)
    except Exception:
        return False
    return True


async def _fetch_all(
    client: Client, executions: Iterable[WorkflowExecution]
) -> list[tuple[WorkflowExecution, WorkflowHistory]]:
    semaphore = asyncio.Semaphore(8)

    async def fetch(execution: WorkflowExecution) -> WorkflowHistory | None:
        async with semaphore:
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            try:
                return await handle.fetch_history()
            except Exception:
                return None

    runs = sorted(executions, key=lambda e: e.start_time)
    histories = await asyncio.gather(*(fetch(e) for e in runs))
    return [(e, h) for e, h in zip(runs, histories, strict=True) if h is not None]


def _biggest(histories: list[WorkflowHistory]) -> WorkflowHistory | None:
    return max(histories, key=lambda h: len(h.events), default=None)


async def capture(
    client: Client,
    executions: Iterable[WorkflowExecution],
    orgs: list[OrgPlan],
    target: Path,
) -> list[str]:
    """Write the histories it finds to `target`; returns the names written."""
    paying = {org_workflow_id(p.org_id) for p in orgs if p.billed and not p.failing_card}
    failing = {org_workflow_id(p.org_id) for p in orgs if p.failing_card}
    runs = await _fetch_all(client, executions)
    continued = [
        h
        for e, h in runs
        if e.id in paying and e.status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    ]
    declined = [(h, _signal_types(h)) for e, h in runs if e.id in failing]
    dunning = [h for h, types in declined if "invoice.payment_failed" in types]
    canceled = [
        h
        for h, types in declined
        if {"invoice.payment_failed", "customer.subscription.deleted"} <= types
    ]
    histories = [h for _, h in runs]
    killed = [h for h in histories if _killed_mid_activity(h)] or [
        h for h in histories if _workflow_task_timed_out(h)
    ]
    candidates = {
        "chaos_continue_as_new": _biggest(continued),
        "chaos_failing_card": _biggest(canceled or dunning),
        "chaos_worker_killed": _biggest(killed),
    }
    chosen = {name: h for name, h in candidates.items() if h is not None}

    target.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, history in chosen.items():
        if await _replays(history):
            (target / f"{name}.json").write_text(history.to_json())
            written.append(name)
    return written
