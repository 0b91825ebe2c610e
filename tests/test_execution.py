"""Runs end to end: real notebooks, real kernels through papermill, a real database (both backends
where the database matters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import nbformat
import psutil
import pytest
from helpers import make_notebook
from sqlalchemy import func, select

from nbflow.core import states
from nbflow.core.flows import FlowOptions, register
from nbflow.core.runs import create_run, history, logs, run_document
from nbflow.execution.launcher import execute_run
from nbflow.store import open_store
from nbflow.store.models import FlowVersion, Log, Run

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "notebooks" / "examples" / "hello.ipynb"


def run_to_end(target: str | Path, params: dict | None = None, **kwargs):
    store = open_store()
    run = create_run(store, str(target), params or {}, **kwargs, allow_path=True)
    ended = execute_run(store, run.id)
    with store.read() as session:
        return run_document(session, ended), history(session, ended), logs(session, ended)


def test_hello_completes_with_cells_results_logs_and_output(nbflow_env):
    doc, events, log = run_to_end(HELLO, {"name": "Ada", "n": "3"})
    assert doc["state"] == "COMPLETED" and doc["state_name"] == "Completed"
    assert doc["parameters"] == {"name": "Ada", "n": 3}
    assert doc["result"] == {"greeting": "Hello, Ada! (3/3)", "count": 3}
    assert [e["to"] for e in events] == ["PENDING", "RUNNING", "COMPLETED"]
    # every code cell has a record: the injected-parameters cell included
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED"] * 4
    assert all(c["duration"] is not None and c["duration"] >= 0 for c in doc["cells"])
    assert doc["started_at"] <= doc["ended_at"]
    stdout = "".join(line["text"] for line in log if line["stream"] == "stdout")
    assert "Hello, Ada! (1/3)" in stdout and "Hello, Ada! (3/3)" in stdout
    out = Path(doc["output_path"])
    assert out == Path(os.environ["NBFLOW_HOME"]).resolve() / "runs" / "hello" / f"{doc['id']}.ipynb"
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'name = "Ada"' in injected[0].source
    # a short label, not a copy of the input notebook (papermill embeds one when given a notebook object)
    assert nb.metadata.papermill["input_path"] == f"{HELLO} (nbflow flow hello v1)"


def test_failing_cell_fails_the_run_and_skips_the_rest(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "boom", ["a = 1", "raise ValueError('boom ' + str(a))", "never = True"],
                       parameters="a = 0")
    doc, events, _ = run_to_end(nb)
    assert doc["state"] == "FAILED" and doc["state_name"] == "Failed"
    err = doc["error"]
    assert err["ename"] == "ValueError" and err["evalue"] == "boom 1"
    # executed notebook: 0 parameters, 1 injected parameters? (none injected: no params given), 1 a=1, 2 raise
    assert err["cell_index"] == 2
    assert any("ValueError" in line for line in err["traceback"])
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED", "COMPLETED", "FAILED", "SKIPPED"]
    assert events[-1]["to"] == "FAILED"
    assert Path(doc["output_path"]).exists()


def test_retries_with_exponential_backoff_then_fail(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "flaky", ["raise RuntimeError('always')"])
    register(open_store(), nb, name="flaky", options=FlowOptions(retries=2, retry_delay=0.2, retry_backoff=3))
    doc, events, _ = run_to_end("flaky")
    assert doc["state"] == "FAILED" and doc["attempt"] == 3 and doc["max_attempts"] == 3
    names = [(e["to"], e["name"]) for e in events]
    assert names.count(("SCHEDULED", "AwaitingRetry")) == 2
    assert names[-1] == ("FAILED", "Failed")
    # each retry waited its delay: 0.2 * 3**0, then 0.2 * 3**1
    at = {(e["to"], e["attempt"]): datetime.fromisoformat(e["at"]) for e in events}
    for attempt, delay in ((2, 0.2), (3, 0.6)):
        assert (at[("PENDING", attempt)] - at[("SCHEDULED", attempt)]).total_seconds() >= delay - 0.01
    assert [e["message"] for e in events if e["name"] == "AwaitingRetry"] == [
        "attempt 2 of 3 in 0.2s", "attempt 3 of 3 in 0.6s"]
    assert [e["attempt"] for e in events if e["to"] == "RUNNING"] == [1, 2, 3]


def test_retry_succeeds_on_second_attempt(nbflow_env, tmp_path):
    marker = tmp_path / "marker"
    nb = make_notebook(tmp_path, "second", [
        "import pathlib\np = pathlib.Path(marker)\nfirst = not p.exists()\np.touch()\n"
        "if first:\n    raise RuntimeError('first attempt fails')",
        "import nbflow\nnbflow.record('ok', True)",
    ], parameters="marker = ''")
    register(open_store(), nb, name="second", options=FlowOptions(retries=1, retry_delay=0))
    doc, _events, _ = run_to_end("second", {"marker": str(marker)})
    assert doc["state"] == "COMPLETED" and doc["attempt"] == 2
    assert doc["result"] == {"ok": True}
    assert doc["error"] is None
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED"] * 4  # cells of the latest attempt


def kernels_left(run_id: str) -> list[int]:
    """Live kernels started by the run's process: spawned ones are told their parent in JPY_PARENT_PID,
    kernels forked by a runner's zygote (nbflow.execution.zygote) are named ``nbflow-k<pid>``."""
    with open_store().read() as session:
        pid = session.get(Run, uuid.UUID(run_id)).process_id
    assert pid, "the run process recorded no pid"
    deadline = time.monotonic() + 5  # an orphaned kernel notices its parent is gone within ~1 s
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline", "name"]):
            try:
                if proc.info["name"] == f"nbflow-k{pid}" or (
                        "ipykernel_launcher" in " ".join(proc.info["cmdline"] or [])
                        and proc.environ().get("JPY_PARENT_PID") == str(pid)):
                    found.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_whole_run_timeout_kills_kernel_and_ends_timed_out(sqlite_env, tmp_path):
    # The timeout counts from the run process's start: 10 s leaves a loaded machine time to reach cell 1.
    nb = make_notebook(tmp_path, "slow", ["x = 1", "import time\ntime.sleep(60)"])
    register(open_store(), nb, name="slow", options=FlowOptions(timeout=10))
    doc, _events, _ = run_to_end("slow")  # TimedOut below: the 60 s cell was stopped, not waited for
    assert doc["state"] == "FAILED" and doc["state_name"] == "TimedOut"
    assert doc["error"]["ename"] == "TimedOut" and "timeout of 10s" in doc["error"]["evalue"]
    assert doc["error"]["cell_index"] == 1
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED", "FAILED"]  # the cell it was stuck in
    assert kernels_left(doc["id"]) == [], "the run's kernel outlived the timeout"


