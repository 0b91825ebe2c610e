"""The scheduler across failures made for real: a leader killed mid-schedule (failover to a standby
scheduler), a PostgreSQL outage under a running `nbflow scheduler`, and a bad event or notification row.
Each slot must get exactly one run: none lost in the gap, none twice."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_URL
from helpers import make_notebook, until
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from nbflow.core.flows import register
from nbflow.services import scheduler
from nbflow.store import open_store, reset_stores
from nbflow.store.models import Leader, Run

INTERVAL = 1.0


def _scheduler(env: dict[str, str], cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    """A real `nbflow scheduler` process, its stderr (queued runs, log lines) in ``log``."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "nbflow.cli", "scheduler", "--tick", "0.2", *extra],
                                env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def _slots(store: Any) -> list[datetime]:
    with store.read() as session:
        return list(session.execute(select(Run.scheduled_for).where(Run.schedule_id.is_not(None))
                                    .order_by(Run.scheduled_for)).scalars())


def _created(store: Any) -> list[datetime]:
    with store.read() as session:
        return list(session.execute(select(Run.created_at).where(Run.schedule_id.is_not(None))
                                    .order_by(Run.created_at)).scalars())


def assert_every_slot_once(slots: list[datetime], first: datetime, interval: float = INTERVAL) -> None:
    """Slots from the first slot to the last fired one, each exactly once, none missing."""
    assert slots and slots[0] == first, (slots[:3], first)
    assert len(set(slots)) == len(slots), "a slot fired twice"
    expected = [first + timedelta(seconds=interval * k) for k in range(len(slots))]
    missing = sorted(set(expected) - set(slots))
    assert slots == expected, f"lost slots: {[s.isoformat() for s in missing][:10]}"


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _setup(tmp_path: Path, catch_up: str | None = None) -> tuple[Any, Any]:
    store = open_store()
    nb = make_notebook(tmp_path, "tick", ["x = 1"])
    register(store, nb, name="tick")
    return store, scheduler.add_schedule(store, "tick", interval=f"{INTERVAL:g}s", catch_up=catch_up)


def test_a_failover_between_schedulers_loses_no_slot_with_skip(nbflow_env, tmp_path):
    """The leader is SIGKILLed; the standby takes the role when the lease expires (~1.25 leases later,
    longer than the interval), and fires every slot of the gap: a failover is not downtime, so `skip`
    (the default policy) drops nothing."""
    env = {**nbflow_env, "NBFLOW_LEASE_SECONDS": "2"}
    store, sched = _setup(tmp_path)
    assert sched.catch_up == "skip"
    first = sched.next_fire_at
    leader = _scheduler(env, tmp_path, tmp_path / "a.err")
    standby = None
    try:
        until(lambda: len(_slots(store)) >= 2, 60, "the first scheduler to fire")
        with store.read() as session:
            holder = session.execute(select(Leader.holder).where(Leader.role == "scheduler")).scalar_one()
        assert f":{leader.pid}:" in holder
        standby = _scheduler(env, tmp_path, tmp_path / "b.err")
        until(lambda: "tick" in (tmp_path / "b.err").read_text(), 60, "the standby to start")
        leader.kill()  # no resign: the role passes only when its lease runs out
        leader.wait(30)
        killed_at = time.time()

        def taken_over() -> bool:
            with store.read() as session:
                holder = session.execute(select(Leader.holder).where(Leader.role == "scheduler")).scalar_one()
            return f":{standby.pid}:" in holder and _slots(store)[-1].timestamp() > killed_at + 3

        until(taken_over, 60, "the standby to take over and fire after the gap")
        assert standby.poll() is None
    finally:
        for proc in (leader, standby):
            if proc is not None:
                _stop(proc)
    assert_every_slot_once(_slots(store), first)
    created = _created(store)
    gap = max((b - a).total_seconds() for a, b in itertools.pairwise(created))
    assert gap > INTERVAL * 1.2, f"no failover gap longer than the interval happened ({gap:.2f} s)"


# -- a PostgreSQL outage -----------------------------------------------------------------------------

