"""request_log at scale: a covering index for period sums, a BRIN index for retention

Revision ID: 0003_request_log_scale
Revises: 0002_stripe_rate
Create Date: 2026-12-01 12:00:00

A period's request sum reads one org's rows in a time range. With `count` in the
index (INCLUDE), that is an index-only scan over consecutive index entries; the
old index had to visit a heap page per row, and rows arrive in time order, so
one org's rows sit on as many pages as it has rows. The BRIN index (a few pages
for millions of rows, since rows arrive in time order) finds old rows for the
retention delete (docs/operations.md, "request_log retention"). Index-only scans
need the visibility map: autovacuum visits this append-only table after 1 % new
rows instead of 20 %.

Built CONCURRENTLY so a live table keeps taking inserts while it runs.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_request_log_scale"
down_revision: str | None = "0002_stripe_rate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_request_log_org_time_count",
            "request_log",
            ["org_id", "occurred_at"],
            postgresql_include=["count"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_request_log_org_time",
            table_name="request_log",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            "ix_request_log_occurred_brin",
            "request_log",
            ["occurred_at"],
            postgresql_using="brin",
            postgresql_concurrently=True,
            if_not_exists=True,
        )
    op.execute(
        "ALTER TABLE request_log SET (autovacuum_vacuum_insert_scale_factor = 0.01,"
        " autovacuum_vacuum_insert_threshold = 10000)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE request_log RESET (autovacuum_vacuum_insert_scale_factor,"
        " autovacuum_vacuum_insert_threshold)"
    )
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_request_log_occurred_brin",
            table_name="request_log",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            "ix_request_log_org_time",
            "request_log",
            ["org_id", "occurred_at"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_request_log_org_time_count",
            table_name="request_log",
            postgresql_concurrently=True,
            if_exists=True,
        )
