"""`billing orgs ...`: create orgs and see them as the DB and their workflows know them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import stripe
import typer
from temporalio.client import Client
from temporalio.service import RPCError

from billing.constants import org_workflow_id
from billing.db import orgs
from billing.domain import BillingProblem, BillingStatus, OrgBillingState, UsagePeriodReport
from billing.orchestration import start_provisioning
from billing.problems import PROBLEM_ORGS_QUERY, problem_help
from billing.search_attributes import BILLING_PROBLEM_KEY, BILLING_STATUS_KEY, ORG_ID_KEY
from billing.temporal_client import TemporalUnavailableError
from tooling.cli.context import (
    CliState,
    fail,
    out,
    print_json,
    run,
    state_of,
    warn,
)
from tooling.cli.live import TEMPORAL_DOWN, Live, live_state, live_states
from tooling.cli.render import (
    ended_period_fields,
    key_value_table,
    last_ended_period,
    live_document,
    merged_view,
    org_document,
    orgs_table,
    problem_document,
    problem_orgs_table,
    state_fields,
)
from tooling.cli.text import safe

app = typer.Typer(help="Create, list and inspect orgs.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


async def _start_billing(state: CliState, org_id: int) -> str | None:
    """Start provisioning now; return why it could not start (None when it did)."""
    settings = state.settings
    try:
        client = await state.temporal()
        await start_provisioning(client, settings, org_id)
    except TemporalUnavailableError as error:
        return str(error)
    except RPCError as error:
        return f"Temporal refused to start the workflow: {error.message or error}."
    return None


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="The org's name.")],
    owner_email: Annotated[str, typer.Option("--owner-email", help="Owner's email.")],
    owner_first_name: Annotated[str, typer.Option("--owner-first-name")] = "",
    owner_last_name: Annotated[str, typer.Option("--owner-last-name")] = "",
    aws_account_id: Annotated[
        str | None, typer.Option("--aws-account-id", help="Billed by AWS Marketplace instead.")
    ] = None,
    azure_subscription_id: Annotated[
        str | None,
        typer.Option("--azure-subscription-id", help="Billed by Azure Marketplace instead."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create an org and its owner; its billing workflow starts at once."""
    state = state_of(ctx)
    with state.session() as session:
        twins = orgs.orgs_with_name_and_owner(session, name, owner_email)
        org = orgs.create_org_with_owner(
            session,
            name=name,
            owner_email=owner_email,
            owner_first_name=owner_first_name,
            owner_last_name=owner_last_name,
            aws_account_id=aws_account_id,
            azure_subscription_id=azure_subscription_id,
        )
        org_id = org.id
    with state.session() as session:
        summary = orgs.org_summary(session, org_id)
    if twins:
        same = ", ".join(str(twin) for twin in twins)
        warn(
            f"Org {same} already has the name {summary.name!r} and the owner "
            f"{summary.owner_email}; org {org_id} is a second one, billed separately."
        )
    problem = run(_start_billing(state, org_id))
    if problem:
        warn(
            f"{problem.rstrip('.')}; org {org_id} is saved and the `billing-backfill` "
            "schedule will provision it."
        )
    if as_json:
        print_json(
            {
                "org": org_document(summary),
                "same_name_and_owner": twins,
                "workflow": {
                    "id": org_workflow_id(org_id),
                    "started": problem is None,
                    "problem": problem,
                },
            }
        )
        return
    out.print(f"Created org {org_id} ({safe(summary.name)}), owner {safe(summary.owner_email)}.")
    if problem is None:
        out.print(f"Billing started: workflow {org_workflow_id(org_id)}.")


async def _lives(state: CliState, org_ids: list[int]) -> dict[int, Live]:
    if not org_ids:
        return {}
    try:
        client = await state.temporal()
    except TemporalUnavailableError:
        return await live_states(None, org_ids)
    return await live_states(client, org_ids)


def _warn_about_missing_state(lives: dict[int, Live]) -> None:
    problems = {live.problem for live in lives.values() if live.problem}
    problems.discard("no workflow")
    for problem in sorted(problems):
        if problem == TEMPORAL_DOWN:
            warn("Temporal is not reachable; showing the database rows only.")
        else:
            warn(f"Live state missing for some orgs: {problem}; showing their database rows.")


