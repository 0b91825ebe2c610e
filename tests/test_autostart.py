"""Run means run (nbflow.services.autostart): a trigger with no live runner starts one background runner,
once however many ask at the same moment, visible in `nbflow workers`, gone after its idle period; off
with NBFLOW_AUTOSTART=0, never in remote mode. Real processes and kernels; every runner a test causes is
found by its pid and killed in a finally."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from helpers import alive, make_notebook, nbflow, runner_pids
from nbclient import NotebookClient

from nbflow.core.workers import list_workers
from nbflow.services import autostart
from nbflow.settings import get_settings
from nbflow.store import open_store

ANNOUNCED = re.compile(r"nbflow: started a background runner for (\S+) \(pid (\d+);")


def wait(condition: Callable[[], object], what: str, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the runner leads its session: its run processes go too


def run_state(run_id: str) -> str:
    from nbflow.core.runs import find_run

    with open_store().read() as session:
        return find_run(session, run_id).state


@pytest.fixture
def autostart_env(sqlite_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("NBFLOW_AUTOSTART", "1")
    monkeypatch.setenv("NBFLOW_AUTOSTART_IDLE", "2")
    return {**sqlite_env, "NBFLOW_AUTOSTART": "1", "NBFLOW_AUTOSTART_IDLE": "2"}


def test_trigger_starts_one_runner_that_runs_it_and_leaves_when_idle(autostart_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    nb = make_notebook(tmp_path, "hello", ["x = 1 + 1"])
    started: set[int] = set()
    try:
        first = nbflow(autostart_env, tmp_path, "trigger", nb, "--json")
        assert first.returncode == 0, first.stderr
        found = ANNOUNCED.findall(first.stderr)
        assert len(found) == 1, first.stderr
        home, pid = found[0][0], int(found[0][1])
        started.add(pid)
        assert home == str(get_settings().home) and f"kill {pid}" in first.stderr
        run_id = json.loads(first.stdout)["id"]
        # Listed while it is sure to be alive (before its run ends: afterwards it may idle out at once on a
        # loaded machine), as `nbflow workers` lists it.
        listed = wait(lambda: list_workers(open_store(), get_settings().lease_seconds), "the runner to register")
        assert [(w["pid"], w["id"].split(":")[0]) for w in listed] == [(pid, "autostart")]
        wait(lambda: run_state(run_id) == "COMPLETED", "the first run to complete")

        # Trigger again at once (the runner stays for 2 s of idleness; if it is leaving right now, the
        # trigger starts a new one: either way the run completes, and no two runners ever overlap).
        second = nbflow(autostart_env, tmp_path, "trigger", "hello", "--json")
        assert second.returncode == 0, second.stderr
        started.update(int(p) for _, p in ANNOUNCED.findall(second.stderr))
        wait(lambda: run_state(json.loads(second.stdout)["id"]) == "COMPLETED", "the second run to complete")
        assert len(runner_pids()) <= 1

        for p in started:  # idle for 2 s: each exits on its own, and leaves the registry
            wait(lambda p=p: not alive(p), f"runner {p} to exit after its idle period")
        assert runner_pids() == set()
        assert "exits after 2s idle" in (get_settings().home / autostart.LOG_NAME).read_text()
    finally:
        kill_all(started | runner_pids())


def test_a_trigger_finds_the_running_runner(autostart_env: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBFLOW_AUTOSTART_IDLE", "600")
    env = {**autostart_env, "NBFLOW_AUTOSTART_IDLE": "600"}
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    pids: set[int] = set()
    try:
        first = nbflow(env, tmp_path, "trigger", nb)
        pids.update(int(p) for _, p in ANNOUNCED.findall(first.stderr))
        assert len(pids) == 1, first.stderr
        second = nbflow(env, tmp_path, "trigger", "hello", "--wait")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "background runner" not in second.stderr and "COMPLETED" in second.stdout
        assert runner_pids() == pids
    finally:
        kill_all(pids | runner_pids())


def test_four_triggers_at_once_start_exactly_one_runner(autostart_env: dict[str, str], tmp_path: Path) -> None:
    make_notebook(tmp_path, "hello", ["x = 1"])
    assert nbflow(autostart_env, tmp_path, "register", tmp_path / "hello.ipynb").returncode == 0
    env = {**autostart_env, "NBFLOW_AUTOSTART_IDLE": "600"}
    procs = [subprocess.Popen([sys.executable, "-m", "nbflow.cli", "trigger", "hello", "--wait"], env=env,
                              cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    announced: list[int] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, out + err
            announced += [int(p) for _, p in ANNOUNCED.findall(err)]
        assert len(announced) == 1, announced
        assert runner_pids() == set(announced)
    finally:
        for proc in procs:
            proc.kill()
        kill_all(set(announced) | runner_pids())


def test_flow_run_magic_in_a_kernel_runs(autostart_env: dict[str, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBFLOW_AUTOSTART_IDLE", "600")  # the kernel inherits this process's environment
    make_notebook(tmp_path, "hello", ["x = 1"])
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in
                ["%load_ext nbflow", "%flow register hello.ipynb", "%flow run hello"]]
    pids: set[int] = set()
    try:
        NotebookClient(nb, kernel_name="python3", timeout=120,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        out = "".join(o.get("text", "") for o in nb.cells[2].outputs if o.output_type == "stream")
        pids.update(int(p) for _, p in ANNOUNCED.findall(out))
        assert len(pids) == 1, out
        run_id = re.search(r"run (\S+) PENDING", out).group(1)  # type: ignore[union-attr]
        # The kernel is gone: the runner is not, and it runs the run.
        wait(lambda: run_state(run_id) == "COMPLETED", "the run to complete after the kernel ended")
        assert runner_pids() == pids
    finally:
        kill_all(pids | runner_pids())


def test_autostart_off_leaves_the_run_pending_and_says_why(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    env = {**sqlite_env, "NBFLOW_AUTOSTART": "0"}
    result = nbflow(env, tmp_path, "trigger", nb, "--json")
    assert result.returncode == 0, result.stderr
    assert "no runner is serving this store" in result.stderr
    run_id = json.loads(result.stdout)["id"]
    shown = nbflow(env, tmp_path, "show", run_id)
    assert "no runner is serving this store: start one with `nbflow worker`" in shown.stdout
    assert run_state(run_id) == "PENDING" and runner_pids() == set()
    assert not (get_settings().home / autostart.LOG_NAME).exists()


def test_cli_retry_starts_a_runner_like_trigger(autostart_env: dict[str, str], tmp_path: Path) -> None:
    """`nbflow retry` of a run that was cancelled while nothing served the store: the retry is run."""
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    off = {**autostart_env, "NBFLOW_AUTOSTART": "0"}
    queued = nbflow(off, tmp_path, "trigger", nb, "--json")
    run_id = json.loads(queued.stdout)["id"]
    assert nbflow(off, tmp_path, "cancel", run_id).returncode == 0
    started: set[int] = set()
    try:
        again = nbflow(autostart_env, tmp_path, "retry", run_id, "--json")
        assert again.returncode == 0, again.stderr
        started.update(int(p) for _, p in ANNOUNCED.findall(again.stderr))
        assert len(started) == 1, again.stderr
        retried = json.loads(again.stdout)
        assert retried["parent_run_id"] == run_id
        wait(lambda: run_state(retried["id"]) == "COMPLETED", "the retried run to complete")
    finally:
        kill_all(started | runner_pids())


def test_remote_mode_never_autostarts(autostart_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBFLOW_API_URL", "http://127.0.0.1:9")
    assert autostart.ensure_runner(open_store()) is None
    assert runner_pids() == set() and not (get_settings().home / autostart.LOCK_NAME).exists()


@pytest.mark.parametrize("value", ["maybe", "2x"])
def test_bad_autostart_settings_are_one_line(sqlite_env: dict[str, str], tmp_path: Path, value: str) -> None:
    for name in ("NBFLOW_AUTOSTART", "NBFLOW_AUTOSTART_IDLE"):
        result = nbflow({**sqlite_env, name: value}, tmp_path, "runs")
        assert result.returncode == 2 and result.stderr.startswith(f"nbflow: error: {name}"), result.stderr
    for idle in ("0", "nan", "1e9"):
        result = nbflow({**sqlite_env, "NBFLOW_AUTOSTART_IDLE": idle}, tmp_path, "runs")
        assert result.returncode == 2 and "NBFLOW_AUTOSTART_IDLE" in result.stderr, result.stderr


def test_magic_answer_says_no_runner_serves_when_autostart_is_off(sqlite_env: dict[str, str], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.testing.globalipapp import start_ipython

    make_notebook(tmp_path, "hello", ["x = 1"])
    shell = start_ipython()
    shell.run_line_magic("load_ext", "nbflow")
    capsys.readouterr()
    shell.run_line_magic("flow", f"register {tmp_path / 'hello.ipynb'}")
    shell.run_line_magic("flow", "run hello")
    out = capsys.readouterr().out
    assert autostart.NOT_SERVED in out and "PENDING" in out, out
    assert runner_pids() == set()


def test_a_runner_that_cannot_start_leaves_the_run_queued_and_says_so(autostart_env: dict[str, str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a real process that exits at once, code 1
    note = autostart.ensure_runner(open_store())
    assert note is not None and "could not start a background runner: it exited at start (exit code 1)" in note
    assert autostart.NOT_SERVED in note and runner_pids() == set()


def test_the_dashboards_retry_starts_a_runner(autostart_env: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from nbflow.jupyter.backend import LocalBackend

    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    monkeypatch.setenv("NBFLOW_AUTOSTART", "0")
    backend = LocalBackend(open_store())
    first = nbflow({**autostart_env, "NBFLOW_AUTOSTART": "0"}, tmp_path, "trigger", nb, "--json")
    cancelled = backend.cancel(json.loads(first.stdout)["id"])
    assert cancelled["state"] == "CANCELLED" and runner_pids() == set()
    monkeypatch.setenv("NBFLOW_AUTOSTART", "1")
    monkeypatch.setenv("NBFLOW_AUTOSTART_IDLE", "600")
    pids: set[int] = set()
    try:
        again = backend.retry(cancelled["id"])  # what the dashboard's Retry button calls
        pids.update(int(p) for _, p in ANNOUNCED.findall(capsys.readouterr().out))
        assert len(pids) == 1
        wait(lambda: run_state(again["id"]) == "COMPLETED", "the retried run to complete")
    finally:
        kill_all(pids | runner_pids())


def test_an_idle_runner_leaves_the_registry_before_its_last_look(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """A run queued by a trigger that still saw the runner registered is taken by its last look, not
    left PENDING behind a runner that is leaving; with nothing queued it leaves (and stays out)."""
    from nbflow.core import workers
    from nbflow.core.flows import register
    from nbflow.core.runs import create_run
    from nbflow.services.runner import Runner

    store = open_store()
    register(store, make_notebook(tmp_path, "hello", ["x = 1"]))
    runner = Runner(store, slots=1, poll_interval=0.1, warm_kernels=0)
    workers.register(store, runner.worker_id, [])
    run_id = create_run(store, "hello").id
    assert runner._leave_if_idle() is False  # the queued run was taken: it stays, registered again
    assert runner.worker_id in workers.live_pids(store, 30)
    runner.shutdown(120)  # lets the run finish
    assert run_state(str(run_id)) == "COMPLETED"

    idle = Runner(store, slots=1, poll_interval=0.1, warm_kernels=0)
    workers.register(store, idle.worker_id, [])
    try:
        assert idle._leave_if_idle() is True
        assert idle.worker_id not in workers.live_pids(store, 30)
    finally:
        idle.shutdown(0)
