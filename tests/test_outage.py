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
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PG_URL, _instance
from helpers import make_notebook, nbflow, start, until
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from nbflow.runs import history
from nbflow.store import open_store, reset_stores
from nbflow.store.models import CellRun, Log, Run

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


def _tracebacks(log: str, allowed: str | None = None) -> list[str]:
    """The log lines that head a traceback (the message logged with it), but for those equal to ``allowed``."""
    structure = re.compile(r"^(Traceback |During handling|The above exception|[\w.]+(Error|Exception)\b|\s|$)")
    header, found = "", []
    for line in log.splitlines():
        if line.startswith("Traceback "):
            if header != allowed:
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
    # serve's scheduler thread logs its failed passes itself (its outage handling is its own change).
    assert _tracebacks(text_, allowed="scheduler pass failed" if command == "serve" else None) == [], text_

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
    assert "COMPLETED" not in {v for k, v in got["cells"].items() if k[0] == 1}  # attempt 1 never finished
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
