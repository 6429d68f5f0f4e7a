"""Commands that act through the org workflows: provision, backfill, usage, reconcile, token."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from billing.adoption import candidates as adoption_candidates
from billing.auth import AuthConfigError, TokenLifetimeError, TokenRules, mint_token
from billing.constants import (
    ORG_BILLING_WORKFLOW,
    RECONCILE_UPDATE,
    REPORT_USAGE_UPDATE,
    org_workflow_id,
)
from billing.db import orgs
from billing.domain import BillingStatus, OrgBillingState, ReconcileResult, UsageReportResult
from billing.orchestration import start_provisioning
from tooling.cli.adopt import adopt_orgs, fail_on_refusals, print_report
from tooling.cli.context import (
    CliError,
    CliState,
    err,
    fail,
    out,
    print_json,
    run,
    state_of,
)
from tooling.cli.live import WORKER_SILENT, live_state
from tooling.cli.render import key_value_table, reconcile_table, state_fields, usage_table
from tooling.cli.text import safe

OrgArgument = Annotated[int, typer.Argument(help="The org's id.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
UPDATE_TIMEOUT = 60.0
RECONCILE_TIMEOUT = 30.0
RECONCILE_CONCURRENCY = 8


def _org_must_exist(state: CliState, org_id: int) -> None:
    with state.session() as session:
        orgs.get_org(session, org_id)


# provision -------------------------------------------------------------------------


async def _provision(state: CliState, org_id: int, timeout: float) -> OrgBillingState:
    client = await state.temporal()
    await start_provisioning(client, state.settings, org_id)
    deadline = time.monotonic() + timeout
    last_problem: str | None = None
    with err.status(f"Provisioning org {org_id}…", spinner="dots"):
        while time.monotonic() < deadline:
            live = await live_state(client, org_id, timeout=min(3.0, timeout))
            if live.state is not None and live.state.status != BillingStatus.PROVISIONING:
                return live.state
            last_problem = live.problem
            await asyncio.sleep(0.5)
    if last_problem in (None, WORKER_SILENT):
        fail(
            f"Org {org_id} was still provisioning after {timeout:.0f} s; "
            "is `billing worker` running?"
        )
    fail(f"Org {org_id} was still provisioning after {timeout:.0f} s ({last_problem}).")


def provision(
    ctx: typer.Context,
    org_id: OrgArgument,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the result.", min=1)
    ] = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Provision one org now and wait for the outcome."""
    state = state_of(ctx)
    _org_must_exist(state, org_id)
    result = run(_provision(state, org_id, timeout))
    if as_json:
        print_json(result.model_dump(mode="json"))
    else:
        out.print(key_value_table(f"Org {org_id}", state_fields(result)))
    if result.status == BillingStatus.PROVISIONING_FAILED:
        fail(f"Provisioning org {org_id} failed: {result.last_error or 'see the workflow'}.")


# backfill --------------------------------------------------------------------------


async def _backfill(state: CliState, org_ids: list[int]) -> list[tuple[int, str | None]]:
    client = await state.temporal()
    outcomes: list[tuple[int, str | None]] = []
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("Starting org workflows", total=len(org_ids))
        for org_id in org_ids:
            try:
                await start_provisioning(client, state.settings, org_id)
                outcomes.append((org_id, None))
            except RPCError as error:
                outcomes.append((org_id, error.message or str(error)))
            progress.advance(task)
    return outcomes


def backfill(
    ctx: typer.Context,
    as_json: JsonOption = False,
    skip_adoption: Annotated[
        bool,
        typer.Option(
            "--no-adopt",
            help="Skip `billing adopt`'s step (orgs with a subscription id and no workflow).",
        ),
    ] = False,
) -> None:
    """Adopt the orgs billed by the legacy implementation (as `billing adopt`), then start
    the workflow of every org that has no billing yet."""
    state = state_of(ctx)
    adopted = None
    if not skip_adoption and state.settings.stripe_secret_key:
        with state.session() as session:
            legacy = bool(adoption_candidates(session))
        if legacy:
            adopted = run(adopt_orgs(state, dry_run=False))
    with state.session() as session:
        org_ids = orgs.orgs_without_billing(session)
    outcomes = run(_backfill(state, org_ids)) if org_ids else []
    failed = [(org_id, problem) for org_id, problem in outcomes if problem]
    if as_json:
        document: dict[str, Any] = {
            "started": [org_id for org_id, problem in outcomes if not problem],
            "failed": [{"org_id": org_id, "error": problem} for org_id, problem in failed],
        }
        if adopted is not None:
            document["adoption"] = adopted.model_dump(mode="json")
        print_json(document)
    else:
        if adopted is not None:
            print_report(adopted)
        if not org_ids:
            out.print("Every org already has billing; nothing to start.")
        else:
            out.print(f"Signalled {len(outcomes) - len(failed)} of {len(org_ids)} org workflows.")
    if failed:
        org_id, problem = failed[0]
        fail(f"{len(failed)} org workflows could not be started (org {org_id}: {problem}).")
    if adopted is not None:
        fail_on_refusals(adopted)


# updates: usage report and reconcile -------------------------------------------------


