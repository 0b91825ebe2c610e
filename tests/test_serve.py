"""``nbflow serve``: scheduler and runner in one process, and runs that start without waiting for a poll."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from helpers import make_notebook, nbflow, start
from sqlalchemy import select
from test_runner import wait_for_state

from nbflow.core.runs import create_run
from nbflow.services.runner import Runner
from nbflow.store import open_store
from nbflow.store.models import Run

# Far longer than any test waits: a run that starts quickly was woken, not found by polling.
SLOW_POLL = "120"


def stop(proc) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_fires_schedules_and_executes_triggered_runs(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "tick", ["import nbflow\nnbflow.record('region', region)"],
                       parameters="region = 'EU'")
    assert nbflow(nbflow_env, tmp_path, "register", str(nb)).returncode == 0
    serve = start(nbflow_env, tmp_path, "serve", "--tick", "0.2", "--poll", "0.2", "--port", "0")
    try:
        # added while serve runs: the store is the source of truth, no restart needed
        assert nbflow(nbflow_env, tmp_path, "schedule", "add", "tick", "--interval", "2s").returncode == 0
        manual = json.loads(nbflow(nbflow_env, tmp_path, "trigger", "tick", "-p", "region", "US", "--json").stdout)
        wait_for_state(manual["id"], "COMPLETED", timeout=60)
        store = open_store()
        deadline = time.monotonic() + 30
        scheduled: list[Run] = []
        while time.monotonic() < deadline and not scheduled:
            with store.read() as session:
                scheduled = list(session.execute(
                    select(Run).where(Run.trigger == "schedule", Run.state == "COMPLETED")).scalars())
            time.sleep(0.2)
        assert scheduled, "no scheduled run completed"
    finally:
        _out, err = stop(serve)
    assert serve.returncode == 0, err
    with store.read() as session:
        assert session.get(Run, uuid.UUID(manual["id"])).result == {"region": "US"}
        assert scheduled[0].result == {"region": "EU"}  # the flow's default: the schedule sets none


def test_a_run_queued_in_process_starts_without_waiting_for_the_poll(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "quick", ["x = 1"])
    store = open_store()
    runner = Runner(store, slots=1, poll_interval=float(SLOW_POLL))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the runner has looked once, found nothing, and gone to sleep
        run = create_run(store, str(nb), allow_path=True)
        wait_for_state(str(run.id), "COMPLETED", timeout=45)
    finally:
        runner.request_stop()
        thread.join(60)
    assert not thread.is_alive()


def test_a_run_queued_by_another_process_wakes_the_server(nbflow_env, tmp_path):
    """PostgreSQL: LISTEN/NOTIFY; SQLite: the server's FIFO next to the database file."""
    nb = make_notebook(tmp_path, "woken", ["x = 1"])
    serve = start(nbflow_env, tmp_path, "serve", "--poll", SLOW_POLL, "--port", "0")
    try:
        time.sleep(2.0)  # serve is up, listening, and idle
        run_id = json.loads(nbflow(nbflow_env, tmp_path, "trigger", str(nb), "--json").stdout)["id"]
        wait_for_state(run_id, "COMPLETED", timeout=45)
    finally:
        stop(serve)


def test_a_dead_listeners_fifo_is_forgotten_not_written_to_forever(sqlite_env, tmp_path):
    store = open_store()
    wake_dir = Path(sqlite_env["NBFLOW_HOME"]) / "nbflow.db.wake"
    wake_dir.mkdir(parents=True, exist_ok=True)
    os.mkfifo(wake_dir / "4242-deadbeef")  # left by a process killed with SIGKILL: nobody reads it
    create_run(store, str(make_notebook(tmp_path, "poke", ["x = 1"])), allow_path=True)
    assert not (wake_dir / "4242-deadbeef").exists()
