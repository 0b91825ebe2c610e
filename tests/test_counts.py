"""Run counts kept by the database (migration 0006, ``nbflow.core.counts``): after every kind of writer, and
with compactions in between, they equal ``SELECT count(*) ... GROUP BY state, flow_id``, on SQLite and
PostgreSQL; concurrent writers neither deadlock nor lose a count; the migration backfills."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from helpers import at_once, make_notebook
from sqlalchemy import func, insert, select, text, update

from nbflow.core import counts, states
from nbflow.core.flows import FlowOptions, register
from nbflow.core.runs import create_run, request_cancel, retry_run
from nbflow.jupyter.backend import LocalBackend
from nbflow.services.retention import prune
from nbflow.services.runner import Runner, claim
from nbflow.store import Store, open_store
from nbflow.store.database import MIGRATIONS_DIR
from nbflow.store.models import Flow, FlowVersion, Run, RunCount, RunCountDelta, utcnow

S = states.S
TRIGGERS = {"run_count_insert", "run_count_delete", "run_count_update"}


def exact(store: Store) -> dict[tuple[str, int], int]:
    with store.read() as session:
        return {(s, f): n for s, f, n in session.execute(
            select(Run.state, Run.flow_id, func.count()).group_by(Run.state, Run.flow_id))}


def counted(store: Store) -> dict[tuple[str, int], int]:
    """What the counters say, per (state, flow), zero entries left out."""
    out: dict[tuple[str, int], int] = {}
    with store.read() as session:
        for model in (RunCount, RunCountDelta):
            for s, f, n in session.execute(select(model.state, model.flow_id, model.n)):
                out[(s, f)] = out.get((s, f), 0) + n
    return {k: n for k, n in out.items() if n}


def check(store: Store) -> dict[tuple[str, int], int]:
    """The counters equal the runs, and so does every answer of ``count_runs`` and ``counts``."""
    truth = exact(store)
    assert counted(store) == truth
    backend = LocalBackend(store)
    with store.read() as session:
        names = dict(session.execute(select(Flow.id, Flow.name)).all())
        assert counts.by_state(session) == {
            s: sum(n for (s2, _f), n in truth.items() if s2 == s) for s in {s for s, _ in truth}}
    assert backend.count_runs() == sum(truth.values())
    for state in S:
        assert backend.count_runs(state=state.value.lower()) == sum(
            n for (s, _f), n in truth.items() if s == state.value)
    for flow_id, name in names.items():
        assert backend.count_runs(flow=name) == sum(n for (_s, f), n in truth.items() if f == flow_id)
        for state in {s for s, f in truth if f == flow_id}:
            assert backend.count_runs(flow=name, state=state) == truth[(state, flow_id)]
    return truth


def bulk_rows(flow: Flow, version: FlowVersion, states_: list[str]) -> list[dict[str, Any]]:
    """Run rows as the scheduler's Core bulk insert writes them: no ORM, no state events."""
    now = utcnow()
    return [{"id": uuid.uuid4(), "flow_id": flow.id, "flow_version_id": version.id, "parameters": {},
             "kernel_name": "python3", "state": s, "state_name": states.default_name(S(s)), "attempt": 1,
             "max_attempts": 1, "retry_delay": 0.0, "retry_backoff": 2.0, "trigger": "schedule",
             "created_at": now, "result": {}, "log_bytes": 0} for s in states_]


