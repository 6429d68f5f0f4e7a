"""How orgs and workflow states look in tables and in `--json` documents."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from billing.db.orgs import OrgSummary
from billing.domain import (
    OrgBillingState,
    ReconcileResult,
    UsagePeriodReport,
    UsageReportResult,
    row_billing_status,
)
from tooling.cli.live import Live
from tooling.cli.text import safe


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def db_status(org: OrgSummary) -> str:
    """What the row alone says."""
    return row_billing_status(
        billed_elsewhere=org.billed_elsewhere,
        stripe_subscription_id=org.stripe_subscription_id,
        subscription_status=org.subscription_status,
    ).value


def org_document(org: OrgSummary) -> dict[str, Any]:
    return {
        "id": org.id,
        "uid": org.uid,
        "name": org.name,
        "owner_email": org.owner_email,
        "members": org.members,
        "stripe_customer_id": org.stripe_customer_id,
        "stripe_subscription_id": org.stripe_subscription_id,
        "subscription_status": org.subscription_status.value,
        "subscription_end": org.subscription_end,
        "aws_account_id": org.aws_account_id,
        "azure_subscription_id": org.azure_subscription_id,
        "created_at": org.created_at,
    }


def merged_view(org: OrgSummary, live: Live) -> dict[str, Any]:
    """The columns of `orgs list`: live workflow state where there is one, else the row."""
    state = live.state
    if state is not None:
        return {
            "status": state.status.value,
            "source": "workflow",
            "subscription_end": state.subscription_end,
            "stripe_customer_id": state.stripe_customer_id,
            "last_event": state.last_event_type,
            "last_error": state.last_error,
        }
    return {
        "status": db_status(org),
        "source": "database",
        "subscription_end": org.subscription_end,
        "stripe_customer_id": org.stripe_customer_id,
        "last_event": None,
        "last_error": None,
    }


def live_document(live: Live) -> dict[str, Any]:
    return {
        "state": live.state.model_dump(mode="json") if live.state else None,
        "unavailable_because": live.problem,
    }


def orgs_table(rows: list[tuple[OrgSummary, Live]]) -> Table:
    table = Table(title="Orgs", title_justify="left")
    table.add_column("org", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("subscription end")
    table.add_column("customer", no_wrap=True)
    table.add_column("last event", overflow="fold")
    table.add_column("last error", overflow="fold")
    for org, live in rows:
        view = merged_view(org, live)
        status = view["status"] if view["source"] == "workflow" else f"{view['status']} (db)"
        table.add_row(
            f"{org.id} {safe(org.name)}",
            status,
            when(view["subscription_end"]),
            safe(view["stripe_customer_id"] or "-"),
            safe(view["last_event"] or "-"),
            safe(view["last_error"] or ""),
        )
    return table


def key_value_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in values.items():
        if isinstance(value, datetime):
            shown = when(value)
        elif value is None or value == "":
            shown = "-"
        else:
            shown = safe(value)
        table.add_row(safe(key), shown)
    return table


def state_fields(state: OrgBillingState) -> dict[str, Any]:
    return {
        "status": state.status.value,
        "stripe_customer_id": state.stripe_customer_id,
        "stripe_subscription_id": state.stripe_subscription_id,
        "subscription_status": state.subscription_status.value
        if state.subscription_status
        else None,
        "subscription_end": state.subscription_end,
        "trial_end": state.trial_end,
        "current_period": f"{when(state.current_period_start)} → {when(state.current_period_end)}"
        if state.current_period_start
        else None,
        "pause_collection": state.pause_collection or None,
        "last_event": f"{state.last_event_type} ({state.last_event_id})"
        if state.last_event_type
        else None,
        "last_error": state.last_error,
        "problem": state.problem.value if state.problem else None,
        "failed_events": ", ".join(
            f"{f.event.event_id} (try {f.attempts}, next {when(f.retry_at)}): {f.error}"
            for f in state.failed_events
        )
        or None,
        "last_synced_at": state.last_synced_at,
    }


def last_ended_period(state: OrgBillingState) -> UsagePeriodReport | None:
    """The usage the workflow reported for the newest period that has ended."""
    if state.current_period_start is None:
        return None
    ended = [u for u in state.usage if u.period_end <= state.current_period_start]
    return max(ended, key=lambda u: u.period_end, default=None)


def money(amount: int, currency: str) -> str:
    symbol = "$" if currency.lower() == "usd" else f"{currency.upper()} "
    return f"{symbol}{amount / 100:,.2f}"


def ended_period_fields(report: UsagePeriodReport, invoice: dict[str, Any] | str) -> dict[str, Any]:
    """The `orgs show` rows for the last ended period; `invoice` is Stripe's, or why none."""
    if isinstance(invoice, str):
        billed = invoice
    else:
        billed = (
            f"{invoice['id']}  {money(int(invoice['total']), str(invoice['currency']))}  "
            f"{invoice['status']}"
        )
    return {
        "period": f"{when(report.period_start)} → {when(report.period_end)}",
        "users": report.users,
        "requests": report.requests,
        "reported_at": report.last_reported_at,
        "note": report.skipped_reason,
        "invoice": billed,
    }


def usage_table(result: UsageReportResult) -> Table:
    table = Table(title=f"Usage reported for org {result.org_id}", title_justify="left")
    table.add_column("period")
    table.add_column("users", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("meter events sent", justify="right")
    table.add_column("note", overflow="fold")
    for period in result.periods:
        table.add_row(
            f"{when(period.period_start)} → {when(period.period_end)}",
            str(period.users),
            str(period.requests),
            str(period.meter_events_sent),
            safe(period.skipped_reason or ""),
        )
    return table


def reconcile_table(results: list[ReconcileResult]) -> Table:
    table = Table(title="Reconcile", title_justify="left")
    table.add_column("org")
    table.add_column("status")
    table.add_column("field")
    table.add_column("before", overflow="fold")
    table.add_column("after", overflow="fold")
    for result in results:
        if not result.differences:
            table.add_row(str(result.org_id), result.status.value, "(in sync)", "", "")
        for diff in result.differences:
            table.add_row(
                str(result.org_id),
                result.status.value,
                diff.field,
                safe(diff.before or "-"),
                safe(diff.after or "-"),
            )
    return table
