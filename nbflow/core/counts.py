"""Exact run counts by state and flow without scanning the history: read and compact the counters.

Why: ``SELECT count(*) FROM run WHERE state = 'COMPLETED'`` scans every completed run's index entry, so
it grows with the history (~120 ms at 1,000,000 runs on SQLite), and the dashboard asks for a count at
every refresh. Migration 0006 makes the database keep the counts itself, with triggers on ``run``, so
that every writer is counted (the ORM, Core bulk inserts, retention's deletes, cascades, raw SQL) with no
code path to remember:

* ``run_count`` (``RunCount``): one row per (state, flow) with its count.
* ``run_count_delta`` (``RunCountDelta``, PostgreSQL only): the triggers append +k / -k rows instead of
  updating ``run_count``, so concurrent writers never wait on a shared counter row (nor deadlock on two).

A count is ``SUM(n)`` over the matching rows of both tables, read in one statement (one snapshot: a
compaction committing meanwhile is seen entirely or not at all). ``compact`` folds deltas into
``run_count``; the reaper leader runs it with each reaper pass (``nbflow.services.runner.Runner.step``) and a
reader that had to sum many deltas runs it too (``LocalBackend.count_runs``), so the delta table stays
small even where no runner leads. SQLite's triggers update ``run_count`` directly (one writer at a time:
nothing to contend on), so there ``compact`` only drops rows that reached zero.

If the counters are ever wrong (triggers dropped by hand, or by a later migration rebuilding ``run`` on
SQLite: see migration 0006), ``recount`` rebuilds them from ``run``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, literal, select, text, union_all
from sqlalchemy.orm import Session

from nbflow.store import Store
from nbflow.store.models import RunCount, RunCountDelta, Worker, utcnow

# A read that sums more delta rows than this compacts them (bounds the cost of the next reads when the
# leader's pass is far off or no runner leads, e.g. runs created by ``nbflow trigger`` with no worker).
COMPACT_AT = 20_000
# Delta rows folded per transaction: keeps each compaction short however far behind it is.
BATCH = 100_000
# Advisory lock (with the schema's hash): one compaction at a time per schema (cf. the migration's, 727001).
_PG_LOCK = 727006


def _parts(state: str | None, flow_id: int | None) -> Any:
    """Matching rows of both tables, each with a flag saying whether it is a delta."""
    base = select(RunCount.state, RunCount.n, literal(0).label("pending"))
    deltas = select(RunCountDelta.state, RunCountDelta.n, literal(1).label("pending"))
    if state is not None:
        base, deltas = base.where(RunCount.state == state), deltas.where(RunCountDelta.state == state)
    if flow_id is not None:
        base, deltas = base.where(RunCount.flow_id == flow_id), deltas.where(RunCountDelta.flow_id == flow_id)
    return union_all(base, deltas).subquery()


def read(session: Session, *, state: str | None = None, flow_id: int | None = None) -> tuple[int, int]:
    """(runs in ``state`` of flow ``flow_id``, either None for all; delta rows summed to know it)."""
    parts = _parts(state, flow_id)
    n, pending = session.execute(
        select(func.coalesce(func.sum(parts.c.n), 0), func.coalesce(func.sum(parts.c.pending), 0))).one()
    return int(n), int(pending)


def count(session: Session, *, state: str | None = None, flow_id: int | None = None) -> int:
    """Runs in ``state`` (a ``StateType`` value) of flow ``flow_id``; None means any."""
    return read(session, state=state, flow_id=flow_id)[0]


def by_state(session: Session, *, flow_id: int | None = None) -> dict[str, int]:
    """Runs per state (of one flow, or all), states without runs left out: one small query."""
    parts = _parts(None, flow_id)
    rows = session.execute(select(parts.c.state, func.sum(parts.c.n)).group_by(parts.c.state)).all()
    return {state: int(n) for state, n in rows if n}


def queue(session: Session, *, runners_seen_since: datetime) -> dict[str, int]:
    """What waits and what runs, and how many runners are live (seen since ``runners_seen_since``): the
    dashboard's queue line, read at every refresh. One statement over the counters and the small workers
    table, so it costs the same with 100 runs or 1,000,000. ``running`` counts CANCELLING runs too: their
    kernels still hold a runner's slot until they end."""
    def total(*states: str) -> Any:
        parts = _parts(None, None)
        return select(func.coalesce(func.sum(parts.c.n), 0)).where(parts.c.state.in_(states)).scalar_subquery()

    live = select(func.count()).select_from(Worker).where(Worker.last_seen_at >= runners_seen_since).scalar_subquery()
    waiting, running, runners = session.execute(select(total("PENDING"), total("RUNNING", "CANCELLING"), live)).one()
    return {"pending": int(waiting), "running": int(running), "runners": int(runners)}


def queue_summary(store: Store, lease_seconds: float) -> dict[str, int]:
    """``{"pending", "running", "runners"}`` with the registry's lease rule (``nbflow.core.workers``: a runner
    seen within a lease is live): the dashboard's queue line and ``GET /api/queue``."""
    with store.read() as session:
        return queue(session, runners_seen_since=utcnow() - timedelta(seconds=lease_seconds))


