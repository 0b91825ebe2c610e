"""many workers: the worker registry, flow.labels, housekeeping leader leases

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "leader",
        sa.Column("role", sa.String(length=50), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("role"),
    )
    with op.batch_alter_table("flow", schema=None) as batch_op:
        # Existing flows need no label: any worker keeps claiming their runs.
        batch_op.add_column(sa.Column("labels", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                                      server_default="[]", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("flow", schema=None) as batch_op:
        batch_op.drop_column("labels")

    op.drop_table("leader")
    op.drop_table("worker")
