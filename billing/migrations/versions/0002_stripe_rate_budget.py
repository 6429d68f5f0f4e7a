"""stripe request budget: the next free slot of each environment's Stripe budget

Revision ID: 0002_stripe_rate
Revises: 0001
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_stripe_rate"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stripe_request_budget",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    # Updated by every Stripe request: leave room on the page so each update is a
    # HOT update pruned in place, never a new page or index entry.
    op.execute("ALTER TABLE stripe_request_budget SET (fillfactor = 10)")


def downgrade() -> None:
    op.drop_table("stripe_request_budget")
