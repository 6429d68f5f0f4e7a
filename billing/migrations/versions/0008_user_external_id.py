"""users.external_id: the console's own id for a user

The console's identity provider names a user by its own id (the token's `sub`
with `AUTH_JWT_USER_CLAIM=sub`); members keep it here, unique, and null for
users the console never named.

Revision ID: 0008_user_external_id
Revises: 0004_billing_admin_role
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_user_external_id"
down_revision: str | None = "0004_billing_admin_role"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("external_id", sa.String(255), nullable=True))
    op.create_unique_constraint("uq_users_external_id", "users", ["external_id"])


def downgrade() -> None:
    op.drop_constraint("uq_users_external_id", "users", type_="unique")
    op.drop_column("users", "external_id")
