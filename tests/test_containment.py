"""A run's processes are contained (nbflow.execution.containment): cancel, timeout, a crashed run process and a worker
shutting down end everything the notebook started, new sessions and double-forked daemons included; and a
flow's memory limit ends a run over it FAILED (OutOfMemory) without touching another run.

Real processes throughout: a real ``nbflow run`` / ``nbflow worker`` (with zygote-forked kernels), a notebook
whose cell starts ``sleep`` in a new session and a daemon that double-forks, real cgroups where this machine
has writable ones, else the process-tree fallback (``NBFLOW_CONTAINMENT=process`` forces it here).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
from helpers import make_notebook, nbflow, start, until
from sqlalchemy import select

from nbflow.checks import parse_memory
from nbflow.core.flows import FlowOptions, register
from nbflow.execution import containment
from nbflow.store import open_store
from nbflow.store.models import Flow, Log, Run

# The cell: a process in a new session, a daemon (double fork, new session, reparented to init), its own pid
# (the kernel's) and its name (``nbflow-k<pid>`` when forked by a zygote); then it blocks.
ESCAPE = """
import json, os, subprocess, time
pidfile = {pidfile!r}
p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
subprocess.run(["sh", "-c", "setsid sh -c 'echo $$ > " + pidfile + ".daemon; exec sleep 1001' >/dev/null 2>&1 &"])
while not os.path.exists(pidfile + ".daemon") or not open(pidfile + ".daemon").read().strip():
    time.sleep(0.01)
daemon = int(open(pidfile + ".daemon").read())
with open(f"/proc/{{os.getpid()}}/comm") as fh:
    name = fh.read().strip()
with open(pidfile + ".tmp", "w") as fh:
    json.dump({{"popen": p.pid, "daemon": daemon, "kernel": os.getpid(), "kernel_name": name}}, fh)
os.rename(pidfile + ".tmp", pidfile)
time.sleep(1000)
"""


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def escape_notebook(tmp_path: Path, name: str) -> tuple[Path, Path]:
    pidfile = tmp_path / f"{name}.pids"
    return make_notebook(tmp_path, name, [ESCAPE.format(pidfile=str(pidfile))]), pidfile


def read_pids(pidfile: Path) -> dict:
    return json.loads(until(lambda: pidfile.exists() and pidfile.read_text(), 90, "the cell to write its pids"))


def assert_all_gone(pids: dict, since: float, timeout: float = 30) -> float:
    """Wait until every process the cell started is gone; how long that took from ``since``."""
    procs = [pids["popen"], pids["daemon"], pids["kernel"]]
    until(lambda: all(gone(p) for p in procs), timeout, "the run's processes to be gone",
          show=lambda: {p: not gone(p) for p in procs})
    return time.monotonic() - since


@pytest.fixture
def leftovers():
    """Kills what a failing test (or the fallback, which cannot) leaves behind: never another test's problem."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def run_id_of(store, flow: str) -> str:
    def running():
        with store.read() as session:
            row = session.execute(select(Run.id).join(Flow, Run.flow_id == Flow.id)
                                  .where(Flow.name == flow, Run.state == "RUNNING")).first()
        return str(row[0]) if row else None
    return until(running, 90, f"a RUNNING run of {flow}")


def run_row(store, run_id: str) -> Run:
    with store.read() as session:
        return session.get(Run, uuid.UUID(run_id))


def wait_state(store, run_id: str, *states: str, timeout: float = 60) -> Run:
    return until(lambda: (r := run_row(store, run_id)).state in states and r, timeout, f"run {run_id} {states}",
                 show=lambda: run_row(store, run_id).state)


CGROUPS = containment.mechanism().kill != "process"
_FREEZER = containment._folder("freezer", containment._own_groups(), containment._mounts())
FREEZER = _FREEZER is not None and os.access(_FREEZER, os.W_OK)  # NBFLOW_CONTAINMENT=freezer can use it


