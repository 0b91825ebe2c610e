"""Database outages are weather: real `nbflow worker` / `nbflow serve` processes, a real PostgreSQL
database of the test's own cut off (``ALLOW_CONNECTIONS false`` plus ``pg_terminate_backend``) and a
real SQLite write lock held by another process. The processes must live through it, the run in flight
must end as its notebook did (or, past the lease, be retried exactly once), and the log must say
"unavailable" once and "back" once.

Every wait is on a condition (a file the notebook writes, a log line, a process gone), never a sleep;
the outage itself is held until what it must prove has happened (the runner saw it, the lease ran out)
plus a few retry periods, measured and printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import PG_URL, _instance
from helpers import make_notebook, nbflow, start, until
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from nbflow.checks import MAX_SECONDS
from nbflow.core import states
from nbflow.core.runs import create_run, history
from nbflow.execution import launcher
from nbflow.execution.execute import RunRecorder, _end_attempt
from nbflow.execution.executors.base import Executor
from nbflow.record import RECORD_MIME
from nbflow.services import runner as runner_module
from nbflow.services.runner import Runner, reap
from nbflow.store import Store, open_store, reset_stores
from nbflow.store.models import CellRun, Log, Run, utcnow
from nbflow.store.retry import is_unavailable, retrying

DOWN = re.compile(r"^database .* unavailable", re.M)
BACK = re.compile(r"^database .* is back after", re.M)


class Output:
    """A process's stderr, read as it comes (a full pipe would block the process)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.text = ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.text += line

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(10)
        return self.text


class Database:
    """A PostgreSQL database of the test's own, which it can cut off and let back in."""

    def __init__(self) -> None:
        self.admin = create_engine(make_url(PG_URL).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
        self.name = f"nbflow_outage_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = make_url(PG_URL).set(drivername="postgresql+psycopg", database=self.name).render_as_string(
            hide_password=False)

    def cut(self) -> float:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                         {"d": self.name})
        return time.monotonic()

    def allow(self) -> float:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))
        return time.monotonic()

    def drop(self) -> None:
        reset_stores()
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture
def pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Database, dict[str, str]]]:
    db = Database()
    try:
        yield db, _instance(monkeypatch, tmp_path / "home", db.url)
    finally:
        db.drop()


def _notebook(tmp_path: Path, name: str = "weather") -> Path:
    """Says it started (a file named after its pid), prints, waits for ``go``, records, prints again."""
    return make_notebook(tmp_path, name, [
        f"import os, pathlib, time\nd = pathlib.Path({str(tmp_path)!r})\n"
        "(d / f'started-{os.getpid()}').touch()\nprint('before the outage', flush=True)",
        "while not (d / 'go').exists():\n    time.sleep(0.05)\nprint('after go', flush=True)",
        "import nbflow\nnbflow.record('answer', 42)\nprint('done', flush=True)",
    ])