def test_counts_follow_every_writer(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    store = open_store()
    a, va = register(store, make_notebook(tmp_path, "a", ["x = 1"]))
    b, vb = register(store, make_notebook(tmp_path, "b", ["x = 2"]))
    assert check(store) == {}

    made = [create_run(store, "a").id for _ in range(6)] + [create_run(store, "b").id for _ in range(3)]
    assert check(store) == {("PENDING", a.id): 6, ("PENDING", b.id): 3}

    request_cancel(store, made[0])  # unclaimed: CANCELLED at once
    claimed = claim(store, "worker:test", 3)  # claims stamp the worker, the state stays PENDING
    assert len(claimed) == 3
    request_cancel(store, claimed[-1])  # held: CANCELLING
    check(store)
    with store.write() as session:
        for run_id, end in zip(claimed[:2], (S.COMPLETED, S.FAILED), strict=True):
            run = states.lock_run(session, run_id)
            states.transition(session, run, S.RUNNING)
            states.transition(session, run, end)
    failed = claimed[1]
    assert counts.compact(store) >= 0  # mid-way: nothing changes for a reader
    check(store)

    retried = retry_run(store, failed)  # a new run, the failed one stays FAILED
    assert retried.parent_run_id == failed
    check(store)

    with store.write() as session:  # the scheduler's way: one Core INSERT of many rows
        session.execute(insert(Run), bulk_rows(a, va, ["PENDING"] * 40 + ["SCHEDULED"] * 5)
                        + bulk_rows(b, vb, ["COMPLETED"] * 30))
    truth = check(store)
    assert truth[("PENDING", a.id)] >= 40 and truth[("COMPLETED", b.id)] == 30

    with store.write() as session:  # raw SQL: a multi-row state change and a run moved between flows
        session.execute(text("UPDATE run SET state = 'CRASHED', state_name = 'Crashed' "
                             "WHERE state = 'SCHEDULED'"))
        session.execute(update(Run).where(Run.id == made[5]).values(flow_id=b.id))
        session.execute(update(Run).values(heartbeat_at=utcnow()))  # no state change: no count change
    counts.compact(store)
    check(store)

    with store.write() as session:  # age the ended runs of b, then let retention prune them
        session.execute(update(Run).where(Run.flow_id == b.id, Run.state == "COMPLETED")
                        .values(created_at=utcnow() - timedelta(days=30), ended_at=utcnow() - timedelta(days=30)))
    summary = prune(store, timedelta(days=7), batch=7)  # several batches
    assert summary.runs == 30
    truth = check(store)
    assert ("COMPLETED", b.id) not in truth

    with store.write() as session:  # a flow deleted with its runs: the cascade is counted down too
        session.execute(text("DELETE FROM flow WHERE id = :id"), {"id": b.id})
    assert all(f == a.id for _s, f in check(store))
    counts.compact(store)
    with store.read() as session:
        assert session.execute(select(func.count()).select_from(RunCount).where(RunCount.n == 0)).scalar() == 0
    check(store)


def test_a_worker_executing_runs_is_counted(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    """Real executions: claim, RUNNING, COMPLETED; a failure retried (SCHEDULED, PENDING, RUNNING, FAILED)."""
    store = open_store()
    register(store, make_notebook(tmp_path, "ok", ["x = 1"]))
    register(store, make_notebook(tmp_path, "bad", ["raise ValueError('no')"]),
             options=FlowOptions(retries=1, retry_delay=0.0))
    ids = [create_run(store, "ok").id, create_run(store, "ok").id, create_run(store, "bad").id]
    check(store)
    Runner(store, slots=2, poll_interval=0.1, warm_kernels=0).run(exit_when_idle=True)
    truth = check(store)
    with store.read() as session:
        ended = {r.id: r.state for r in session.execute(select(Run).where(Run.id.in_(ids))).scalars()}
    assert sorted(ended.values()) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert sum(n for (s, _f), n in truth.items() if s == "COMPLETED") == 2


def test_the_reaper_leader_compacts(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    store = open_store()
    register(store, make_notebook(tmp_path, "a", ["x = 1"]))
    for _ in range(3):
        create_run(store, "a")
    with store.write() as session:  # deltas on PostgreSQL; on SQLite, deltas only raw SQL writes
        session.execute(update(Run).values(state="FAILED"))
        session.add(RunCountDelta(state="FAILED", flow_id=99, n=0))
    runner = Runner(store, slots=1, warm_kernels=0)
    runner.draining.set()  # housekeeping only: claim nothing
    runner.step()  # takes the reaper role and runs its pass at once
    runner.leadership.resign()
    with store.read() as session:
        assert counts.pending(session) == 0
    assert check(store) == {("FAILED", 1): 3}


def test_a_reader_compacts_when_deltas_pile_up(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No runner leads (runs queued by ``nbflow trigger`` alone): a count that had to sum many deltas
    folds them, so the next reads stay small."""
    flow, version = _flow(store)
    with store.write() as session:
        session.execute(insert(Run), bulk_rows(flow, version, ["PENDING"] * 5))
        session.add_all(RunCountDelta(state="PENDING", flow_id=flow.id, n=0) for _ in range(5))  # as raw SQL may
    monkeypatch.setattr(counts, "COMPACT_AT", 3)
    assert LocalBackend(store).count_runs(state="pending") == 5
    with store.read() as session:
        assert counts.pending(session) == 0
        assert counts.read(session, state="PENDING") == (5, 0)


def test_counting_triggers_exist_at_head(store: Store) -> None:
    """A later migration rebuilding ``run`` on SQLite (batch mode) would drop them silently."""
    query = ("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'run'" if store.dialect == "sqlite"
             else "SELECT tgname FROM pg_trigger WHERE tgrelid = 'run'::regclass AND NOT tgisinternal")
    with store.engine.connect() as conn:
        names = set(conn.execute(text(query)).scalars())
    assert names >= TRIGGERS
    assert ("run_count_truncate" in names) == (store.dialect == "postgresql")


def _flow(store: Store, name: str = "f") -> tuple[Flow, FlowVersion]:
    with store.write() as session:
        flow = Flow(name=name, tags=[], labels=[])
        session.add(flow)
        session.flush()
        version = FlowVersion(flow_id=flow.id, version=1, content_hash=uuid.uuid4().hex, source="{}")
        session.add(version)
        session.flush()
        return flow, version


def _migrate(store: Store, target: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)
        conn.commit()


def test_migration_from_0005_backfills_existing_runs(db_url: str) -> None:
    store = Store(db_url)
    try:
        _migrate(store, "0005")
        rows = [(name, s) for name, n in (("f", 30), ("g", 10)) for s in random.Random(1).choices(
            ["COMPLETED", "FAILED", "PENDING", "RUNNING"], k=n)]
        with store.engine.begin() as conn:
            for name in ("f", "g"):
                conn.execute(text("INSERT INTO flow (name, kind, tags, retries, retry_delay, retry_backoff, "
                                  "collision, paused, labels, created_at, updated_at) VALUES (:n, 'notebook', "
                                  "'[]', 0, 0, 2, 'enqueue', false, '[]', :t, :t)"), {"n": name, "t": utcnow()})
                conn.execute(text("INSERT INTO flow_version (flow_id, version, content_hash, source, parameters, "
                                  "has_parameters_cell, created_at) SELECT id, 1, :h, '{}', '{}', false, :t "
                                  "FROM flow WHERE name = :n"), {"n": name, "h": name * 8, "t": utcnow()})
            for name, state in rows:
                conn.execute(text(
                    "INSERT INTO run (id, flow_id, flow_version_id, parameters, kernel_name, state, state_name, "
                    "attempt, max_attempts, retry_delay, retry_backoff, trigger, created_at, result, log_bytes) "
                    "SELECT :id, f.id, v.id, '{}', 'python3', :s, :s, 1, 1, 0, 2, 'manual', :t, '{}', 0 "
                    "FROM flow f JOIN flow_version v ON v.flow_id = f.id WHERE f.name = :n"),
                    {"id": uuid.uuid4().hex if store.dialect == "sqlite" else uuid.uuid4(), "s": state,
                     "n": name, "t": utcnow().replace(tzinfo=None)})
        store.ensure_schema()  # 0005 -> head, as a process opening an old database does
        truth = check(store)
        assert sum(truth.values()) == 40
        # Down and up again: the counters go, and come back exact for runs written in between.
        _migrate(store, "0005", down=True)
        with store.engine.begin() as conn:
            conn.execute(text("DELETE FROM run WHERE state = 'FAILED'"))
        _migrate(store, "head")
        assert check(store) == {k: n for k, n in truth.items() if k[0] != "FAILED"}
    finally:
        store.dispose()


@pytest.fixture
def pg_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from conftest import _fresh_url

    s = Store(_fresh_url("postgresql", tmp_path, request))
    s.ensure_schema()
    yield s
    s.dispose()


def test_concurrent_writers_on_postgresql_never_deadlock_and_count_exactly(pg_store: Store) -> None:
    """Four writers move runs between states in opposite orders, insert and delete at once, while
    compactions run. With one counter row per state updated in place, two transactions moving runs
    PENDING->RUNNING and RUNNING->PENDING would lock the two counters in opposite orders: a deadlock."""
    store = pg_store
    flow, version = _flow(store)
    other, other_version = _flow(store, "g")
    per_writer = 40
    with store.write() as session:
        session.execute(insert(Run), bulk_rows(flow, version, ["PENDING"] * (4 * per_writer)))
    with store.read() as session:
        ids = sorted(session.execute(select(Run.id)).scalars())
    shares = [ids[i::4] for i in range(4)]  # each writer owns its runs: no lock waits on run rows themselves
    cycle = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED"]
    stop = threading.Event()

    def writer(i: int) -> int:
        rng = random.Random(i)
        done = 0
        for step in range(60):
            with store.write() as session:
                batch = rng.sample(shares[i], 8)
                order = cycle if i % 2 else cycle[::-1]  # two writers walk the states backwards
                for j, run_id in enumerate(batch):
                    session.execute(update(Run).where(Run.id == run_id).values(state=order[(step + j) % len(order)]))
                if step % 10 == 0:  # a few runs come and go too
                    session.execute(insert(Run), bulk_rows(other, other_version, ["PENDING", "COMPLETED"]))
                    session.execute(text("DELETE FROM run WHERE id IN (SELECT id FROM run WHERE flow_id = :f "
                                         "AND state = 'COMPLETED' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"),
                                    {"f": other.id})
            done += 1
        return done

    folded = [0]

    def compactor() -> None:
        while not stop.is_set():
            folded[0] += counts.compact(store, batch=50)

    background = threading.Thread(target=compactor)
    background.start()
    try:
        assert at_once([lambda i=i: writer(i) for i in range(4)], timeout=120) == [60] * 4
    finally:
        stop.set()
        background.join(60)
    check(store)
    counts.compact(store)
    with store.read() as session:
        assert counts.pending(session) == 0
    truth = check(store)
    assert sum(n for (_s, f), n in truth.items() if f == flow.id) == 4 * per_writer
    assert folded[0] > 0  # compactions really ran between the writers' commits


def test_truncate_empties_the_counters_on_postgresql(pg_store: Store) -> None:
    flow, version = _flow(pg_store)
    with pg_store.write() as session:
        session.execute(insert(Run), bulk_rows(flow, version, ["PENDING"] * 3))
    counts.compact(pg_store)
    with pg_store.write() as session:
        session.execute(insert(Run), bulk_rows(flow, version, ["FAILED"] * 2))
        session.execute(text("TRUNCATE run CASCADE"))
    assert check(pg_store) == {}
    assert counted(pg_store) == {}
