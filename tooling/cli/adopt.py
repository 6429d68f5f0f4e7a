"""`billing adopt [--dry-run]`: orgs the legacy implementation billed get their workflow.

The work is `billing.adoption`'s; this module builds its clients and prints
the report (docs/legacy-adoption.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

from billing.adoption import Adopter, AdoptionLine, AdoptionReport, metadata_summary
from billing.stripe_gateway import StripeGateway, make_stripe_client
from tooling.cli.context import CliState, fail, out, print_json, run, state_of
from tooling.cli.text import safe

_VERBS = {
    "adopted": "adopted",
    "would_adopt": "would be adopted",
    "skipped": "skipped",
    "refused": "refused",
}


async def adopt_orgs(state: CliState, *, dry_run: bool) -> AdoptionReport:
    """Adopt (or, with `dry_run`, only read) every org with a subscription and no workflow."""
    settings = state.settings
    if not settings.stripe_secret_key:
        fail("STRIPE_SECRET_KEY is not set; start `billing dev` or set it in the environment.")
    client = make_stripe_client(
        settings.stripe_secret_key, api_base=settings.stripe_api_base, max_network_retries=2
    )
    adopter = Adopter(
        settings,
        state.session_factory(),
        StripeGateway(client, settings),
        await state.temporal(),
    )
    return await adopter.adopt_all(dry_run=dry_run)


def describe(line: AdoptionLine, *, dry_run: bool) -> str:
    """One line of the report: what was (or would be) changed for the org."""
    head = f"org {line.org_id}: {_VERBS[line.outcome]}"
    if line.outcome in ("skipped", "refused"):
        return f"{head} ({safe(line.reason)})"
    would = "would " if dry_run else ""
    parts = [
        f"customer {safe(line.customer_id)}",
        f"metadata keys {'to add' if dry_run else 'added'}: "
        f"{safe(metadata_summary(line.metadata_added))}",
    ]
    if line.period_start is not None and line.period_end is not None:
        parts.append(
            f"period {line.period_start:%Y-%m-%d %H:%M}..{line.period_end:%Y-%m-%d %H:%M} UTC: "
            f"{line.requests_already_reported or 0} requests already reported, "
            f"{line.requests_recorded_as_reported} "
            f"{'to record' if dry_run else 'recorded'} as reported"
        )
    if line.workflow_waiting:
        parts.append(
            f"waiting workflow {'asked' if line.workflow_started else 'would be asked'}"
            " to provision again"
        )
    else:
        parts.append("workflow started" if line.workflow_started else f"workflow {would}start")
    return f"{head}: " + "; ".join(parts)


def print_report(report: AdoptionReport) -> None:
    for line in report.orgs:
        out.print(describe(line, dry_run=report.dry_run))
    done = report.count("would_adopt" if report.dry_run else "adopted")
    counts = (
        f"{done} {'would be adopted' if report.dry_run else 'adopted'}, "
        f"{report.count('refused')} refused, {report.count('skipped')} skipped"
    )
    if report.dry_run:
        out.print(f"Dry run, nothing changed: {counts}.")
    elif not report.orgs:
        out.print("No org has a subscription id; nothing to adopt.")
    else:
        out.print(f"Orgs with a subscription: {counts}.")


def fail_on_refusals(report: AdoptionReport) -> None:
    refused = [line for line in report.orgs if line.outcome == "refused"]
    if refused:
        first = refused[0]
        fail(
            f"{len(refused)} orgs could not be adopted "
            f"(org {first.org_id}: {safe(first.reason).rstrip('.')})."
        )


def adopt(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read and report only; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Give every org the legacy implementation billed (a subscription id, no workflow) its
    workflow, with its customer's metadata and the usage already reported."""
    state = state_of(ctx)
    report = run(adopt_orgs(state, dry_run=dry_run))
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        print_report(report)
    fail_on_refusals(report)
