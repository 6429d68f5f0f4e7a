"""entitlement on the org row, and the notifications outbox

`orgs.entitled` and `orgs.access_until` hold the entitlement rule's answer
(billing/entitlement.py), written by the org's workflow whenever it changes,
for consoles that read the database. Existing rows start entitled, as the
rule has every org before its workflow publishes.

`notifications` is the outbox of notifications to the console: the org's
workflow writes them (the id is stable per change), the worker's delivery
loop sends them in `position` order per org (docs/notifications.md).

Revision ID: 0007_entitlement
Revises: 0006_service_api
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_entitlement"
down_revision: str | None = "0006_service_api"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "orgs",
        sa.Column("entitled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column("orgs", sa.Column("access_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "notifications",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column(
            "org_id", sa.Integer(), sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.UniqueConstraint("position", name="uq_notifications_position"),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')", name="ck_notifications_status"
        ),
    )
    op.create_index("ix_notifications_org_position", "notifications", ["org_id", "position"])
    op.create_index(
        "ix_notifications_pending",
        "notifications",
        ["org_id", "position"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_table("notifications")
    op.drop_column("orgs", "access_until")
    op.drop_column("orgs", "entitled")
