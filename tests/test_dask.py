"""The Dask executor: a real ``nbflow worker --executor dask`` hands its runs to a real ``LocalCluster``
(two worker processes), where each attempt runs in a run process of its own and reports to the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import make_notebook, run_cli, start
from sqlalchemy import select
from test_execution import kernels_left
from test_runner import wait_for_state

from nbflow.core.flows import FlowOptions, register
from nbflow.core.runs import create_run, history, request_cancel
from nbflow.errors import ExecutorUnavailable
from nbflow.store import open_store
from nbflow.store.models import CellRun, Log, Run


def local_cluster(n_workers: int) -> Any:
    """Dask worker processes, one thread each, on loopback. No dashboard, and the scheduler's HTTP server
    (which ``dashboard_address=None`` would put on port 8787) on a free port."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two Dask workers; and a client to look at them."""
    from distributed import Client

    with local_cluster(2) as local, Client(local) as client:
        yield client


@pytest.fixture
def dask_worker(cluster: Any, tmp_path: Path) -> Iterator[Any]:
    """Starts ``nbflow worker --executor dask`` for the test's nbflow instance; after the test, SIGTERM
    must stop it cleanly (exit 0: runs drained, Dask client closed)."""
    cluster.wait_for_workers(2, timeout=30)  # a test may have killed one: its nanny restarts it
    procs: list[subprocess.Popen] = []

    def launch(env: dict[str, str], slots: int) -> None:
        procs.append(start(env, tmp_path, "worker", "--executor", "dask", "--dask-scheduler",
                           cluster.scheduler.address, "--slots", slots, "--poll", 0.2, "--grace", 0))

    yield launch
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == 0, err
        assert "executor dask at tcp://127.0.0.1:" in err


def dask_worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid).values())


def wait_until_running_cell(run_id: uuid.UUID, index: int, timeout: float = 60) -> Run:
    store = open_store()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.read() as session:
            cell = session.execute(select(CellRun).where(CellRun.run_id == run_id, CellRun.cell_index == index,
                                                         CellRun.state == "RUNNING")).scalar()
            if cell is not None:
                return session.get(Run, run_id)
        time.sleep(0.1)
    with store.read() as session:
        run = session.get(Run, run_id)
        raise AssertionError(f"cell {index} of run {run_id} never started: the run is {run.state} "
                             f"({run.state_message}), error {run.error}")


@pytest.mark.slow
def test_flows_run_on_the_dask_cluster_end_to_end(nbflow_env, tmp_path, cluster, dask_worker):
    store = open_store()
    ok = make_notebook(tmp_path, "double", ["import nbflow\nnbflow.record('double', x * 2)\nprint('doubled', x)"],
                       parameters="x = 1")
    boom = make_notebook(tmp_path, "boom", ["y = 1", "raise ValueError('boom from a dask worker')", "z = 3"])
    sleeper = make_notebook(tmp_path, "sleeper", ["import time", "time.sleep(600)"])
    hold = create_run(store, str(sleeper), allow_path=True)
    doubles = [create_run(store, str(ok), {"x": x}, allow_path=True) for x in (2, 3)]
    failing = create_run(store, str(boom), allow_path=True)
    dask_worker(nbflow_env, slots=4)

    running = wait_until_running_cell(hold.id, 1)
    # It runs in a run process of its own whose parent is a Dask worker process, not the nbflow worker.
    assert psutil.Process(running.process_id).ppid() in dask_worker_pids(cluster)
    request_cancel(store, hold.id)
    wait_for_state(str(hold.id), "CANCELLED", timeout=120)  # far from the cell's 600 s: it was stopped
    assert kernels_left(str(hold.id)) == []
    assert not psutil.pid_exists(running.process_id)

    for run in doubles:
        wait_for_state(str(run.id), "COMPLETED", timeout=90)
    wait_for_state(str(failing.id), "FAILED", timeout=90)
    with store.read() as session:
        for run, x in zip(doubles, (2, 3), strict=True):
            run = session.get(Run, run.id)
            assert run.result == {"double": x * 2}
            cells = session.execute(select(CellRun.cell_index, CellRun.state).where(CellRun.run_id == run.id)
                                    .order_by(CellRun.cell_index)).all()
            assert cells == [(0, "COMPLETED"), (1, "COMPLETED"), (2, "COMPLETED")]  # parameters, injected, code
            assert Path(run.output_path).is_file()
            out = session.execute(select(Log.text).where(Log.run_id == run.id, Log.stream == "stdout")).scalars()
            assert f"doubled {x}" in "".join(out)
        failed = session.get(Run, failing.id)
        assert failed.error["ename"] == "ValueError" and failed.error["evalue"] == "boom from a dask worker"
        assert failed.error["cell_index"] == 1
        assert [c.state for c in session.execute(select(CellRun).where(CellRun.run_id == failing.id)
                                                 .order_by(CellRun.cell_index)).scalars()] == \
            ["COMPLETED", "FAILED", "SKIPPED"]
        cancelled = session.get(Run, hold.id)
        assert [e["to"] for e in history(session, cancelled)][-2:] == ["CANCELLING", "CANCELLED"]


