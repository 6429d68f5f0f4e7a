"""`billing members ...`: change who is in an org (what the users meter counts)."""

from __future__ import annotations

from typing import Annotated

import typer

from billing.db import orgs
from billing.domain import MembershipRole
from tooling.cli.context import out, print_json, state_of
from tooling.cli.text import safe

app = typer.Typer(help="Add or remove an org's members.", no_args_is_help=True)

OrgArgument = Annotated[int, typer.Argument(help="The org's id.")]
EmailOption = Annotated[str, typer.Option("--email", help="The member's email.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


@app.command("add")
def add(
    ctx: typer.Context,
    org_id: OrgArgument,
    email: EmailOption,
    name: Annotated[str | None, typer.Option("--name", help="Full name of a new user.")] = None,
    role: Annotated[
        str,
        typer.Option(
            "--role",
            help="member, or billing_admin: may open the billing portal like the owner.",
        ),
    ] = MembershipRole.MEMBER.value,
    as_json: JsonOption = False,
) -> None:
    """Add a user (created if new) to the org, or give a current member another role."""
    with state_of(ctx).session() as session:
        granted = orgs.grantable_role(role)
        before = {m.email: m.role for m in orgs.list_members(session, org_id)}
        user = orgs.add_member(session, org_id, email, name, granted)
        members = len(orgs.list_members(session, org_id))
    previous = before.get(user.email)
    if as_json:
        print_json(
            {
                "org_id": org_id,
                "email": user.email,
                "role": granted,
                "previous_role": previous,
                "members": members,
            }
        )
        return
    if previous is not None:
        out.print(f"{safe(user.email)} is now {granted} of org {org_id} (was {previous}).")
        return
    out.print(
        f"Added {safe(user.email)} to org {org_id} as {granted}; it now has {members} members."
    )


@app.command("remove")
def remove(
    ctx: typer.Context, org_id: OrgArgument, email: EmailOption, as_json: JsonOption = False
) -> None:
    """Remove a member from the org (never its owner)."""
    with state_of(ctx).session() as session:
        user = orgs.remove_member(session, org_id, email)
        members = len(orgs.list_members(session, org_id))
    if as_json:
        print_json({"org_id": org_id, "email": user.email, "removed": True, "members": members})
        return
    out.print(f"Removed {safe(user.email)} from org {org_id}; it now has {members} members.")