def _started(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("started-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _state(run_id: str) -> str | None:
    try:
        with open_store().read() as session:
            return session.get(Run, uuid.UUID(run_id)).state
    except Exception:  # the test's own reads may meet the outage too
        return None


def _summary(run_id: str) -> dict:
    with open_store().read() as session:
        run = session.get(Run, uuid.UUID(run_id))
        cells = {(c.attempt, c.cell_index): c.state for c in session.execute(
            select(CellRun).where(CellRun.run_id == run.id)).scalars()}
        logs = [(entry.attempt, entry.text) for entry in session.execute(
            select(Log).where(Log.run_id == run.id).order_by(Log.id)).scalars()]
        return {"state": run.state, "attempt": run.attempt, "result": run.result, "cells": cells, "logs": logs,
                "history": [(e["to"], e["attempt"]) for e in history(session, run)],
                "runs": session.execute(select(func.count()).select_from(Run)).scalar()}


def _tracebacks(log: str) -> list[str]:
    """The log lines that head a traceback (the message logged with it): an outage is no bug to report."""
    structure = re.compile(r"^(Traceback |During handling|The above exception|[\w.]+(Error|Exception)\b|\s|$)")
    header, found = "", []
    for line in log.splitlines():
        if line.startswith("Traceback "):
            found.append(header)
        elif not structure.match(line):
            header = line
    return found


def _trigger(env: dict[str, str], tmp_path: Path, nb: Path, *options: str) -> str:
    assert nbflow(env, tmp_path, "register", str(nb), *options).returncode == 0
    answer = nbflow(env, tmp_path, "trigger", nb.stem, "--json")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["id"]


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_postgresql_outage_shorter_than_the_lease_loses_nothing(pg, tmp_path, command):
    db, env = pg
    env = dict(env, NBFLOW_LEASE_SECONDS="30")
    run_id = _trigger(env, tmp_path, _notebook(tmp_path))
    port = ["--port", "0"] if command == "serve" else []
    proc = start(env, tmp_path, command, "--poll", "0.2", *port)
    out = Output(proc)
    try:
        until(lambda: _started(tmp_path), timeout=120, what="the run to start", show=lambda: out.text)
        cut = db.cut()
        until(lambda: DOWN.search(out.text), timeout=30, what="the runner to see the outage", show=lambda: out.text)
        (tmp_path / "go").touch()  # the notebook ends during the outage: its last writes and its end wait
        # Held over several retry periods (backoff 0.2 s doubling to 5 s): the loops retry, none exits.
        until(lambda: time.monotonic() - cut >= 8, timeout=30, every=0.1, what="8 s of outage")
        assert proc.poll() is None, out.text
        allowed = db.allow()
        until(lambda: _state(run_id) == "COMPLETED", timeout=120, what="the run to complete",
              show=lambda: (_state(run_id), out.text))
        until(lambda: BACK.search(out.text), timeout=30, what="the 'back' line", show=lambda: out.text)
        assert proc.poll() is None, out.text  # alive through it all
        if command == "serve":  # and its API answers as before
            url = re.search(r"REST API on (http://\S+)/api", out.text).group(1)
            with urllib.request.urlopen(f"{url}/api/runs/{run_id}", timeout=30) as answer:
                assert json.load(answer)["state"] == "COMPLETED"
    finally:
        text_ = out.stop()
    print(f"{command}: survived a {allowed - cut:.1f} s PostgreSQL outage")
    got = _summary(run_id)
    assert got["history"] == [("PENDING", 1), ("RUNNING", 1), ("COMPLETED", 1)], got
    assert got["result"] == {"answer": 42}
    assert got["cells"] == {(1, 0): "COMPLETED", (1, 1): "COMPLETED", (1, 2): "COMPLETED"}
    texts = "".join(t for _, t in got["logs"])
    assert "before the outage" in texts and "after go" in texts and "done" in texts  # nothing written lost
    assert got["runs"] == 1  # none lost, none duplicated
    assert len(DOWN.findall(text_)) == 1 and len(BACK.findall(text_)) == 1, text_
    assert _tracebacks(text_) == [], text_

def test_postgresql_outage_longer_than_the_lease_retries_the_run_exactly_once(pg, tmp_path):
    db, env = pg
    env = dict(env, NBFLOW_LEASE_SECONDS="3")
    run_id = _trigger(env, tmp_path, _notebook(tmp_path), "--retries", "1", "--retry-delay", "0")
    proc = start(env, tmp_path, "worker", "--poll", "0.2")
    out = Output(proc)
    try:
        until(lambda: _started(tmp_path), timeout=120, what="the run to start", show=lambda: out.text)
        [first] = _started(tmp_path)
        cut = db.cut()
        # The supervisor cannot renew the lease: once a whole lease has passed, it must assume a reaper
        # elsewhere ended the attempt, and stops it, database or not.
        until(lambda: not _alive(first), timeout=60, what="the first attempt to be stopped", show=lambda: out.text)
        stopped = time.monotonic()
        assert proc.poll() is None, out.text
        allowed = db.allow()
        until(lambda: len(_started(tmp_path)) == 2, timeout=120, what="the second attempt",
              show=lambda: (_state(run_id), out.text))
        (tmp_path / "go").touch()
        until(lambda: _state(run_id) == "COMPLETED", timeout=120, what="the run to complete",
              show=lambda: (_state(run_id), out.text))
        assert proc.poll() is None, out.text
    finally:
        text_ = out.stop()
    print(f"worker: survived a {allowed - cut:.1f} s PostgreSQL outage (lease 3 s); "
          f"attempt 1 stopped {stopped - cut:.1f} s into it")
    got = _summary(run_id)
    assert got["history"] == [("PENDING", 1), ("RUNNING", 1), ("CRASHED", 1), ("SCHEDULED", 2), ("PENDING", 2),
                              ("RUNNING", 2), ("COMPLETED", 2)], got
    assert got["result"] == {"answer": 42}
    assert {k: v for k, v in got["cells"].items() if k[0] == 2} == {
        (2, 0): "COMPLETED", (2, 1): "COMPLETED", (2, 2): "COMPLETED"}
    # attempt 1 never got past the cell waiting for `go` (its first cell may have been recorded COMPLETED
    # before the cut: the test cuts once that cell has run, racing its record)
    assert "COMPLETED" not in {got["cells"].get((1, 1)), got["cells"].get((1, 2))}, got["cells"]
    assert [t for a, t in got["logs"] if a == 2 and "done" in t]
    assert not [t for a, t in got["logs"] if a == 1 and ("after go" in t or "done" in t)]
    assert got["runs"] == 1
    assert len(DOWN.findall(text_)) == 1 and len(BACK.findall(text_)) == 1, text_
    assert _tracebacks(text_) == [], text_


def test_sqlite_lock_held_by_another_process_past_the_busy_timeout(sqlite_env, tmp_path):
    env = dict(sqlite_env, NBFLOW_SQLITE_BUSY_TIMEOUT_MS="300")
    database = tmp_path / "home" / "nbflow.db"
    run_id = _trigger(env, tmp_path, _notebook(tmp_path))
    proc = start(env, tmp_path, "worker", "--poll", "0.2")
    out = Output(proc)
    locker = None
    try:
        until(lambda: _started(tmp_path), timeout=120, what="the run to start", show=lambda: out.text)
        # Another process takes the write lock and keeps it until its stdin closes.
        locker = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\nsys.stdin.read()\nc.execute('ROLLBACK')",
             str(database)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        locked = time.monotonic()
        until(lambda: DOWN.search(out.text), timeout=30, what="the runner to see the lock", show=lambda: out.text)
        (tmp_path / "go").touch()
        until(lambda: time.monotonic() - locked >= 5, timeout=30, every=0.1, what="5 s of lock")
        assert proc.poll() is None, out.text
        locker.stdin.close()
        locker.wait(30)
        released = time.monotonic()
        until(lambda: _state(run_id) == "COMPLETED", timeout=120, what="the run to complete",
              show=lambda: (_state(run_id), out.text))
        until(lambda: BACK.search(out.text), timeout=30, what="the 'back' line", show=lambda: out.text)
        assert proc.poll() is None, out.text
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
        text_ = out.stop()
    print(f"worker: survived a SQLite write lock held {released - locked:.1f} s (busy timeout 0.3 s)")
    got = _summary(run_id)
    assert got["history"] == [("PENDING", 1), ("RUNNING", 1), ("COMPLETED", 1)], got
    assert got["result"] == {"answer": 42}
    assert "done" in "".join(t for _, t in got["logs"])
    assert got["runs"] == 1
    assert len(DOWN.findall(text_)) == 1 and len(BACK.findall(text_)) == 1, text_
    assert _tracebacks(text_) == [], text_


# -- bad values and bad rows never stop a loop; late writes of an old attempt change nothing --------------

def _running(store, tmp_path: Path, **values) -> uuid.UUID:
    """A RUNNING run (attempt 1) whose lease ran out long ago, with ``values`` stored as they are."""
    nb = make_notebook(tmp_path, f"n{uuid.uuid4().hex[:6]}", ["x = 1"])
    run_id = create_run(store, str(nb), worker_id="worker:gone", allow_path=True).id
    with store.write() as session:
        run = states.lock_run(session, run_id)
        states.transition(session, run, states.S.RUNNING)
        run.heartbeat_at = utcnow() - timedelta(hours=1)
        for key, value in values.items():
            setattr(run, key, value)
    return run_id


@pytest.mark.parametrize("delay, backoff", [(math.inf, 2.0), (1e12, 2.0), (5.0, 1e300)])
def test_a_stored_huge_retry_delay_is_capped_not_a_crash_loop(store, tmp_path, delay, backoff):
    # Rows written before the doors checked these numbers: the reaper raised OverflowError on them and
    # every runner exited at start-up. Now the delay is capped at checks.MAX_SECONDS.
    run_id = _running(store, tmp_path, max_attempts=3, attempt=2, retry_delay=delay, retry_backoff=backoff)
    assert reap(store, 30) == [run_id]
    with store.read() as session:
        run = session.get(Run, run_id)
        wait = (run.expected_start_at - utcnow()).total_seconds()
        assert (run.state, run.state_name, run.attempt) == ("SCHEDULED", "AwaitingRetry", 3)
    assert MAX_SECONDS - 60 < wait <= MAX_SECONDS
    assert states.retry_delay(run) == MAX_SECONDS


def test_retry_delay_stays_within_bounds():
    assert states.retry_delay(Run(retry_delay=2.0, retry_backoff=3.0, attempt=3)) == 18.0
    assert states.retry_delay(Run(retry_delay=-5.0, retry_backoff=2.0, attempt=1)) == 0.0
    assert states.retry_delay(Run(retry_delay=math.nan, retry_backoff=2.0, attempt=1)) == MAX_SECONDS
    assert states.retry_delay(Run(retry_delay=1.0, retry_backoff=10.0, attempt=400)) == MAX_SECONDS  # overflows


def test_a_run_that_cannot_be_reaped_is_ended_and_the_rest_are_reaped(store, tmp_path, monkeypatch):
    bad = _running(store, tmp_path, max_attempts=2)
    good = _running(store, tmp_path, max_attempts=2)
    real = runner_module._reap_one

    def reap_one(session, run, lease, now):  # a bug that only this row triggers
        if run.id == bad:
            raise ValueError("a value no code expected")
        return real(session, run, lease, now)

    monkeypatch.setattr(runner_module, "_reap_one", reap_one)
    assert sorted(reap(store, 30)) == sorted([bad, good])
    with store.read() as session:
        b, g = session.get(Run, bad), session.get(Run, good)
        assert (b.state, b.worker_id) == ("CRASHED", None)
        assert "reaping it failed: ValueError: a value no code expected" in b.state_message
        assert b.error["ename"] == "Crashed"
        assert (g.state, g.state_name, g.attempt) == ("SCHEDULED", "AwaitingRetry", 2)
    assert reap(store, 30) == []  # the bad row left the reaper's sight: not tried at every pass


class _BrokenExecutor(Executor):
    """A supervisor that fails for a reason of its own (not the database)."""

    def execute(self, store, run_id, stop=None):
        raise RuntimeError("the supervisor tripped")


def test_a_failing_supervisor_ends_its_run_with_the_reason(store, tmp_path):
    nb = make_notebook(tmp_path, "victim", ["x = 1"])
    run_id = create_run(store, str(nb), allow_path=True).id
    runner = Runner(store, slots=1, warm_kernels=0, executor=_BrokenExecutor())
    assert runner.step() == 1
    until(lambda: runner.step() == 0, timeout=30, what="the supervisor thread to end")
    with store.read() as session:
        run = session.get(Run, run_id)
        assert run.state in ("FAILED", "CRASHED")  # ended, not RUNNING or PENDING forever
        assert "its supervisor failed: RuntimeError: the supervisor tripped" in run.state_message
        assert run.error["evalue"].startswith("its supervisor failed")


def test_late_writes_of_a_reaped_attempt_leave_the_retry_alone(store, tmp_path):
    # An attempt cut off for longer than its lease: a reaper ended it and the retry runs elsewhere.
    # When the old attempt gets through again, its end, result, log size and cells change nothing there.
    run_id = _running(store, tmp_path, max_attempts=2)
    old = RunRecorder(store, run_id, 1, 0, 10_000)
    with store.write() as session:
        session.execute(insert(CellRun), [{"run_id": run_id, "attempt": 1, "cell_index": 0, "cell_id": "a",
                                           "state": "RUNNING"}])
    assert reap(store, 30) == [run_id]
    with store.write() as session:  # attempt 2, elsewhere
        run = states.lock_run(session, run_id)
        states.transition(session, run, states.S.PENDING)
        states.transition(session, run, states.S.RUNNING)
        run.result, run.log_bytes = {"from": "attempt 2"}, 7
    old.cell_complete(0, {"cell_type": "code", "id": "a", "execution_count": 1, "outputs": [
        {"output_type": "display_data", "data": {RECORD_MIME: {"name": "from", "value": "attempt 1"}}}]})
    old.log("stdout", "late line", force=True, flush=False)
    assert _end_attempt(store, old, None) == "RUNNING"
    assert launcher.settle(store, run_id, "crash", "a late crash of attempt 1", attempt=1) is False
    with store.read() as session:
        run = session.get(Run, run_id)
        assert (run.state, run.attempt, run.result, run.log_bytes) == ("RUNNING", 2, {"from": "attempt 2"}, 7)
        cell = session.execute(select(CellRun.state).where(CellRun.run_id == run_id, CellRun.attempt == 1)).scalar()
        assert cell == "FAILED"  # as the reaper left it, not COMPLETED by the late write


# -- the retry helper itself ----------------------------------------------------------------------------

def test_retrying_waits_out_a_lock_says_so_once_and_never_retries_a_bug(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NBFLOW_SQLITE_BUSY_TIMEOUT_MS", "50")
    path = tmp_path / "retry.db"
    store = Store(f"sqlite:///{path}")
    store.ensure_schema()
    holder = sqlite3.connect(path, isolation_level=None)  # another connection holds the write lock
    holder.execute("BEGIN IMMEDIATE")
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) == 4:
            holder.execute("ROLLBACK")
        with store.write() as session:
            session.execute(text("UPDATE run SET state = state WHERE 1 = 0"))
        return "written"

    caplog.set_level("WARNING", logger="nbflow.store")
    assert retrying(write, store, what="a test write") == "written"
    assert len(calls) == 4  # three refused by the lock, then through
    lines = [r.getMessage() for r in caplog.records if r.name == "nbflow.store"]
    assert len(lines) == 2, lines
    assert "unavailable (a test write): database is locked" in lines[0] and "is back after" in lines[1]

    bugs: list[int] = []

    def bug() -> None:
        bugs.append(1)
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        retrying(bug, store)
    assert bugs == [1]  # a bug is not weather: raised at once

    holder.execute("BEGIN IMMEDIATE")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    # The caller stops waiting: the outage's error comes out (the driver's own from nbflow's BEGIN IMMEDIATE).
    with pytest.raises((OperationalError, sqlite3.OperationalError)) as stopped:
        retrying(write, store, stop=stop)
    assert is_unavailable(stopped.value)
    holder.execute("ROLLBACK")
    store.dispose()


def test_outage_or_bug():
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    with pytest.raises(OperationalError) as refused:
        engine.connect()
    assert is_unavailable(refused.value)
    with create_engine(PG_URL).connect() as conn, pytest.raises(ProgrammingError) as missing:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_unavailable(missing.value)
    assert not is_unavailable(ValueError("no"))
