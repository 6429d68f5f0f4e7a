"""Service API: closed orgs, users' external ids, usage item ids

- `orgs.closed_at`: when the org was closed (`DELETE /api/orgs/{org_id}`); the
  rows stay for audit.
- `users.external_id`: the console's own id of a user
  (`PUT /api/orgs/{org_id}/members/{user_external_id}`), unique when set.
- `request_log.item_id`: the id a usage item was sent with
  (`POST /api/orgs/{org_id}/usage`), unique per org when set, so a repeated
  batch adds nothing. Rows the host application writes itself leave it empty
  and pay nothing for the index (it is partial).

Revision ID: 0006_service_api
Revises: 0004_billing_admin_role
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_service_api"
down_revision: str | None = "0004_billing_admin_role"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orgs", sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("external_id", sa.String(length=255), nullable=True))
    op.create_index(
        "uq_users_external_id",
        "users",
        ["external_id"],
        unique=True,
        postgresql_where=sa.text("external_id IS NOT NULL"),
    )
    op.add_column("request_log", sa.Column("item_id", sa.String(length=255), nullable=True))
    op.create_index(
        "uq_request_log_org_item",
        "request_log",
        ["org_id", "item_id"],
        unique=True,
        postgresql_where=sa.text("item_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_request_log_org_item", table_name="request_log")
    op.drop_column("request_log", "item_id")
    op.drop_index("uq_users_external_id", table_name="users")
    op.drop_column("users", "external_id")
    op.drop_column("orgs", "closed_at")