def test_cell_timeout(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "cellslow", ["x = 1", "import time\ntime.sleep(30)", "y = 2"])
    register(open_store(), nb, name="cellslow", options=FlowOptions(cell_timeout=1.5))
    doc, _, _ = run_to_end("cellslow")
    assert doc["state"] == "FAILED" and doc["state_name"] == "TimedOut"
    assert doc["error"]["ename"] == "CellTimeoutError" and doc["error"]["cell_index"] == 1
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED", "FAILED", "SKIPPED"]


@pytest.mark.parametrize(("code", "state"), [("0", "COMPLETED"), ("", "COMPLETED"), ("3", "FAILED")])
def test_system_exit(sqlite_env, tmp_path, code, state):
    nb = make_notebook(tmp_path, "exits", [f"import sys\nsys.exit({code})", "after = 1"])
    doc, _, _ = run_to_end(nb)
    assert doc["state"] == state
    assert doc["cells"][1]["state"] == "SKIPPED"
    if state == "FAILED":
        assert doc["error"]["ename"] == "SystemExit"


def test_record_rejects_values_json_cannot_hold(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "badrecord", ["import nbflow\nnbflow.record('s', {1, 2})"])
    doc, _, _ = run_to_end(nb)
    assert doc["state"] == "FAILED" and doc["error"]["ename"] == "TypeError"
    assert "JSON-serialisable" in doc["error"]["evalue"]