async def _update(
    client: Client,
    org_id: int,
    name: str,
    result_type: type[Any],
    timeout: float = UPDATE_TIMEOUT,
) -> Any:
    """Run one Update on the org's workflow, bounded, with errors turned into sentences."""
    handle = client.get_workflow_handle(org_workflow_id(org_id))
    silent = (
        f"Org {org_id}'s workflow did not answer within {timeout:.0f} s; "
        "is `billing worker` running?"
    )
    try:
        return await asyncio.wait_for(handle.execute_update(name, result_type=result_type), timeout)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        fail(silent)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            fail(
                f"Org {org_id} has no running billing workflow; "
                f"start it with `billing provision {org_id}`."
            )
        fail(f"Temporal refused the {name} update for org {org_id}: {error.message}.")
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        detail = str(cause) if cause else str(error)
        fail(f"The {name} update failed for org {org_id}: {detail.rstrip('.')}.")


def usage_report(ctx: typer.Context, org_id: OrgArgument, as_json: JsonOption = False) -> None:
    """Report the org's usage to Stripe now, and show what was sent."""
    state = state_of(ctx)
    _org_must_exist(state, org_id)

    async def go() -> UsageReportResult:
        client = await state.temporal()
        result: UsageReportResult = await _update(
            client, org_id, REPORT_USAGE_UPDATE, UsageReportResult
        )
        return result

    result = run(go())
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    if result.periods:
        out.print(usage_table(result))
    out.print(f"Meter events sent: {result.meter_events_sent}.")
    if result.skipped_reason:
        out.print(f"Skipped: {result.skipped_reason}")


async def running_org_ids(client: Client) -> list[int]:
    """Orgs whose workflow is running, from Temporal's visibility store."""
    query = f"WorkflowType = '{ORG_BILLING_WORKFLOW}' AND ExecutionStatus = 'Running'"
    ids: set[int] = set()
    prefix = org_workflow_id(0)[:-1]
    async for execution in client.list_workflows(query):
        suffix = execution.id.removeprefix(prefix)
        if suffix.isdigit():
            ids.add(int(suffix))
    return sorted(ids)


def reconcile(
    ctx: typer.Context,
    org_id: Annotated[
        int | None, typer.Argument(help="One org's id; all orgs with a workflow when omitted.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for each org's answer.", min=1)
    ] = RECONCILE_TIMEOUT,
    as_json: JsonOption = False,
) -> None:
    """Re-sync from Stripe and show what differed."""
    state = state_of(ctx)
    if org_id is not None:
        _org_must_exist(state, org_id)

    async def one_org(client: Client, one: int) -> ReconcileResult:
        result: ReconcileResult = await _update(
            client, one, RECONCILE_UPDATE, ReconcileResult, timeout
        )
        return result

    async def every_org(client: Client) -> tuple[list[ReconcileResult], list[tuple[int, str]]]:
        running = await running_org_ids(client)
        with state.session() as session:
            ids = orgs.existing_org_ids(session, running)
        gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)
        results: list[ReconcileResult] = []
        failures: list[tuple[int, str]] = []

        async def one(org: int) -> None:
            async with gate:
                try:
                    results.append(
                        await _update(client, org, RECONCILE_UPDATE, ReconcileResult, timeout)
                    )
                except CliError as error:
                    failures.append((org, str(error)))

        with err.status(f"Reconciling {len(ids)} orgs…", spinner="dots"):
            await asyncio.gather(*(one(org) for org in ids))
        return sorted(results, key=lambda r: r.org_id), sorted(failures)

    async def go() -> tuple[list[ReconcileResult], list[tuple[int, str]]]:
        client = await state.temporal()
        if org_id is not None:
            return [await one_org(client, org_id)], []
        return await every_org(client)

    results, failures = run(go())
    if as_json:
        print_json([r.model_dump(mode="json") for r in results])
    elif results:
        out.print(reconcile_table(results))
        changed = sum(1 for r in results if r.differences)
        out.print(f"{changed} of {len(results)} orgs differed from Stripe.")
    elif not failures:
        out.print("No org has a running billing workflow.")
    if failures:
        first_org, first_problem = failures[0]
        for failed_org, problem in failures[1:]:
            err.print(f"org {failed_org}: {safe(problem)}", markup=False)
        fail(
            f"{len(failures)} orgs could not be reconciled; org {first_org}: "
            f"{first_problem.rstrip('.?')}."
        )


# token -----------------------------------------------------------------------------


def token(
    ctx: typer.Context,
    org_id: OrgArgument,
    email: Annotated[str, typer.Option("--email", help="A member of the org.")],
    ttl_minutes: Annotated[
        int | None,
        typer.Option(
            "--ttl-minutes",
            help="How long the token is valid [default: 60, at most AUTH_JWT_MAX_TTL_SECONDS].",
            min=1,
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a bearer token for a member of the org (for local use)."""
    state = state_of(ctx)
    rules = TokenRules.of(state.settings)
    try:
        rules.check()
    except AuthConfigError as error:
        fail(f"{error} No token was minted.")
    with state.session() as session:
        membership = orgs.get_membership(session, org_id, email)
        user_id = membership.user_id
    ttl = timedelta(minutes=ttl_minutes) if ttl_minutes is not None else None
    try:
        minted = mint_token(rules, user_id, org_id, ttl)
    except TokenLifetimeError as error:
        fail(str(error))
    if as_json:
        print_json({"token": minted, "org_id": org_id, "user_id": user_id})
        return
    typer.echo(minted)
