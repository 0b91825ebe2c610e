"""The store: migrations, sessions, SQLite concurrency, constraints and errors, on both backends."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import autogenerate
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError, StatementError

from nbflow.core.states import StateType, initial_state
from nbflow.errors import DatabaseError
from nbflow.store import Store, open_store, reset_stores
from nbflow.store.database import MIGRATIONS_DIR, SCHEMA_REVISION, SQLITE_BUSY_TIMEOUT_MS
from nbflow.store.models import Base, Flow, FlowVersion, Run, Schedule

TABLES = {"flow", "flow_version", "schedule", "run", "run_state_event", "cell_run", "log", "api_key", "tag_limit",
          "flow_dependency", "file_trigger", "file_seen", "secret", "webhook", "notification",
          "notification_delivery", "worker", "leader", "run_count", "run_count_delta"}


def table_names(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def add_flow(store: Store, **kwargs: Any) -> tuple[int, int]:
    """A flow and its first version; returns their ids."""
    with store.write() as session:
        flow = Flow(name=f"f-{uuid.uuid4().hex[:12]}", **kwargs)
        session.add(flow)
        session.flush()
        version = FlowVersion(flow_id=flow.id, version=1, content_hash=uuid.uuid4().hex, source="{}")
        session.add(version)
        session.flush()
        return flow.id, version.id


def add_run(store: Store, flow_id: int, version_id: int, **kwargs: Any) -> uuid.UUID:
    with store.write() as session:
        run = Run(flow_id=flow_id, flow_version_id=version_id, kernel_name="python3", **kwargs)
        initial_state(session, run, StateType.SCHEDULED)
        return run.id


# -- migrations ---------------------------------------------------------------------------------------


def test_ensure_schema_on_an_empty_database(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert store.current_revision() is None
        assert table_names(store) == set()
        store.ensure_schema()
        assert table_names(store) == TABLES | {"alembic_version"}
        assert store.current_revision() == SCHEMA_REVISION
    finally:
        store.dispose()


def test_schema_revision_is_the_alembic_head() -> None:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    assert script.get_heads() == [SCHEMA_REVISION]


def test_migrations_match_the_models(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = autogenerate.compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_second_ensure_schema_is_a_no_op(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    flow_id, _ = add_flow(store)

    def no_upgrade(self: Store) -> None:
        raise AssertionError("ensure_schema migrated a current database")

    monkeypatch.setattr(Store, "upgrade", no_upgrade)
    store.ensure_schema()
    again = Store(store.url)  # a new process's view of the same database
    try:
        again.ensure_schema()
    finally:
        again.dispose()
    monkeypatch.undo()
    store.upgrade()  # and migrating a current database explicitly changes nothing
    assert store.current_revision() == SCHEMA_REVISION
    with store.read() as session:
        assert session.scalar(select(func.count(Flow.id))) == 1
        assert session.get(Flow, flow_id) is not None


def test_open_store_caches_one_migrated_store_per_url(db_url: str) -> None:
    reset_stores()
    try:
        first = open_store(db_url)
        assert first.current_revision() == SCHEMA_REVISION
        assert open_store(db_url) is first
        reset_stores()
        second = open_store(db_url)
        assert second is not first
        assert second.current_revision() == SCHEMA_REVISION
    finally:
        reset_stores()


def _ensure_schema_in_process(url: str, barrier: Any, results: Any) -> None:
    try:
        store = Store(url)
        barrier.wait(timeout=30)
        store.ensure_schema()
        results.put(("ok", store.current_revision()))
        store.dispose()
    except BaseException:  # report everything to the parent
        results.put(("error", traceback.format_exc()))


def test_concurrent_ensure_schema_in_two_processes(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 2
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_ensure_schema_in_process, args=(db_url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert outcomes == [("ok", SCHEMA_REVISION)] * n, outcomes
    assert [p.exitcode for p in procs] == [0] * n
    store = Store(db_url)
    try:
        assert table_names(store) == TABLES | {"alembic_version"}
    finally:
        store.dispose()


# -- sessions -----------------------------------------------------------------------------------------


def test_write_commits_or_rolls_back(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as session:
        session.add(Flow(name="rolled-back"))
        session.flush()
        raise RuntimeError("boom")
    with store.write() as session:
        session.add(Flow(name="kept"))
    with store.read() as session:
        assert list(session.scalars(select(Flow.name))) == ["kept"]


def test_values_round_trip(store: Store) -> None:
    """JSON (JSONB on PostgreSQL) and aware timestamps come back as they went in."""
    flow_id, version_id = add_flow(store, tags=["a", "b"])
    params = {"n": 3, "x": 0.5, "s": "é", "nested": {"l": [1, None, True]}}
    slot = datetime(2031, 5, 6, 7, 8, 9, 10, tzinfo=UTC)
    run_id = add_run(store, flow_id, version_id, parameters=params, scheduled_for=slot)
    with store.read() as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert run.parameters == params
        assert run.scheduled_for == slot
        assert run.scheduled_for.tzinfo is UTC  # type: ignore[union-attr]
        assert run.created_at.tzinfo is UTC
        assert session.get(Flow, flow_id).tags == ["a", "b"]  # type: ignore[union-attr]


def test_naive_datetimes_are_refused(store: Store) -> None:
    flow_id, version_id = add_flow(store)
    with pytest.raises(StatementError, match="naive datetimes"):
        add_run(store, flow_id, version_id, scheduled_for=datetime(2030, 1, 1, 12, 0))


def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(IntegrityError):
        add_run(store, 999_999, 999_999)


# -- SQLite: WAL, busy timeout, BEGIN IMMEDIATE -------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Any:
    s = Store(f"sqlite:///{tmp_path / 'nbflow.db'}")
    s.ensure_schema()
    yield s
    s.dispose()


def test_sqlite_pragmas(sqlite_store: Store) -> None:
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert SQLITE_BUSY_TIMEOUT_MS >= 5_000


def _try_begin_immediate(path: str) -> str | None:
    """From another connection: None if it got the write lock, else the error."""
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        other.close()


def test_sqlite_write_sessions_take_the_write_lock_up_front(sqlite_store: Store) -> None:
    path = sqlite_store.engine.url.database
    assert path is not None
    with sqlite_store.read() as session:
        session.execute(select(func.count(Flow.id)))
        assert _try_begin_immediate(path) is None  # reads never block writers
    with sqlite_store.write() as session:
        session.execute(select(func.count(Flow.id)))  # only a read so far
        assert _try_begin_immediate(path) == "database is locked"
    assert _try_begin_immediate(path) is None


def test_concurrent_writers(store: Store) -> None:
    """4 threads x 50 read-then-update transactions on one row: no "database is locked", no lost update.

    On SQLite nothing but BEGIN IMMEDIATE serialises them (FOR UPDATE is ignored there); on PostgreSQL
    the row lock does, as ``lock_run`` does for runs.
    """
    flow_id, _ = add_flow(store, retries=0)
    threads_n, per_thread = 4, 50
    errors: list[str] = []
    start = threading.Barrier(threads_n)

    def work() -> None:
        try:
            start.wait(timeout=10)
            for _ in range(per_thread):
                with store.write() as session:
                    row = session.execute(
                        select(Flow.retries).where(Flow.id == flow_id).with_for_update()
                    ).scalar_one()
                    time.sleep(0.0005)  # widen the read-to-write window
                    session.execute(Flow.__table__.update().where(Flow.id == flow_id).values(retries=row + 1))
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with store.read() as session:
        assert session.scalar(select(Flow.retries).where(Flow.id == flow_id)) == threads_n * per_thread


# -- constraints ----------------------------------------------------------------------------------------


def test_one_run_per_schedule_slot(store: Store) -> None:
    flow_id, version_id = add_flow(store)
    with store.write() as session:
        schedule = Schedule(flow_id=flow_id, name="hourly", trigger="cron", spec={"cron": "0 * * * *"})
        session.add(schedule)
        session.flush()
        schedule_id = schedule.id
    slot = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    add_run(store, flow_id, version_id, schedule_id=schedule_id, scheduled_for=slot)
    with pytest.raises(IntegrityError):
        add_run(store, flow_id, version_id, schedule_id=schedule_id, scheduled_for=slot)
    # The same instant written in another zone is the same slot.
    with pytest.raises(IntegrityError):
        add_run(
            store,
            flow_id,
            version_id,
            schedule_id=schedule_id,
            scheduled_for=datetime.fromisoformat("2030-01-01T11:00:00+01:00"),
        )
    add_run(store, flow_id, version_id, schedule_id=schedule_id, scheduled_for=slot.replace(hour=11))
    # Runs outside a schedule never collide.
    add_run(store, flow_id, version_id)
    add_run(store, flow_id, version_id)
    with store.read() as session:
        assert session.scalar(select(func.count(Run.id))) == 4
        assert session.scalar(select(func.count(Run.id)).where(Run.schedule_id == schedule_id)) == 2


def test_idempotency_key_is_unique(store: Store) -> None:
    flow_id, version_id = add_flow(store)
    add_run(store, flow_id, version_id, idempotency_key="req-1")
    with pytest.raises(IntegrityError):
        add_run(store, flow_id, version_id, idempotency_key="req-1")
    add_run(store, flow_id, version_id, idempotency_key="req-2")
    add_run(store, flow_id, version_id, idempotency_key=None)
    add_run(store, flow_id, version_id, idempotency_key=None)
    with store.read() as session:
        assert session.scalar(select(func.count(Run.id)).where(Run.idempotency_key == "req-1")) == 1
        assert session.scalar(select(func.count(Run.id))) == 4


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nonsense://x", "cannot open database 'nonsense://x': .*nonsense"),
        ("not a url", "cannot open database 'not a url': not a database URL"),
        ("", "not a database URL"),
    ],
)
def test_bad_url(url: str, expected: str) -> None:
    with pytest.raises(DatabaseError, match=expected) as info:
        Store(url)
    assert info.value.code == "database_unavailable"


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg"])
def test_unreachable_postgres(scheme: str) -> None:
    store = Store(f"{scheme}://nbflow:s3cret-pw@127.0.0.1:1/nbflow")
    try:
        assert store.engine.dialect.driver == "psycopg"  # a bare postgresql:// means the driver we ship
        with pytest.raises(DatabaseError) as info:
            store.ensure_schema()
    finally:
        store.dispose()
    message = str(info.value)
    assert message.startswith("cannot open database")
    assert "127.0.0.1:1/nbflow" in message
    assert "nbflow:***@" in message
    assert "s3cret-pw" not in message
    assert "\n" not in message
    assert info.value.code == "database_unavailable"
