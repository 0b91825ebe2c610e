"""schedule.error: why the scheduler could not fire a schedule, shown by ``nbflow schedule list``

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 15:40:00.000000

A schedule row the scheduler cannot use (a definition stored by an old version that no longer parses, a
trigger that cannot compute its next slot, parameters that no longer fit the notebook) used to stop the
whole pass, or be skipped with only a line on the scheduler's stderr. The scheduler now records the
reason on the row (and pauses it when its definition is unusable); adding the schedule again clears it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("schedule", sa.Column("error", sa.Text(), nullable=True))


def downgrade() -> None:
    # Not batch_alter_table: on SQLite it rebuilds ``schedule``, and dropping the old table (foreign keys
    # on) would set every run's ``schedule_id`` to NULL, losing the slot keys that make each slot fire
    # once. ALTER TABLE ... DROP COLUMN: PostgreSQL, and SQLite 3.35+.
    op.execute("ALTER TABLE schedule DROP COLUMN error")
