"""run counts kept by the database: run_count, run_count_delta and triggers on run, backfilled

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 10:00:00.000000

An exact ``COUNT(*)`` of the runs in a state is an index scan of every such run: linear in the history
(COMPLETED at 1,000,000 runs: ~120 ms on SQLite, bench/big_history.py). Counting as rows change costs a
few microseconds per write instead, and done by triggers it covers every writer: the ORM, the
scheduler's Core bulk inserts, retention's deletes, a flow's cascade, raw SQL. See ``nbflow.core.counts``.

PostgreSQL: the triggers append to ``run_count_delta`` and never update a shared row, so concurrent
writers never wait on one another (one counter row per state would serialise every claim and finish,
and two transactions touching two counters in opposite orders would deadlock). INSERT and DELETE are
statement-level triggers over transition tables: a bulk insert or a prune batch of 500 runs appends one
row per (state, flow) it touched, not one per run. UPDATE is a row-level trigger whose WHEN clause the
server checks without calling the function, so a lease beat (an UPDATE of ``heartbeat_at``) costs
nothing; transition tables cannot be combined with ``UPDATE OF state`` and would capture every beat.
TRUNCATE empties the counters. The housekeeping leader folds deltas into ``run_count`` (``compact``).

SQLite: row-level triggers update ``run_count`` directly. SQLite has one writer at a time, so there is
no contention to avoid and no delta to fold.

Caution for later migrations: SQLite's ``batch_alter_table("run")`` rebuilds the table and drops its
triggers. A migration doing that must create them again (``create_triggers`` below);
tests/test_counts.py checks they exist at head.

The backfill runs after the triggers exist, in the same transaction, with ``run`` locked against writes
on PostgreSQL (SQLite's write transaction excludes other writers): no run is counted twice or missed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PG_FUNCTIONS = {
    "nbflow_run_count_insert": """
        INSERT INTO run_count_delta (state, flow_id, n)
        SELECT state, flow_id, count(*) FROM nbflow_new_runs GROUP BY state, flow_id;
        RETURN NULL;""",
    "nbflow_run_count_delete": """
        INSERT INTO run_count_delta (state, flow_id, n)
        SELECT state, flow_id, -count(*) FROM nbflow_old_runs GROUP BY state, flow_id;
        RETURN NULL;""",
    "nbflow_run_count_update": """
        INSERT INTO run_count_delta (state, flow_id, n)
        VALUES (OLD.state, OLD.flow_id, -1), (NEW.state, NEW.flow_id, 1);
        RETURN NULL;""",
    "nbflow_run_count_truncate": """
        DELETE FROM run_count_delta;
        DELETE FROM run_count;
        RETURN NULL;""",
}

PG_TRIGGERS = (
    "CREATE TRIGGER run_count_insert AFTER INSERT ON run REFERENCING NEW TABLE AS nbflow_new_runs "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbflow_run_count_insert()",
    "CREATE TRIGGER run_count_delete AFTER DELETE ON run REFERENCING OLD TABLE AS nbflow_old_runs "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbflow_run_count_delete()",
    "CREATE TRIGGER run_count_update AFTER UPDATE OF state, flow_id ON run FOR EACH ROW "
    "WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.flow_id IS DISTINCT FROM NEW.flow_id) "
    "EXECUTE FUNCTION nbflow_run_count_update()",
    "CREATE TRIGGER run_count_truncate AFTER TRUNCATE ON run "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbflow_run_count_truncate()",
)

_SQLITE_PLUS = ("INSERT INTO run_count (state, flow_id, n) VALUES (NEW.state, NEW.flow_id, 1) "
                "ON CONFLICT (state, flow_id) DO UPDATE SET n = n + 1;")
_SQLITE_MINUS = "UPDATE run_count SET n = n - 1 WHERE state = OLD.state AND flow_id = OLD.flow_id;"
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER run_count_insert AFTER INSERT ON run BEGIN {_SQLITE_PLUS} END",
    f"CREATE TRIGGER run_count_delete AFTER DELETE ON run BEGIN {_SQLITE_MINUS} END",
    "CREATE TRIGGER run_count_update AFTER UPDATE OF state, flow_id ON run "
    "WHEN OLD.state IS NOT NEW.state OR OLD.flow_id IS NOT NEW.flow_id "
    f"BEGIN {_SQLITE_MINUS} {_SQLITE_PLUS} END",
)
TRIGGER_NAMES = ("run_count_insert", "run_count_delete", "run_count_update", "run_count_truncate")


def create_triggers() -> None:
    """The counting triggers on ``run`` for the current dialect (also for a later migration that
    rebuilds ``run`` on SQLite)."""
    if op.get_bind().dialect.name == "postgresql":
        for name, body in PG_FUNCTIONS.items():
            op.execute(f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
                       f"BEGIN{body}\nEND\n$$")
        for statement in PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def drop_triggers() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON run" if postgresql else f"DROP TRIGGER IF EXISTS {name}")
    if postgresql:
        for name in PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")


def upgrade() -> None:
    op.create_table(
        "run_count",
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("flow_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("state", "flow_id"),
    )
    with op.batch_alter_table("run_count", schema=None) as batch_op:
        batch_op.create_index("ix_run_count_flow", ["flow_id"], unique=False)
    op.create_table(
        "run_count_delta",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("flow_id", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # What CREATE TRIGGER takes anyway, taken first: no write to run lands between the triggers and
        # the backfill's snapshot, so each run is counted exactly once.
        op.execute("LOCK TABLE run IN SHARE ROW EXCLUSIVE MODE")
    create_triggers()
    op.execute("INSERT INTO run_count (state, flow_id, n) SELECT state, flow_id, count(*) FROM run "
               "GROUP BY state, flow_id")


def downgrade() -> None:
    drop_triggers()
    op.drop_table("run_count_delta")
    with op.batch_alter_table("run_count", schema=None) as batch_op:
        batch_op.drop_index("ix_run_count_flow")
    op.drop_table("run_count")