def test_the_mechanism_in_use_is_probed_and_said(sqlite_env, tmp_path):
    """This machine's answer (the report's): cgroups where /sys/fs/cgroup is writable, else the fallback."""
    mech = containment.mechanism()
    text = mech.describe()
    if CGROUPS:
        assert os.path.isdir(mech.parent) and os.path.basename(mech.parent) == f"nbflow-{os.getpid()}"
        assert "cgroup" in text
    else:
        assert "process tree" in text and mech.why


@pytest.mark.parametrize("mode", ["auto", "freezer", "process"])
def test_cancel_of_a_foreground_run_ends_new_sessions_and_daemons(sqlite_env, tmp_path, leftovers, mode):
    """``auto``: this machine's mechanism; ``freezer``: cgroup v1's freezer even where v2 works; ``process``:
    the fallback, forced, which ends the kernel (and its process group) but not what left its session
    (docs/operations.md says so)."""
    contained = {"auto": CGROUPS, "freezer": FREEZER, "process": False}[mode]
    nb, pidfile = escape_notebook(tmp_path, "escape")
    fg = start(dict(sqlite_env, NBFLOW_CONTAINMENT=mode), tmp_path, "run", str(nb), "--json")
    try:
        store = open_store()
        pids = read_pids(pidfile)
        leftovers.extend([pids["popen"], pids["daemon"]])
        run_id = run_id_of(store, "escape")
        assert not any(gone(p) for p in (pids["popen"], pids["daemon"], pids["kernel"]))
        t0 = time.monotonic()
        assert nbflow(sqlite_env, tmp_path, "cancel", run_id).returncode == 0
        took = assert_all_gone(pids, t0) if contained else None
        out, err = fg.communicate(timeout=60)
        assert json.loads(out)["state"] == "CANCELLED", err
        if not contained:  # the fallback ends the kernel; what left its session escapes (docs/operations.md)
            until(lambda: gone(pids["kernel"]), 30, "the kernel to be gone")
        else:
            print(f"foreground cancel ({mode}): everything gone {took:.2f}s after `nbflow cancel` started")
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.communicate()


def test_a_killed_supervisor_still_ends_new_sessions_and_daemons(sqlite_env, tmp_path, leftovers):
    """``nbflow run`` killed with SIGKILL (as a worker could be): its run process stops when it sees its
    supervisor die, and killing its kernel kills the kernel's whole group (nbflow.execution.kernels, containment)."""
    nb, pidfile = escape_notebook(tmp_path, "orphan")
    fg = start(sqlite_env, tmp_path, "run", str(nb), "--json")
    try:
        pids = read_pids(pidfile)
        leftovers.extend([pids["popen"], pids["daemon"], pids["kernel"]])
        fg.kill()
        fg.communicate(timeout=30)
        if CGROUPS:
            assert_all_gone(pids, time.monotonic())
            # its groups are left behind, empty; the next runner probing in the same cgroup removes them
            mech = containment.mechanism()
            stale = [os.path.join(os.path.dirname(p), f"nbflow-{fg.pid}") for p in (mech.parent, mech.memory_parent)
                     if p]
            assert any(os.path.isdir(p) for p in stale)
            for parent in (mech.parent, mech.memory_parent):
                if parent:
                    containment._make_parent(os.path.dirname(parent))
            assert not any(os.path.exists(p) for p in stale)
        else:
            until(lambda: gone(pids["kernel"]), 30, "the kernel to be gone")
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.communicate()


def test_a_timeout_ends_new_sessions_and_daemons(sqlite_env, tmp_path, leftovers):
    nb, pidfile = escape_notebook(tmp_path, "slow")
    register(open_store(), nb, name="slow", options=FlowOptions(timeout=15))
    fg = start(sqlite_env, tmp_path, "run", "slow", "--json")
    try:
        pids = read_pids(pidfile)
        leftovers.extend([pids["popen"], pids["daemon"]])
        out, err = fg.communicate(timeout=90)
        doc = json.loads(out)
        assert (doc["state"], doc["state_name"]) == ("FAILED", "TimedOut"), err
        if CGROUPS:
            assert_all_gone(pids, time.monotonic())
        else:
            until(lambda: gone(pids["kernel"]), 30, "the kernel to be gone")
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.communicate()


