"""concurrency limits, pipelines, file triggers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 20:00:14.351485
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tag_limit",
        sa.Column("tag", sa.String(length=200), nullable=False),
        sa.Column("limit", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tag"),
    )
    op.create_table(
        "file_trigger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flow_id", sa.Integer(), nullable=False),
        sa.Column("pattern", sa.Text(), nullable=False),
        sa.Column("parameter", sa.String(length=200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flow_id"], ["flow.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("flow_id", "pattern"),
    )
    op.create_table(
        "flow_dependency",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flow_id", sa.Integer(), nullable=False),
        sa.Column("upstream_flow_id", sa.Integer(), nullable=False),
        sa.Column("on", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flow_id"], ["flow.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["upstream_flow_id"], ["flow.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("flow_id", "upstream_flow_id"),
    )
    with op.batch_alter_table("flow_dependency", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_flow_dependency_upstream_flow_id"), ["upstream_flow_id"], unique=False)

    op.create_table(
        "file_seen",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["run.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["trigger_id"], ["file_trigger.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("trigger_id", "path"),
    )
    with op.batch_alter_table("flow", schema=None) as batch_op:
        batch_op.add_column(sa.Column("collision", sa.String(length=20), server_default="enqueue", nullable=False))

    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.create_index("ix_run_parent", ["parent_run_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_index("ix_run_parent")

    with op.batch_alter_table("flow", schema=None) as batch_op:
        batch_op.drop_column("collision")

    op.drop_table("file_seen")
    with op.batch_alter_table("flow_dependency", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_flow_dependency_upstream_flow_id"))

    op.drop_table("flow_dependency")
    op.drop_table("file_trigger")
    op.drop_table("tag_limit")
