"""Queued runs: trigger, workers that never run a run twice, and cancellation that always finishes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest
from helpers import make_notebook, nbflow, start, until
from sqlalchemy import func, select
from test_execution import kernels_left

from nbflow.core.runs import create_run, history
from nbflow.services.runner import claim
from nbflow.store import open_store
from nbflow.store.models import CellRun, Log, Run, RunStateEvent


def wait_for_state(run_id: str, state: str, timeout: float = 30) -> None:
    store = open_store()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.read() as session:
            if session.get(Run, uuid.UUID(run_id)).state == state:
                return
        time.sleep(0.1)
    with store.read() as session:
        run = session.get(Run, uuid.UUID(run_id))
        seen = [(e["to"], e["message"]) for e in history(session, run)]
        lines = [f"{log.attempt}/{log.stream}: {log.text}" for log in session.execute(
            select(Log).where(Log.run_id == run.id).order_by(Log.id)).scalars()]
    raise AssertionError(f"run {run_id} never reached {state}: it is {run.state} ({run.state_message}); "
                         f"history {seen}; error {run.error}; log {lines[-6:]}")


def test_concurrent_claims_take_each_run_exactly_once(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "q", ["x = 1"])
    store = open_store()
    queued = {create_run(store, str(nb), allow_path=True).id for _ in range(30)}
    taken: list[uuid.UUID] = []
    lock = threading.Lock()

    def grab(worker: str) -> None:
        while True:
            got = claim(store, worker, 3)
            if not got:
                return
            with lock:
                taken.extend(got)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(queued)  # every run, and none twice
    with store.read() as session:
        assert session.execute(select(func.count()).where(Run.worker_id.is_(None))).scalar() == 0


def test_two_workers_drain_the_queue_without_running_anything_twice(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "quick", ["import nbflow\nnbflow.record('i', i)"], parameters="i = 0")
    ids = [json.loads(nbflow(nbflow_env, tmp_path, "trigger", str(nb), "-p", "i", str(i), "--json").stdout)["id"]
           for i in range(6)]
    workers = [start(nbflow_env, tmp_path, "worker", "--slots", "2", "--poll", "0.1", "--exit-when-idle")
               for _ in range(2)]
    errors = []
    for w in workers:
        _, err = w.communicate(timeout=120)
        errors.append(err)
        assert w.returncode == 0, err
    store = open_store()
    with store.read() as session:
        runs = {str(r.id): r for r in session.execute(select(Run)).scalars()}
        assert {runs[i].state for i in ids} == {"COMPLETED"}, (
            [(runs[i].state, runs[i].state_message, runs[i].error) for i in ids], errors)
        assert [runs[i].result for i in ids] == [{"i": n} for n in range(6)]
        assert all(runs[i].worker_id.startswith("worker:") for i in ids)
        started = session.execute(
            select(RunStateEvent.run_id, func.count()).where(RunStateEvent.to_state == "RUNNING")
            .group_by(RunStateEvent.run_id)
        ).all()
    assert sorted(str(r) for r, n in started if n == 1) == sorted(ids)


def test_trigger_rejects_bad_parameters_and_queues_nothing(sqlite_env, tmp_path):
    proc = nbflow(sqlite_env, tmp_path, "trigger", str(make_notebook(tmp_path, "t", ["pass"], parameters="n = 1")),
                  "-p", "n", "many")
    assert proc.returncode == 2 and proc.stderr.startswith("nbflow: error: parameter 'n' expects an int")
    with open_store().read() as session:
        assert session.execute(select(func.count(Run.id))).scalar() == 0


def test_trigger_wait_returns_the_run_outcome(sqlite_env, tmp_path):
    bad = make_notebook(tmp_path, "bad", ["raise KeyError('k')"])
    worker = start(sqlite_env, tmp_path, "worker", "--poll", "0.1")
    try:
        proc = nbflow(sqlite_env, tmp_path, "trigger", str(bad), "--wait", "--json")
        assert proc.returncode == 1
        doc = json.loads(proc.stdout)
        assert doc["state"] == "FAILED" and doc["error"]["ename"] == "KeyError"
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


def test_cancel_a_queued_run_ends_it_at_once(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "never", ["x = 1"])
    run_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", str(nb), "--json").stdout)["id"]
    proc = nbflow(sqlite_env, tmp_path, "cancel", run_id[:8], "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "CANCELLED"
    # a worker finds nothing to do
    assert nbflow(sqlite_env, tmp_path, "worker", "--exit-when-idle").returncode == 0
    again = nbflow(sqlite_env, tmp_path, "cancel", run_id)
    assert again.returncode == 2 and "has already ended (CANCELLED)" in again.stderr


def test_cancel_a_running_run_under_a_worker_kills_its_kernel(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "hang", ["x = 1", "import time\ntime.sleep(120)", "y = 2"])
    run_id = json.loads(nbflow(nbflow_env, tmp_path, "trigger", str(nb), "--json").stdout)["id"]
    worker = start(nbflow_env, tmp_path, "worker", "--poll", "0.1")
    try:
        store = open_store()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the hanging cell is running
            with store.read() as session:
                if session.execute(select(CellRun).where(CellRun.cell_index == 1,
                                                         CellRun.state == "RUNNING")).first():
                    break
            time.sleep(0.1)
        assert nbflow(nbflow_env, tmp_path, "cancel", run_id).returncode == 0
        # Well before the cell's 120 s sleep ends: the kernel was stopped, not waited for.
        wait_for_state(run_id, "CANCELLED", timeout=60)
        with store.read() as session:
            run = session.get(Run, uuid.UUID(run_id))
            assert [e["to"] for e in history(session, run)][-2:] == ["CANCELLING", "CANCELLED"]
            cells = [c.state for c in session.execute(
                select(CellRun).where(CellRun.run_id == run.id).order_by(CellRun.cell_index)).scalars()]
        assert cells == ["COMPLETED", "CANCELLED", "SKIPPED"]
        assert kernels_left(run_id) == []
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


def test_cancel_reaches_a_foreground_nbflow_run(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "fg", ["import time\ntime.sleep(120)"])
    fg = start(sqlite_env, tmp_path, "run", str(nb), "--json")
    store = open_store()
    deadline = time.monotonic() + 30
    run_id = None
    while time.monotonic() < deadline and run_id is None:
        with store.read() as session:
            row = session.execute(select(Run.id).where(Run.state == "RUNNING")).first()
            run_id = str(row[0]) if row else None
        time.sleep(0.1)
    assert run_id, "the run never started"
    assert nbflow(sqlite_env, tmp_path, "cancel", run_id).returncode == 0
    out, err = fg.communicate(timeout=30)
    assert fg.returncode == 1, err
    assert json.loads(out)["state"] == "CANCELLED"
    assert kernels_left(run_id) == []


def test_reap_crashes_expired_runs_and_requeues_their_retries(nbflow_env, tmp_path):
    from datetime import timedelta

    from nbflow.core import states
    from nbflow.core.flows import FlowOptions, register
    from nbflow.services.runner import reap
    from nbflow.store.models import utcnow

    nb = make_notebook(tmp_path, "r", ["x = 1"])
    store = open_store()
    register(store, nb, name="r", options=FlowOptions(retries=1, retry_delay=0))
    held, fresh, orphan_claim = (create_run(store, "r").id for _ in range(3))
    old = utcnow() - timedelta(seconds=60)
    with store.write() as session:
        for run_id, beat in ((held, old), (fresh, utcnow())):
            run = states.lock_run(session, run_id)
            run.worker_id = "worker:gone"
            states.transition(session, run, states.S.RUNNING)
            run.heartbeat_at = beat
        claimed = states.lock_run(session, orphan_claim)
        claimed.worker_id, claimed.heartbeat_at = "worker:gone", old
    assert sorted(reap(store, lease_seconds=10)) == sorted([held, orphan_claim])
    with store.read() as session:
        crashed = session.get(Run, held)
        assert (crashed.state, crashed.state_name, crashed.attempt, crashed.worker_id) == (
            "SCHEDULED", "AwaitingRetry", 2, None)
        assert [e["to"] for e in history(session, crashed)][-2:] == ["CRASHED", "SCHEDULED"]
        assert "stopped renewing its lease" in crashed.error["evalue"]
        assert session.get(Run, fresh).state == "RUNNING"  # a renewed lease is never touched
        assert session.get(Run, orphan_claim).worker_id is None  # back in the queue, still PENDING
    assert sorted(claim(store, "worker:new", 5)) == sorted([held, orphan_claim])
    with store.read() as session:
        assert session.get(Run, held).state == "PENDING"


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_sigkilled_runner_run_is_recovered_and_retried(nbflow_env, tmp_path, command):
    marker = tmp_path / "attempted"
    nb = make_notebook(tmp_path, "survivor", [
        "import pathlib, time\np = pathlib.Path(marker)\nif not p.exists():\n    p.touch()\n    time.sleep(120)",
        "import nbflow\nnbflow.record('done', True)",
    ], parameters="marker = ''")
    assert nbflow(nbflow_env, tmp_path, "register", str(nb), "--retries", "1").returncode == 0
    run_id = json.loads(nbflow(nbflow_env, tmp_path, "trigger", "survivor", "-p", "marker", str(marker),
                               "--json").stdout)["id"]
    env = dict(nbflow_env, NBFLOW_LEASE_SECONDS="2")
    port = ["--port", "0"] if command == "serve" else []  # any free port: tests run side by side
    first = start(env, tmp_path, command, "--poll", "0.1", *port)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the first attempt never started"
    first.kill()  # SIGKILL: no chance to clean up
    first.wait(timeout=30)
    # Not communicate(): it waits for every process that inherited the worker's pipes, not for the worker
    # (the run's processes end on their own once their supervisor is gone, checked below, under load slowly).
    first.stdout.close()
    first.stderr.close()
    deadline = time.monotonic() + 60
    while kernels_left(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernels_left(run_id) == [], "the killed worker's run kept executing"
    second = start(env, tmp_path, command, "--poll", "0.1", *port)
    try:
        wait_for_state(run_id, "COMPLETED", timeout=60)
    finally:
        second.terminate()
        second.communicate(timeout=30)
    with open_store().read() as session:
        run = session.get(Run, uuid.UUID(run_id))
        assert run.attempt == 2 and run.result == {"done": True}
        assert [(e["to"], e["attempt"]) for e in history(session, run)] == [
            ("PENDING", 1), ("RUNNING", 1), ("CRASHED", 1), ("SCHEDULED", 2), ("PENDING", 2), ("RUNNING", 2),
            ("COMPLETED", 2)]


def test_long_healthy_run_is_never_marked_crashed(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "long", ["import time\ntime.sleep(5)"])
    run_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", str(nb), "--json").stdout)["id"]
    env = dict(sqlite_env, NBFLOW_LEASE_SECONDS="1.5")
    workers = [start(env, tmp_path, "worker", "--poll", "0.1") for _ in range(2)]  # the idle one reaps
    try:
        wait_for_state(run_id, "COMPLETED", timeout=60)
    finally:
        for w in workers:
            w.terminate()
            w.communicate(timeout=30)
    with open_store().read() as session:
        states_seen = [e["to"] for e in history(session, session.get(Run, uuid.UUID(run_id)))]
    assert states_seen == ["PENDING", "RUNNING", "COMPLETED"]


def test_sigterm_lets_short_runs_finish_and_cancels_long_ones_after_the_grace(sqlite_env, tmp_path):
    # Nothing here may depend on how fast the machine is (it failed under CPU load: two kernels booting at
    # once beside other work took longer than the 30 s it gave a run to turn RUNNING, and a fixed 1 s
    # stood for "the worker has stopped claiming"). So: generous deadlines on conditions, and the grace
    # long enough for the short run to end on a loaded machine. The short run ends only once the test
    # says so, after SIGTERM: a fixed sleep could end before the signal, and its free slot would rightly
    # be given to the queued run.
    release = tmp_path / "release"
    short = make_notebook(tmp_path, "short", [
        f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.05)"])
    long = make_notebook(tmp_path, "longer", ["import time\ntime.sleep(300)"])
    short_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", str(short), "--json").stdout)["id"]
    long_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", str(long), "--json").stdout)["id"]
    queued = make_notebook(tmp_path, "queued", ["x = 1"])
    worker = start(sqlite_env, tmp_path, "worker", "--slots", "2", "--poll", "0.1", "--grace", "20")
    wake_dir = tmp_path / "home" / "nbflow.db.wake"  # the worker's wake-up FIFO: there until it drains

    def listening() -> bool:
        return any(name.startswith(f"{worker.pid}-") for name in os.listdir(wake_dir)) if wake_dir.is_dir() else False

    try:
        wait_for_state(short_id, "RUNNING", timeout=180)
        wait_for_state(long_id, "RUNNING", timeout=180)
        later_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", str(queued), "--json").stdout)["id"]
        until(listening, timeout=60, what="the worker's wake-up FIFO")
        worker.send_signal(signal.SIGTERM)
        # Draining stops the listener, which removes its FIFO: from then on the worker claims nothing.
        until(lambda: not listening(), timeout=60, what="the worker to stop claiming")
        release.touch()
        worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0
    with open_store().read() as session:
        got = {i: session.get(Run, uuid.UUID(i)) for i in (short_id, long_id, later_id)}
        assert got[short_id].state == "COMPLETED"  # finished within the grace period
        assert got[long_id].state == "CANCELLED" and "shut down" in got[long_id].state_message
        assert (got[later_id].state, got[later_id].worker_id) == ("PENDING", None)  # never claimed
    assert kernels_left(long_id) == []