def test_changed_notebook_makes_a_new_version_and_runs_record_it(nbflow_env, tmp_path):
    nb_path = make_notebook(tmp_path, "ver", ["import nbflow\nnbflow.record('v', 1)"])
    first, _, _ = run_to_end(nb_path)
    again, _, _ = run_to_end(nb_path)
    assert first["flow_version"] == again["flow_version"] == 1
    original = nb_path.read_text()
    make_notebook(tmp_path, "ver", ["import nbflow\nnbflow.record('v', 2)"])
    second, _, _ = run_to_end(nb_path)
    assert second["flow_version"] == 2 and second["result"] == {"v": 2}
    store = open_store()
    with store.read() as session:
        run = session.get(Run, uuid.UUID(first["id"]))
        assert session.get(FlowVersion, run.flow_version_id).source == original
        assert session.execute(select(func.count(FlowVersion.id))).scalar() == 2
    nb_path.write_text(original)  # back to the first content: it becomes the newest version again
    third, _, _ = run_to_end(nb_path)
    assert third["result"] == {"v": 1} and third["flow_version"] == 3


def test_log_is_bounded_per_run(sqlite_env, tmp_path, monkeypatch):
    monkeypatch.setenv("NBFLOW_LOG_LIMIT_BYTES", "3000")
    nb = make_notebook(tmp_path, "chatty", ["for i in range(2000):\n    print('line', i)"])
    doc, _, log = run_to_end(nb)
    assert doc["state"] == "COMPLETED"
    streamed = sum(len(line["text"].encode()) for line in log if line["stream"] != "system")
    assert 0 < streamed <= 3000
    assert any("log truncated" in line["text"] for line in log)
    store = open_store()
    with store.read() as session:
        assert session.execute(select(func.count(Log.id))).scalar() < 50


