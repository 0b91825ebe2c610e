"""worker.slots: how many runs a live runner executes at once, null for a runner older than this

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:00:00.000000

Written by the runner when it registers (and when its beat brings back a row the reaper forgot), read by
``/metrics`` (``nbflow_runner_slots``, and the free slots: slots minus the runs the live runners hold).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("worker", sa.Column("slots", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Not batch_alter_table (a rebuild on SQLite): ALTER TABLE ... DROP COLUMN, PostgreSQL and SQLite 3.35+.
    op.execute("ALTER TABLE worker DROP COLUMN slots")