def test_a_worker_with_zygote_kernels_contains_cancel_crash_and_shutdown(sqlite_env, tmp_path, leftovers):
    """Under a worker the kernel is forked by the runner's zygote (not a descendant of the run process):
    cancel, a run process killed with SIGKILL, and the worker's shutdown each end all of the run."""
    store = open_store()
    notebooks = {}
    for name in ("cancelled", "crashed", "shutdown"):
        notebooks[name] = escape_notebook(tmp_path, name)
        register(store, notebooks[name][0], name=name)
    env = dict(sqlite_env, NBFLOW_KERNEL_ZYGOTE="1")
    worker = start(env, tmp_path, "worker", "--poll", "0.1", "--slots", "2", "--grace", "1")
    try:
        # cancel
        run_id = json.loads(nbflow(env, tmp_path, "trigger", "cancelled", "--json").stdout)["id"]
        pids = read_pids(notebooks["cancelled"][1])
        leftovers.extend([pids["popen"], pids["daemon"], pids["kernel"]])
        assert pids["kernel_name"].startswith("nbflow-k"), f"not a zygote-forked kernel: {pids}"
        t0 = time.monotonic()
        assert nbflow(env, tmp_path, "cancel", run_id).returncode == 0
        if CGROUPS:
            took = assert_all_gone(pids, t0)
            print(f"worker cancel: everything gone {took:.2f}s after `nbflow cancel` started")
        wait_state(store, run_id, "CANCELLED")

        # the run process dies (SIGKILL): the supervisor ends the run CRASHED and its group with it
        run_id = json.loads(nbflow(env, tmp_path, "trigger", "crashed", "--json").stdout)["id"]
        pids = read_pids(notebooks["crashed"][1])
        leftovers.extend([pids["popen"], pids["daemon"], pids["kernel"]])
        os.kill(until(lambda: run_row(store, run_id).process_id, 30, "the run's process id"), signal.SIGKILL)
        wait_state(store, run_id, "CRASHED", "FAILED", "SCHEDULED")
        if CGROUPS:
            assert_all_gone(pids, time.monotonic())

        # the worker shuts down (SIGTERM, grace 1 s): the run is cancelled, all of it ends
        run_id = json.loads(nbflow(env, tmp_path, "trigger", "shutdown", "--json").stdout)["id"]
        pids = read_pids(notebooks["shutdown"][1])
        leftovers.extend([pids["popen"], pids["daemon"], pids["kernel"]])
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=60)
        assert "run containment:" in err  # said once, at start-up
        wait_state(store, run_id, "CANCELLED")
        if CGROUPS:
            assert_all_gone(pids, time.monotonic())
        else:
            until(lambda: gone(pids["kernel"]), 30, "the kernel to be gone")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


HOG = "x = bytearray(512 * 2**20)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\nprint('allocated')"