def test_run_json_shape_via_cli(nbflow_env, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nbflow.cli", "run", str(HELLO), "-p", "name", "Bo", "--json"],
        env=nbflow_env, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else
    for key in ("id", "flow", "flow_version", "state", "state_name", "parameters", "attempt", "created_at",
                "started_at", "ended_at", "output_path", "error", "result", "cells"):
        assert key in doc
    assert doc["flow"] == "hello" and doc["error"] is None and doc["result"]["greeting"] == "Hello, Bo! (2/2)"
    assert set(doc["cells"][0]) >= {"index", "state", "started_at", "ended_at", "duration"}
    shown = subprocess.run([sys.executable, "-m", "nbflow.cli", "show", doc["id"][:8], "--json"],
                           env=nbflow_env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(shown.stdout) == doc
    listed = subprocess.run([sys.executable, "-m", "nbflow.cli", "runs", "--flow", "hello", "--json"],
                            env=nbflow_env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert [r["id"] for r in json.loads(listed.stdout)["runs"]] == [doc["id"]]


def test_crashed_run_process_is_marked_crashed(sqlite_env, tmp_path):
    # The kernel's parent is the run process: killing it is a worker dying mid-run.
    nb = make_notebook(tmp_path, "crash", ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                                           "import time\ntime.sleep(5)"])
    doc, events, _ = run_to_end(nb)
    assert doc["state"] == "CRASHED" and doc["error"]["ename"] == "Crashed"
    assert "exited with code -9" in doc["error"]["evalue"]
    assert events[-1]["to"] == "CRASHED"
    assert kernels_left(doc["id"]) == []


def test_ctrl_c_cancels_the_run(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "long", ["import time\ntime.sleep(60)"])
    proc = subprocess.Popen([sys.executable, "-m", "nbflow.cli", "run", str(nb), "--json"],
                            env=sqlite_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = open_store()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with store.read() as session:
            if session.execute(select(Run).where(Run.state == "RUNNING")).first():
                break
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    doc = json.loads(out)
    assert doc["state"] == "CANCELLED"
    with store.read() as session:
        ev = history(session, session.get(Run, uuid.UUID(doc["id"])))
    assert [e["to"] for e in ev][-2:] == ["CANCELLING", "CANCELLED"]
    assert kernels_left(doc["id"]) == []


def test_state_machine_guards_runs(sqlite_env):
    store = open_store()
    run = create_run(store, str(HELLO), allow_path=True)
    execute_run(store, run.id)
    with store.write() as session, pytest.raises(Exception, match="cannot go from COMPLETED to RUNNING"):
        states.transition(session, states.lock_run(session, run.id), states.S.RUNNING)


def test_progress_bar_is_papermills_on_stderr_and_kernel_chatter_is_not(sqlite_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(HELLO), "--progress", "--json"],
                          env=sqlite_env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "COMPLETED"
    assert "Executing" in proc.stderr and "4/4" in proc.stderr  # papermill's tqdm bar over the 4 cells
    assert "IPKernelApp" not in proc.stderr


def test_cells_and_logs_can_be_watched_while_the_run_is_going(nbflow_env, tmp_path):
    import threading

    from nbflow.store.models import CellRun

    nb = make_notebook(tmp_path, "watch", ["print('first', flush=True)", "import time\ntime.sleep(4)", "z = 3"])
    store = open_store()
    run = create_run(store, str(nb), allow_path=True)
    worker = threading.Thread(target=execute_run, args=(store, run.id))
    worker.start()
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and seen is None:
        with store.read() as session:
            cells = [c.state for c in session.execute(
                select(CellRun).where(CellRun.run_id == run.id).order_by(CellRun.cell_index)).scalars()]
            if cells == ["COMPLETED", "RUNNING", "PENDING"]:
                seen = (cells, session.get(Run, run.id).state,
                        [line.text for line in session.execute(select(Log).where(Log.run_id == run.id)).scalars()])
        time.sleep(0.05)
    worker.join(timeout=60)
    assert seen is not None, "never saw the second cell running"
    assert seen[1] == "RUNNING"
    assert any("first" in text for text in seen[2]), "the first cell's output was not in the log yet"
    with store.read() as session:
        assert session.get(Run, run.id).state == "COMPLETED"


def test_a_run_cancelled_before_its_running_write_executes_nothing(nbflow_env, tmp_path):
    """The run process writes PENDING -> RUNNING from its recorder's thread, checking the run is still
    PENDING; a cancel that lands first stops the attempt before its first cell, and writes nothing else."""
    from nbflow.core.runs import request_cancel
    from nbflow.execution.execute import NotStarted, RunRecorder
    from nbflow.store.models import CellRun

    store = open_store()
    nb = make_notebook(tmp_path, "never", ["x = 1"])
    # Held by a process: a cancel is CANCELLING.
    run = create_run(store, str(nb), worker_id="worker:test", allow_path=True)
    recorder = RunRecorder(store, run.id, 1, 0, 1_000_000)
    request_cancel(store, run.id)
    recorder.start()
    recorder.log("system", "a line the start's transaction carries", force=True, flush=False)
    with pytest.raises(NotStarted):
        recorder.cell_start(0, {"cell_type": "code"})
    with pytest.raises(NotStarted):
        recorder.close()
    recorder.flush()  # closed: returns at once, writes nothing
    with store.read() as session:
        assert session.get(Run, run.id).state == "CANCELLING"
        assert session.execute(select(func.count()).select_from(CellRun)).scalar() == 0
        assert session.execute(select(func.count()).select_from(Log).where(Log.run_id == run.id)).scalar() == 0
    assert [e["to"] for e in history_of(store, run.id)] == ["PENDING", "CANCELLING"]


def history_of(store, run_id):  # type: ignore[no-untyped-def]
    with store.read() as session:
        return history(session, session.get(Run, run_id))
