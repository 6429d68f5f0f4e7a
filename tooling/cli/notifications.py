"""`billing notifications list`, `redeliver` and `prune`: the outbox to the console."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from billing.db import notifications
from billing.db.models import Notification
from tooling.cli.context import fail, out, print_json, state_of
from tooling.cli.render import when
from tooling.cli.text import safe

app = typer.Typer(help="Notifications sent to the console.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _document(row: Notification) -> dict[str, Any]:
    return {
        "id": row.id,
        "org_id": row.org_id,
        "type": row.type,
        "status": row.status.value,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "next_attempt_at": row.next_attempt_at,
        "delivered_at": row.delivered_at,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
    }


@app.command("list")
def list_(
    ctx: typer.Context,
    org: Annotated[int | None, typer.Option("--org", help="Only this org's.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only those given up.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """The newest notifications, with what became of each."""
    if org is not None and org < 1:
        fail(f"--org must be an org id (1 or more), not {org}.")
    if not 1 <= limit <= 10_000:
        fail(f"--limit must be between 1 and 10000, not {limit}.")
    state = state_of(ctx)
    with state.session() as session:
        rows = [
            _document(r)
            for r in notifications.list_notifications(
                session, org_id=org, failed=failed, limit=limit
            )
        ]
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("No notifications.")
        return
    table = Table(title="Notifications (newest first)")
    for column in ("id", "org", "type", "status", "attempts", "created", "last error"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["id"],
            str(r["org_id"]),
            safe(r["type"]),
            r["status"],
            str(r["attempts"]),
            when(r["created_at"]),
            safe(r["last_error"] or ""),
        )
    out.print(table)


@app.command("redeliver")
def redeliver(
    ctx: typer.Context,
    notification_id: Annotated[str, typer.Argument(help="The notification's id (msg_...).")],
    as_json: JsonOption = False,
) -> None:
    """Send a notification again (same id, so the console deduplicates), before the org's later
    ones; its retries start over."""
    if not notification_id.strip() or len(notification_id) > 64:
        fail(f"{safe(notification_id)!r} is not a notification id (msg_..., see `list`).")
    state = state_of(ctx)
    with state.session() as session:
        row = notifications.redeliver(session, notification_id.strip(), datetime.now(UTC))
        document = _document(row) if row is not None else None
    if document is None:
        fail(f"No notification {safe(notification_id)!r}; `billing notifications list` shows them.")
    if as_json:
        print_json(document)
        return
    out.print(
        f"Notification {document['id']} of org {document['org_id']} is queued for delivery "
        "again (the worker sends it)."
    )


PRUNE_BATCH = 10_000
MAX_PRUNE_BATCHES = 100_000


@app.command("prune")
def prune(
    ctx: typer.Context,
    older_than_days: Annotated[
        int,
        typer.Option(
            "--older-than-days",
            help="Delete delivered notifications delivered more than this many days ago.",
        ),
    ] = 30,
    include_failed: Annotated[
        bool,
        typer.Option(
            "--include-failed",
            help="Also delete failed ones written (or queued again) more than that long ago.",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per transaction.")
    ] = PRUNE_BATCH,
    as_json: JsonOption = False,
) -> None:
    """Delete old delivered (and with --include-failed, failed) notifications, in batches;
    pending ones are never deleted."""
    if not 0 <= older_than_days <= 36_600:
        fail(f"--older-than-days must be between 0 and 36600, not {older_than_days}.")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, not {batch_size}.")
    state = state_of(ctx)
    before = datetime.now(UTC) - timedelta(days=older_than_days)
    deleted = 0
    for _ in range(MAX_PRUNE_BATCHES):
        with state.session() as session:
            batch = notifications.prune(
                session, before=before, include_failed=include_failed, limit=batch_size
            )
        deleted += batch
        if batch < batch_size:
            break
    if as_json:
        print_json({"deleted": deleted, "before": before, "include_failed": include_failed})
        return
    kinds = "delivered and failed" if include_failed else "delivered"
    out.print(f"Deleted {deleted} {kinds} notifications older than {before.isoformat()}.")