def test_a_run_over_its_memory_limit_ends_out_of_memory_and_the_other_run_completes(sqlite_env, tmp_path):
    store = open_store()
    # 256 MiB: far below the hog's 512 MiB and far above what a kernel needs for cell 0 (64 MiB was once
    # reached by cell 0 itself, on a loaded machine)
    hog = make_notebook(tmp_path, "hog", ["import time\ntime.sleep(0.5)", HOG, "y = 2"])
    register(store, hog, name="hog", options=FlowOptions(memory_limit="256M"))
    other = make_notebook(tmp_path, "other", ["import time\ntime.sleep(2)", "z = bytearray(100 * 2**20)"])
    register(store, other, name="other")
    worker = start(sqlite_env, tmp_path, "worker", "--poll", "0.1", "--slots", "2")
    try:
        hog_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", "hog", "--json").stdout)["id"]
        other_id = json.loads(nbflow(sqlite_env, tmp_path, "trigger", "other", "--json").stdout)["id"]
        hog_run = wait_state(store, hog_id, "FAILED", "COMPLETED", "CRASHED", timeout=120)
        if containment.mechanism().memory is None:  # no memory controller here: not enforced, and said
            assert hog_run.state == "COMPLETED"
            with store.read() as session:
                assert session.execute(select(Log.id).where(Log.run_id == hog_run.id, Log.text.contains(
                    "memory limit of 256 MiB is not enforced"))).first()
            return
        assert (hog_run.state, hog_run.state_name) == ("FAILED", "OutOfMemory"), hog_run.error
        assert hog_run.error["ename"] == "OutOfMemory"
        assert "the run used more than its memory limit of 256 MiB" in hog_run.error["evalue"]
        assert hog_run.error["cell_index"] == 1
        assert "the run used more than its memory limit of 256 MiB" in hog_run.state_message
        assert wait_state(store, other_id, "COMPLETED", "FAILED", "CRASHED", timeout=120).state == "COMPLETED"
    finally:
        worker.terminate()
        worker.communicate(timeout=60)


def test_a_foreground_run_over_its_memory_limit_ends_out_of_memory(sqlite_env, tmp_path):
    """``nbflow run``: a kernel started the ordinary way (no zygote), moved into its memory group."""
    store = open_store()
    hog = make_notebook(tmp_path, "hog", [HOG, "y = 2"])
    register(store, hog, name="hog", options=FlowOptions(memory_limit=256 * 2**20))
    proc = nbflow(sqlite_env, tmp_path, "run", "hog", "--json")
    doc = json.loads(proc.stdout)
    if containment.mechanism().memory is None:
        assert doc["state"] == "COMPLETED", proc.stderr
        return
    assert (doc["state"], doc["state_name"], doc["error"]["ename"]) == ("FAILED", "OutOfMemory", "OutOfMemory")
    assert doc["error"]["evalue"].startswith("the run used more than its memory limit of 256 MiB"), doc["error"]


def test_a_worker_that_cannot_enforce_a_memory_limit_says_so_in_the_run_log(sqlite_env, tmp_path):
    """The fallback (forced here): the run executes, and its log says the limit is not enforced."""
    store = open_store()
    nb = make_notebook(tmp_path, "limited", ["x = 1"])
    register(store, nb, name="limited", options=FlowOptions(memory_limit="1G"))
    proc = nbflow(dict(sqlite_env, NBFLOW_CONTAINMENT="process"), tmp_path, "run", "limited", "--json")
    doc = json.loads(proc.stdout)
    assert doc["state"] == "COMPLETED", proc.stderr
    with store.read() as session:
        texts = list(session.execute(select(Log.text).where(Log.run_id == uuid.UUID(doc["id"]),
                                                            Log.stream == "system")).scalars())
    assert any("memory limit of 1 GiB is not enforced on this worker" in t and "NBFLOW_CONTAINMENT=process" in t
               for t in texts), texts


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 * 2**20), ("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("1.5g", int(1.5 * 2**30)),
    (str(64 * 2**20), 64 * 2**20), (64 * 2**20, 64 * 2**20), ("0", 0), ("none", 0), (0, 0)])
def test_memory_limits_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["15M", "1k", "-5M", "5X", "", "nan", "inf", "1e9", "2048T", 2**60, True, 100, "M"])
def test_bad_memory_limits_are_refused(bad):
    with pytest.raises(ValueError, match="memory limit"):
        parse_memory(bad)


