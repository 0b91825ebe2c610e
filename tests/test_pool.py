"""The warm kernel pool: runs skip kernel start-up, get the same results as cold runs, and leave nothing behind."""

from __future__ import annotations

import os
import threading
import time
import uuid

import nbformat
import psutil
from helpers import make_notebook
from sqlalchemy import select
from test_execution import kernels_left
from test_runner import wait_for_state

from nbflow.core.runs import create_run
from nbflow.execution.pool import KernelPool
from nbflow.execution.processes import fork
from nbflow.services.runner import Runner
from nbflow.store import open_store
from nbflow.store.models import Log, Run


def start_runner(store, warm: int) -> tuple[Runner, threading.Thread]:
    runner = Runner(store, slots=1, poll_interval=0.2, warm_kernels=warm)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread


def stop_runner(runner: Runner, thread: threading.Thread) -> None:
    runner.request_stop()
    thread.join(60)
    assert not thread.is_alive()


def wait_ready(pool: KernelPool, kernel: str = "python3", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready_count(kernel) < 1:
        assert time.monotonic() < deadline, "no warm slot became ready"
        time.sleep(0.05)


def system_log(run_id: uuid.UUID) -> str:
    with open_store().read() as session:
        return "\n".join(session.execute(
            select(Log.text).where(Log.run_id == run_id, Log.stream == "system")).scalars())


def outputs(run_id: uuid.UUID) -> list[tuple]:
    with open_store().read() as session:
        path = session.get(Run, run_id).output_path
    nb = nbformat.read(path, as_version=4)
    return [(c.execution_count, [{k: v for k, v in o.items() if k != "metadata"} for o in c.outputs])
            for c in nb.cells if c.cell_type == "code"]


def test_warm_and_cold_runs_give_the_same_outputs(nbflow_env, tmp_path):
    (tmp_path / "data.txt").write_text("relative paths resolve next to the notebook\n")
    nb = make_notebook(tmp_path, "same", [
        "import os\nprint(os.getcwd())",
        "print(open('data.txt').read().strip())",
        "import sys\nlen(In), 'x' in dir(), sys.argv[0].endswith('ipykernel_launcher.py')",
        "n * 2",
    ], parameters="n = 1")
    store = open_store()

    runner, thread = start_runner(store, warm=0)
    try:
        cold = create_run(store, str(nb), {"n": "21"}, allow_path=True)
        wait_for_state(str(cold.id), "COMPLETED", timeout=60)
    finally:
        stop_runner(runner, thread)

    runner, thread = start_runner(store, warm=1)
    try:
        wait_ready(runner.pool)
        warm = create_run(store, str(nb), {"n": "21"}, allow_path=True)
        wait_for_state(str(warm.id), "COMPLETED", timeout=60)
        assert runner.pool.hits == 1
    finally:
        stop_runner(runner, thread)

    assert "kernel python3 (cold)" in system_log(cold.id)
    assert "kernel python3 (warm)" in system_log(warm.id)
    got = outputs(warm.id)
    assert got == outputs(cold.id)
    # parameters, injected parameters, then the cells: counted from 1 as in a fresh kernel
    assert got[-4][1][0]["text"].strip() == str(tmp_path)  # the kernel runs in the notebook's folder
    assert got[-1] == (6, [{"output_type": "execute_result", "execution_count": 6, "data": {"text/plain": "42"}}])
    assert kernels_left(str(warm.id)) == []


def test_a_kernel_serves_one_run_and_the_pool_refills(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "pid", ["import os\nimport nbflow\nnbflow.record('kernel_pid', os.getpid())"])
    store = open_store()
    runner, thread = start_runner(store, warm=1)
    try:
        pids = []
        for _ in range(3):
            wait_ready(runner.pool)
            run = create_run(store, str(nb), allow_path=True)
            wait_for_state(str(run.id), "COMPLETED", timeout=60)
            with store.read() as session:
                pids.append(session.get(Run, run.id).result["kernel_pid"])
        assert runner.pool.hits == 3
        assert len(set(pids)) == 3  # a fresh kernel for each run
        # each killed once its run ended: right after its end is written (so the last may take a moment)
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(psutil.pid_exists(pid) for pid in pids)
    finally:
        stop_runner(runner, thread)


def test_closing_the_pool_stops_its_idle_slots_and_their_kernels(sqlite_env, tmp_path):
    store = open_store()
    pool = KernelPool(store, size=2)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready_count("python3") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slots = [psutil.Process(rp.pid) for q in pool._idle.values() for rp in q]
        family = [p for slot in slots for p in [slot, *slot.children(recursive=True)]]
        assert len(family) >= 4  # two run processes and their kernels
    finally:
        pool.close()
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []


def test_a_slot_whose_kernel_cannot_start_is_dropped_not_used(sqlite_env, tmp_path):
    store = open_store()
    rp = fork(store, "no-such-kernel", tmp_path)
    assert rp.proc.wait(60) == 3  # it said why on stderr and exited before taking any run
    with open(rp.err_path) as fh:
        assert "no-such-kernel" in fh.read()
    rp.cleanup()
    assert not os.path.exists(rp.err_path)
    pool = KernelPool(store, size=1)
    assert pool.take("python3") is None  # not started: hands out nothing, asks for nothing to run
