"""billing_admin membership role

A billing admin may open the org's billing portal like its owner; the CHECK
constraint on `memberships.role` gains the value. Downgrading turns billing
admins back into plain members (the safe direction: they lose billing rights).

Revision ID: 0004_billing_admin_role
Revises: 0003_membership_history
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_billing_admin_role"
down_revision: str | None = "0003_membership_history"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_memberships_role"


def upgrade() -> None:
    op.drop_constraint(CONSTRAINT, "memberships", type_="check")
    op.create_check_constraint(
        CONSTRAINT, "memberships", "role IN ('owner', 'billing_admin', 'member')"
    )


def downgrade() -> None:
    op.execute("UPDATE memberships SET role = 'member' WHERE role = 'billing_admin'")
    op.drop_constraint(CONSTRAINT, "memberships", type_="check")
    op.create_check_constraint(CONSTRAINT, "memberships", "role IN ('owner', 'member')")
