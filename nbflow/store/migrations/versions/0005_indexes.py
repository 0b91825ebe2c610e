"""index file_seen.run_id: deleting runs (retention) without a scan of file_seen per run

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 23:40:00.000000

``file_seen.run_id`` references ``run.id`` with ``ON DELETE SET NULL``. Without an index every deleted run
makes the database scan the whole ``file_seen`` table to clear its references (PostgreSQL's foreign key
trigger, SQLite's foreign key check), and ``nbflow.services.retention`` clearing them itself would scan it once per
batch. Every other query checked with big histories (bench/big_history.py --plans) already has its index.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("file_seen", schema=None) as batch_op:
        batch_op.create_index("ix_file_seen_run_id", ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("file_seen", schema=None) as batch_op:
        batch_op.drop_index("ix_file_seen_run_id")