@app.command("list")
def list_orgs(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only orgs with this status (e.g. past_due)."),
    ] = None,
    problem: Annotated[
        bool,
        typer.Option(
            "--problem",
            help="Only orgs that need a person (BillingProblem set), with the fix for each.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Every org, with its live workflow state where available (else its DB row)."""
    known = [member.value for member in BillingStatus]
    if status is not None and status not in known:
        fail(f"{status!r} is not a billing status; use one of {', '.join(known)}.")
    state = state_of(ctx)
    if problem:
        _list_problem_orgs(state, status, as_json)
        return
    with state.session() as session:
        summaries = orgs.list_orgs(session)
    lives = run(_lives(state, [o.id for o in summaries]))
    _warn_about_missing_state(lives)
    rows = [(org, lives[org.id]) for org in summaries]
    if status:
        rows = [(org, live) for org, live in rows if merged_view(org, live)["status"] == status]
    if as_json:
        documents: list[dict[str, Any]] = []
        for org, live in rows:
            documents.append({**org_document(org), "billing": merged_view(org, live)})
        print_json(documents)
        return
    if not rows:
        out.print("No orgs." if not status else f"No orgs with status {status}.")
        return
    out.print(orgs_table(rows))


@dataclass(frozen=True)
class ProblemOrg:
    """A running org workflow with `BillingProblem` set, as Temporal's visibility lists it."""

    org_id: int
    status: str
    problem: BillingProblem


async def problem_orgs(client: Client) -> list[ProblemOrg]:
    """Every running org that needs a person, from the `BillingProblem` search attribute."""
    found: dict[int, ProblemOrg] = {}
    async for execution in client.list_workflows(PROBLEM_ORGS_QUERY):
        attributes = execution.typed_search_attributes
        org_id, code = attributes.get(ORG_ID_KEY), attributes.get(BILLING_PROBLEM_KEY)
        known = {problem.value for problem in BillingProblem}
        if org_id is None or not org_id.isdigit() or code is None or code not in known:
            continue
        status = attributes.get(BILLING_STATUS_KEY) or "-"
        found[int(org_id)] = ProblemOrg(int(org_id), status, BillingProblem(code))
    return [found[org_id] for org_id in sorted(found)]


def _list_problem_orgs(state: CliState, status: str | None, as_json: bool) -> None:
    async def listed() -> list[ProblemOrg]:
        try:
            client = await state.temporal()
        except TemporalUnavailableError as error:
            fail(f"{str(error).rstrip('.')}; `--problem` reads Temporal's visibility.")
        try:
            return await problem_orgs(client)
        except RPCError as error:
            fail(f"Temporal refused the visibility query: {error.message or error}.")

    found = [o for o in run(listed()) if status is None or o.status == status]
    with state.session() as session:
        names = {o.id: o.name for o in orgs.list_orgs(session)}
    if as_json:
        print_json(
            [
                {
                    "id": o.org_id,
                    "name": names.get(o.org_id),
                    "workflow_id": org_workflow_id(o.org_id),
                    "status": o.status,
                    "problem": problem_document(o.problem, o.org_id),
                }
                for o in found
            ]
        )
        return
    if not found:
        out.print("No org needs a person (no running org has a BillingProblem).")
        return
    out.print(
        problem_orgs_table([(o.org_id, names.get(o.org_id), o.status, o.problem) for o in found])
    )


@app.command("show")
def show(
    ctx: typer.Context,
    org_id: Annotated[int, typer.Argument(help="The org's id.")],
    as_json: JsonOption = False,
) -> None:
    """One org: its DB row, members, and its workflow's live state."""
    state = state_of(ctx)
    with state.session() as session:
        summary = orgs.org_summary(session, org_id)
        members = orgs.list_members(session, org_id)
        requests = orgs.request_total(session, org_id)

    async def fetch() -> Live:
        try:
            client = await state.temporal()
        except TemporalUnavailableError:
            return Live(None, TEMPORAL_DOWN)
        return await live_state(client, org_id)

    live = run(fetch())
    ended = last_ended_period(live.state) if live.state is not None else None
    invoice = _period_invoice(state, live.state, ended) if live.state and ended else None
    if as_json:
        print_json(
            {
                "org": {**org_document(summary), "requests_recorded": requests},
                "members": [
                    {
                        "email": m.email,
                        "first_name": m.first_name,
                        "last_name": m.last_name,
                        "role": m.role,
                    }
                    for m in members
                ],
                "workflow": {"id": org_workflow_id(org_id), **live_document(live)},
                "problem": problem_document(live.state.problem, org_id)
                if live.state is not None and live.state.problem is not None
                else None,
                "last_ended_period": {
                    **ended.model_dump(mode="json"),
                    "invoice": invoice if isinstance(invoice, dict) else None,
                    "invoice_unavailable_because": invoice if isinstance(invoice, str) else None,
                }
                if ended is not None and invoice is not None
                else None,
            }
        )
        return
    row = org_document(summary)
    row["requests_recorded"] = requests
    out.print(key_value_table(f"Org {org_id} (database)", row))
    out.print(key_value_table("Members", {m.email: m.role for m in members}))
    if live.state is not None:
        out.print(key_value_table(f"Workflow {org_workflow_id(org_id)}", state_fields(live.state)))
        if live.state.problem is not None:
            help = problem_help(live.state.problem)
            out.print(f"Problem {live.state.problem.value}: {help.means}.", soft_wrap=True)
            out.print(f"Fix: {help.fix_for(org_id)}.", soft_wrap=True)
        if ended is not None and invoice is not None:
            out.print(key_value_table("Last ended period", ended_period_fields(ended, invoice)))
    else:
        out.print(f"Workflow {org_workflow_id(org_id)}: no live state ({live.problem}).")


INVOICE_FIELDS = (
    "id",
    "status",
    "total",
    "amount_due",
    "amount_paid",
    "currency",
    "billing_reason",
)


def _period_invoice(
    state: CliState, billing: OrgBillingState, ended: UsagePeriodReport
) -> dict[str, Any] | str:
    """Stripe's invoice for the period that ended (the renewal invoice), or why there is none."""
    if not billing.stripe_customer_id:
        return "no Stripe customer"
    if not state.settings.stripe_secret_key:
        return "not looked up (STRIPE_SECRET_KEY is not set)"
    end = int(ended.period_end.timestamp())
    try:
        invoices = state.stripe_client().v1.invoices.list(
            {"customer": billing.stripe_customer_id, "limit": 10}
        )
    except stripe.StripeError as error:
        return f"not looked up ({type(error).__name__})"
    for invoice in invoices.data:
        data = invoice.to_dict()
        if data.get("period_end") == end and data.get("billing_reason") == "subscription_cycle":
            return {key: data.get(key) for key in INVOICE_FIELDS}
    return "none yet (Stripe creates it at the period end)"
