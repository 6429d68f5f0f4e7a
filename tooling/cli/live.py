"""Reading an org's live state from its workflow, with a bound.

A query needs a worker; when none is running it would wait for a long time, so
every query here has a timeout, and once one times out the rest are skipped:
the DB row is shown instead, and the user is told why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from temporalio.client import Client, WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.service import RPCError, RPCStatusCode

from billing.domain import OrgBillingState
from billing.orchestration import query_state

QUERY_TIMEOUT = 3.0
QUERY_CONCURRENCY = 16

NO_WORKFLOW = "no workflow"
WORKER_SILENT = "the worker did not answer (is `billing worker` running?)"
TEMPORAL_DOWN = "Temporal is not reachable"


@dataclass(frozen=True)
class Live:
    """The workflow's state, or why there is none."""

    state: OrgBillingState | None
    problem: str | None = None


def describe_rpc_error(error: RPCError) -> str:
    if error.status == RPCStatusCode.NOT_FOUND:
        return NO_WORKFLOW
    if error.status == RPCStatusCode.UNAVAILABLE:
        return TEMPORAL_DOWN
    return error.message or str(error)


async def live_state(client: Client, org_id: int, *, timeout: float = QUERY_TIMEOUT) -> Live:
    try:
        return Live(await asyncio.wait_for(query_state(client, org_id), timeout))
    except TimeoutError:
        return Live(None, WORKER_SILENT)
    except RPCError as error:
        return Live(None, describe_rpc_error(error))
    except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as error:
        return Live(None, f"the state query failed: {error}")


async def live_states(
    client: Client | None, org_ids: Iterable[int], *, timeout: float = QUERY_TIMEOUT
) -> dict[int, Live]:
    """Query many orgs at once; stop asking once the worker proved silent."""
    ids = list(org_ids)
    if client is None:
        return {org_id: Live(None, TEMPORAL_DOWN) for org_id in ids}
    gate = asyncio.Semaphore(QUERY_CONCURRENCY)
    silent = asyncio.Event()

    async def one(org_id: int) -> tuple[int, Live]:
        async with gate:
            if silent.is_set():
                return org_id, Live(None, WORKER_SILENT)
            result = await live_state(client, org_id, timeout=timeout)
            if result.problem == WORKER_SILENT:
                silent.set()
            return org_id, result

    return dict(await asyncio.gather(*(one(org_id) for org_id in ids)))