def by_flow_and_state(session: Session, states: list[str]) -> dict[tuple[int, str], int]:
    """Runs per (flow id, state) for ``states``, zeros left out: one small query (``/metrics``)."""
    both = union_all(select(RunCount.flow_id, RunCount.state, RunCount.n).where(RunCount.state.in_(states)),
                     select(RunCountDelta.flow_id, RunCountDelta.state, RunCountDelta.n)
                     .where(RunCountDelta.state.in_(states))).subquery()
    rows = session.execute(select(both.c.flow_id, both.c.state, func.sum(both.c.n))
                           .group_by(both.c.flow_id, both.c.state)).all()
    return {(flow_id, state): int(n) for flow_id, state, n in rows if n}


def pending(session: Session) -> int:
    """Delta rows not yet folded into ``run_count``."""
    return int(session.execute(select(func.count()).select_from(RunCountDelta)).scalar_one())


def compact(store: Store, *, batch: int = BATCH) -> int:
    """Fold delta rows into ``run_count`` and drop counters at zero; returns how many deltas were folded.

    PostgreSQL: per transaction, one statement deletes up to ``batch`` deltas and adds their sums to
    ``run_count`` (``DELETE ... RETURNING`` feeding ``INSERT ... ON CONFLICT DO UPDATE``), so a delta is
    folded exactly once, even one committed by a writer while this runs (then it is not seen by the
    delete and waits for the next pass). Only this touches ``run_count`` there; an advisory lock makes a
    second compaction (a reader's while the leader's runs) skip instead of wait. Writers never wait on it.
    """
    if store.dialect != "postgresql":
        return _compact_sqlite(store)
    folded = 0
    while True:
        with store.write() as session:
            if not session.execute(text("SELECT pg_try_advisory_xact_lock(:k, hashtext(current_schema()))"),
                                   {"k": _PG_LOCK}).scalar():
                return folded
            moved = int(session.execute(text(
                "WITH moved AS (DELETE FROM run_count_delta WHERE id IN "
                "  (SELECT id FROM run_count_delta ORDER BY id LIMIT :batch) RETURNING state, flow_id, n), "
                "folded AS (INSERT INTO run_count (state, flow_id, n) "
                "  SELECT state, flow_id, sum(n) FROM moved GROUP BY state, flow_id ORDER BY state, flow_id "
                "  ON CONFLICT (state, flow_id) DO UPDATE SET n = run_count.n + excluded.n RETURNING 1) "
                "SELECT count(*) FROM moved"), {"batch": batch}).scalar_one())
            session.execute(delete(RunCount).where(RunCount.n == 0))
        folded += moved
        if moved < batch:
            return folded


def _compact_sqlite(store: Store) -> int:
    """One write transaction (SQLite has one writer at a time, so nothing lands between its statements).
    Its triggers write no deltas; this folds any that raw SQL added and drops counters at zero."""
    folded = 0
    with store.write() as session:
        top = session.execute(select(func.max(RunCountDelta.id))).scalar()
        if top is not None:
            session.execute(text(
                "INSERT INTO run_count (state, flow_id, n) SELECT state, flow_id, sum(n) FROM run_count_delta "
                "WHERE id <= :top GROUP BY state, flow_id "
                "ON CONFLICT (state, flow_id) DO UPDATE SET n = run_count.n + excluded.n"), {"top": top})
            folded = session.execute(delete(RunCountDelta).where(RunCountDelta.id <= top)).rowcount
        session.execute(delete(RunCount).where(RunCount.n == 0))
    return folded


def recount(store: Store) -> None:
    """Rebuild the counters from ``run`` (a repair: the triggers keep them exact otherwise). One scan of
    the history, with ``run`` locked against writes on PostgreSQL so no change is missed or doubled."""
    with store.write() as session:
        if store.dialect == "postgresql":
            session.execute(text("LOCK TABLE run IN SHARE ROW EXCLUSIVE MODE"))
        session.execute(delete(RunCountDelta))
        session.execute(delete(RunCount))
        session.execute(text("INSERT INTO run_count (state, flow_id, n) "
                             "SELECT state, flow_id, count(*) FROM run GROUP BY state, flow_id"))


def count_runs(store: Store, *, flow: str | None = None, state: str | None = None) -> int:
    """How many runs (of ``flow``, in state type ``state``, any case) exist: exact, from the counters the
    database keeps, a sum over a few rows per (state, flow) whatever the history, where ``COUNT(*)``
    scanned every matching run. What the widgets and ``GET /api/runs/count`` show."""
    from nbflow.core import states
    from nbflow.core.flows import get_flow
    from nbflow.errors import InvalidQuery

    with store.read() as session:
        flow_id = get_flow(session, flow).id if flow else None
        if state and state.upper() not in states.StateType.__members__:
            raise InvalidQuery(f"unknown state {state!r}; states: {', '.join(states.StateType)}")
        n, pending = read(session, state=state.upper() if state else None, flow_id=flow_id)
    if pending >= COMPACT_AT:  # no leader folded them lately: keep the next reads small
        compact(store)
    return n