@pytest.mark.slow
def test_a_dask_worker_dying_mid_run_crashes_the_attempt_and_the_retry_completes(
        sqlite_env, tmp_path, cluster, dask_worker):
    store = open_store()
    marker = tmp_path / "first-attempt-was-here"
    nb = make_notebook(tmp_path, "once", ["import pathlib, time\np = pathlib.Path(marker)\n"
                                          "if not p.exists():\n    p.write_text('1')\n    time.sleep(600)"],
                       parameters="marker = ''")
    register(store, nb, options=FlowOptions(retries=1, retry_delay=0))
    run = create_run(store, "once", {"marker": str(marker)})
    dask_worker(sqlite_env, slots=1)
    running = wait_until_running_cell(run.id, 2)  # after the parameters cell and papermill's injected one
    run_process = psutil.Process(running.process_id)
    dask_pid = run_process.ppid()
    assert dask_pid in dask_worker_pids(cluster)
    os.kill(dask_pid, signal.SIGKILL)

    wait_for_state(str(run.id), "COMPLETED", timeout=90)
    with store.read() as session:
        ended = session.get(Run, run.id)
        seen = [(e["to"], e["message"]) for e in history(session, ended)]
    assert ended.attempt == 2
    assert ("CRASHED", "the Dask worker executing the attempt died") in seen
    _, alive = psutil.wait_procs([run_process], timeout=10)
    assert alive == []  # the first run process died with its Dask worker...
    assert kernels_left(str(run.id)) == []  # ...and the second left no kernel either


def test_dask_executor_options_are_checked_before_anything_starts(sqlite_env, tmp_path):
    db = tmp_path / "home" / "nbflow.db"
    result = run_cli("worker", "--executor", "dask")
    assert result.exit_code == 2 and "--executor dask needs --dask-scheduler" in result.output
    result = run_cli("worker", "--dask-scheduler", "tcp://127.0.0.1:8786")
    assert result.exit_code == 2 and "--dask-scheduler is for --executor dask" in result.output
    result = run_cli("serve", "--executor", "dask", "--no-api")
    assert result.exit_code == 2 and "--dask-scheduler" in result.output
    assert not db.exists()  # nothing was opened, let alone written


def test_an_unreachable_dask_scheduler_is_one_clear_error(sqlite_env):
    from nbflow.execution.executors.dask import DaskExecutor

    with pytest.raises(ExecutorUnavailable, match=r"cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        DaskExecutor("tcp://127.0.0.1:9", timeout=1)


def test_without_dask_installed_the_worker_says_what_to_install(sqlite_env, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets without the extra
    result = run_cli("worker", "--executor", "dask", "--dask-scheduler", "tcp://127.0.0.1:8786")
    assert result.exit_code == 2
    assert "pip install 'nbflow-orchestrator[dask]'" in result.output
    assert not (tmp_path / "home" / "nbflow.db").exists()


@pytest.mark.slow
def test_losing_the_dask_scheduler_crashes_the_run_in_flight_and_leaves_the_queue_alone(sqlite_env, tmp_path, caplog):
    from nbflow.execution.executors.dask import DaskExecutor
    from nbflow.services.runner import Runner

    store = open_store()
    sleeper = make_notebook(tmp_path, "sleeper", ["import time", "time.sleep(600)"])
    later = make_notebook(tmp_path, "later", ["x = 1"])
    lost = create_run(store, str(sleeper), allow_path=True)
    cluster = local_cluster(1)
    executor = DaskExecutor(cluster.scheduler_address, timeout=2)
    runner = Runner(store, slots=1, poll_interval=0.2, warm_kernels=0, executor=executor)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        running = wait_until_running_cell(lost.id, 1)
        queued = create_run(store, str(later), allow_path=True)
        cluster.close()
        wait_for_state(str(lost.id), "CRASHED", timeout=30)
        with store.read() as session:
            assert "scheduler-connection-lost" in session.get(Run, lost.id).state_message
        try:  # the run process is gone, or goes within the deadline (it may be gone already)
            _, alive = psutil.wait_procs([psutil.Process(running.process_id)], timeout=10)
        except psutil.NoSuchProcess:
            alive = []
        assert alive == []
        deadline = time.monotonic() + 30  # the runner claims the next run, cannot reach Dask, gives it back
        while "stays queued" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"run {queued.id} stays queued" in caplog.text
        with store.read() as session:
            assert session.get(Run, queued.id).state == "PENDING"
            assert [e["to"] for e in history(session, session.get(Run, queued.id))] == ["PENDING"]
    finally:
        runner.request_stop()
        thread.join(60)
        executor.close()
        cluster.close()
