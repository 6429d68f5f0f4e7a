"""membership history and the org row's sync stamp

Memberships keep when a user joined and left an org: leaving sets `left_at`
instead of deleting the row, so the users meter reports the level as of each
period's end, not the count when the report happens to run. A user who comes
back gets a new row; only one membership per user and org is current.

`orgs.stripe_synced_at` stamps the Stripe read the row holds, so an older read
(an activity retried after it woke up late) never overwrites a newer one.

Revision ID: 0003_membership_history
Revises: 0003_request_log_scale
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_membership_history"
down_revision: str | None = "0003_request_log_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "memberships",
        sa.Column(
            "joined_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )
    op.add_column("memberships", sa.Column("left_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE memberships SET joined_at = created_at")
    op.drop_constraint("uq_memberships_org_user", "memberships", type_="unique")
    op.create_index(
        "uq_memberships_org_user_current",
        "memberships",
        ["org_id", "user_id"],
        unique=True,
        postgresql_where=sa.text("left_at IS NULL"),
    )
    op.create_index("ix_memberships_org_joined", "memberships", ["org_id", "joined_at"])
    op.add_column("orgs", sa.Column("stripe_synced_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("orgs", "stripe_synced_at")
    # Without history, only current memberships can stay.
    op.execute("DELETE FROM memberships WHERE left_at IS NOT NULL")
    op.drop_index("ix_memberships_org_joined", table_name="memberships")
    op.drop_index(
        "uq_memberships_org_user_current",
        table_name="memberships",
        postgresql_where=sa.text("left_at IS NULL"),
    )
    op.create_unique_constraint("uq_memberships_org_user", "memberships", ["org_id", "user_id"])
    op.drop_column("memberships", "left_at")
    op.drop_column("memberships", "joined_at")