def test_memory_limit_through_cli_api_and_listing(sqlite_env, tmp_path):
    from helpers import run_cli

    nb = make_notebook(tmp_path, "m", ["x = 1"])
    bad = run_cli("register", nb, "--memory-limit", "10M")
    assert bad.exit_code == 2 and "memory limit" in bad.stderr and "Traceback" not in bad.stderr
    ok = run_cli("register", nb, "--memory-limit", "512M", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["memory_limit"] == 512 * 2**20
    listing = run_cli("flows")
    assert "MEMORY" in listing.stdout and "512 MiB" in listing.stdout
    cleared = run_cli("register", nb, "--memory-limit", "0", "--json")
    assert json.loads(cleared.stdout)["memory_limit"] is None


def test_memory_limit_through_the_api(sqlite_env, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from nbflow.api.app import create_app

    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(folder))
    make_notebook(folder, "m", ["x = 1"])
    with TestClient(create_app(open_store()), client=("127.0.0.1", 40000)) as api:
        created = api.post("/api/flows", json={"path": "m.ipynb", "memory_limit": 256 * 2**20})
        assert created.status_code == 201 and created.json()["memory_limit"] == 256 * 2**20, created.text
        for bad in (2**20, -1, 2**60, "512M", 1.5):  # bytes only, 16 MiB to 1 PiB, as the schema says
            assert api.patch("/api/flows/m", json={"memory_limit": bad}).status_code == 422, bad
        assert api.get("/api/flows/m").json()["memory_limit"] == 256 * 2**20
        assert api.patch("/api/flows/m", json={"memory_limit": None}).json()["memory_limit"] is None
        schema = api.get("/api/openapi.json").json()["components"]["schemas"]["FlowPatch"]["properties"]["memory_limit"]
        assert {"minimum": 16 * 2**20, "maximum": 2**50} in [
            {k: v for k, v in option.items() if k in ("minimum", "maximum")} for option in schema["anyOf"]]


def test_a_kernel_killed_by_the_oom_killer_is_named_out_of_memory_by_its_run_process(monkeypatch):
    """cgroup v2 cannot pause a group over its limit, only kill in it: then the run process, which may see its
    dead kernel first, names the end OutOfMemory itself (``kernel_oom_limit``). Made to happen for real here
    with whatever memory controller this machine has, its OOM killer left on."""
    import subprocess
    import sys

    group = containment.Group()
    try:
        monkeypatch.setenv(containment.ENV_GROUP, group.procs or "")
        monkeypatch.setenv(containment.ENV_KERNEL, os.pathsep.join(group.kernel))
        assert containment.kernel_oom_limit() is None
        if group.memory_folder is None:  # no memory controller: no limit, nothing to name
            assert not group.set_memory_limit(64 * 2**20)
            return
        assert group.set_memory_limit(64 * 2**20)
        if group.mech.memory == "cgroup1":  # nbflow pauses instead; the OOM killer on, as v2 always has it
            with open(os.path.join(group.memory_folder, "memory.oom_control"), "w") as fh:
                fh.write("0")
        # it waits on stdin until it is in the group, then allocates
        hog = subprocess.Popen([sys.executable, "-c", "import sys\nsys.stdin.read()\n" + HOG], stdin=subprocess.PIPE)
        containment.join_kernel(hog.pid)
        hog.communicate(b"", timeout=60)
        assert hog.returncode == -signal.SIGKILL
        assert containment.kernel_oom_limit() == 64 * 2**20
        assert containment.oom_message(64 * 2**20).startswith("the run used more than its memory limit of 64 MiB")
    finally:
        group.remove()


def test_memory_limit_through_the_flow_magic(sqlite_env, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "%load_ext nbflow", "%%flow limited --memory-limit 96M\nx = 1", "%%flow refused --memory-limit 1k\nx = 1")]
    NotebookClient(nb, kernel_name="python3", timeout=120, allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    said = "".join(o.get("text", "") for o in nb.cells[2].outputs)  # IPython shows a UsageError as one line
    assert said.strip() == "UsageError: --memory-limit: a memory limit must be from 16M to 1024T (or 0 for none), " \
                           "got '1k'", nb.cells[2].outputs
    with open_store().read() as session:
        flows = {f.name: f.memory_limit for f in session.execute(select(Flow)).scalars()}
    assert flows == {"limited": 96 * 2**20}