# Longer outages, by hand: NBFLOW_TEST_OUTAGE_SECONDS=40 (skip keeps every slot up to 60 s old), or
# NBFLOW_TEST_OUTAGE_SECONDS=90 NBFLOW_TEST_OUTAGE_CATCH_UP=all (older slots need latest or all).
OUTAGE_SECONDS = float(os.environ.get("NBFLOW_TEST_OUTAGE_SECONDS", "6"))
OUTAGE_CATCH_UP = os.environ.get("NBFLOW_TEST_OUTAGE_CATCH_UP") or None


@pytest.fixture
def own_pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], str, Any]]:
    """A PostgreSQL database of this test's own (it is taken away and given back), an nbflow instance
    on it; yields (env, database name, admin engine)."""
    admin_url = make_url(PG_URL).set(drivername="postgresql+psycopg")
    name = f"nbflow_outage_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("NBFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NBFLOW_DATABASE_URL", url)
    reset_stores()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        yield env, name, admin
    finally:
        reset_stores()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def take_away(admin: Any, name: str) -> None:
    """The outage: no new connection, and every open one cut."""
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})


def give_back(admin: Any, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


def test_a_postgresql_outage_under_a_running_scheduler_loses_no_slot(own_pg, tmp_path):
    env, name, admin = own_pg
    store, sched = _setup(tmp_path, OUTAGE_CATCH_UP)
    first = sched.next_fire_at
    log = tmp_path / "scheduler.err"
    proc = _scheduler(env, tmp_path, log)
    try:
        until(lambda: len(_slots(store)) >= 2, 60, "the scheduler to fire")
        store.dispose()  # this test's own connections would be cut too
        take_away(admin, name)
        went, went_wall = time.monotonic(), time.time()
        until(lambda: "unavailable" in log.read_text(), 60, "the scheduler to notice the outage",
              show=log.read_text)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - went)))  # the outage itself, not a wait
        assert proc.poll() is None, log.read_text()
        give_back(admin, name)
        back = time.time()
        until(lambda: _slots(store) and _slots(store)[-1].timestamp() > back + 2, 60,
              "slots after the outage", show=log.read_text)
        until(lambda: "is back" in log.read_text(), 30, "the 'back' line", show=log.read_text)
        assert proc.poll() is None, log.read_text()
    finally:
        code = _stop(proc)
    err = log.read_text()
    assert code == 0, err
    assert_every_slot_once(_slots(store), first)
    lines = err.splitlines()
    assert len([x for x in lines if "unavailable" in x]) == 1, err
    assert len([x for x in lines if "is back after" in x]) == 1, err
    assert "scheduler pass failed" not in err and "scheduler schedules failed" not in err, err
    during = [s for s in _slots(store) if went_wall <= s.timestamp() <= back]
    assert len(during) >= int(OUTAGE_SECONDS / INTERVAL) - 1, during  # the slots of the outage: fired after it


def test_a_sqlite_write_lock_held_by_another_process_loses_no_slot(sqlite_env, tmp_path):
    """Another process holds SQLite's write lock for a few seconds (a long `nbflow db prune`, a backup):
    the scheduler's writes wait for it (busy timeout) and then fire every slot of the wait, once."""
    import sqlite3

    store, sched = _setup(tmp_path)
    first = sched.next_fire_at
    log = tmp_path / "scheduler.err"
    proc = _scheduler(sqlite_env, tmp_path, log)
    holder = None
    try:
        until(lambda: len(_slots(store)) >= 2, 60, "the scheduler to fire")
        path = make_url(sqlite_env["NBFLOW_DATABASE_URL"]).database
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(4); c.execute('COMMIT')\n")],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        locked_at = time.time()
        assert holder.wait(60) == 0
        until(lambda: _slots(store)[-1].timestamp() > locked_at + 6, 60, "slots after the lock",
              show=log.read_text)
        assert proc.poll() is None, log.read_text()
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        code = _stop(proc)
    assert code == 0, log.read_text()
    assert_every_slot_once(_slots(store), first)
    with sqlite3.connect(make_url(sqlite_env["NBFLOW_DATABASE_URL"]).database) as conn:
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == len(_slots(store))
