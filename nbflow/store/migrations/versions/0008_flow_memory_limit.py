"""flow.memory_limit: a flow's memory limit in bytes (nbflow.execution.containment), null for none

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 16:00:00.000000

Set on the run's kernel group by the worker that runs it, where cgroups allow it; a worker that cannot
enforce it says so in the run's log. On ``flow`` only, read when an attempt starts: adding it to ``run``
would need SQLite's table rebuild of ``run`` (and its counting triggers, see 0006) for a setting that is
the flow's.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("flow", sa.Column("memory_limit", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Not batch_alter_table: on SQLite it rebuilds ``flow``, and dropping the old table (foreign keys on)
    # would cascade to every run. ALTER TABLE ... DROP COLUMN: PostgreSQL, and SQLite 3.35+.
    op.execute("ALTER TABLE flow DROP COLUMN memory_limit")
