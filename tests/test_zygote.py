"""Kernels forked from a runner's zygote (nbflow.execution.zygote) behave as kernels started the ordinary way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from helpers import make_notebook, until
from jupyter_core.utils import run_sync

from nbflow.core.runs import create_run
from nbflow.execution import zygote
from nbflow.execution.kernels import Kernel
from nbflow.services.runner import Runner
from nbflow.store import open_store
from nbflow.store.models import Run

PROBE = """
import json, os, random, signal, subprocess, sys
print(json.dumps({
    "argv0": sys.argv[0], "argv_rest": sys.argv[1:2], "path": sys.path, "cwd": os.getcwd(),
    "parent": os.environ.get("JPY_PARENT_PID"), "frame_eval": os.environ.get("PYDEVD_USE_FRAME_EVAL"),
    "zygote_dir": os.environ.get("NBFLOW_ZYGOTE_DIR"), "history": len(In), "name": __name__,
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigchld": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
    "child_exit": subprocess.run([sys.executable, "-c", "raise SystemExit(7)"]).returncode,
    "session_leader": os.getsid(0) == os.getpid(), "random": random.random(),
}))
"""


def execute(kernel: Kernel, code: str, timeout: float = 60) -> tuple[str, dict]:
    """Run ``code``; its stdout and the execute reply's content."""
    msg_id = kernel.kc.execute(code)
    out, deadline = [], time.monotonic() + timeout
    while True:
        msg = run_sync(kernel.kc.get_iopub_msg)(timeout=max(deadline - time.monotonic(), 0.01))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    while True:
        reply = run_sync(kernel.kc.get_shell_msg)(timeout=max(deadline - time.monotonic(), 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            return "".join(out), reply["content"]


@pytest.fixture
def zygotes(monkeypatch):
    """Starts this process's own zygote (call it in the test: pytest changes PYTEST_CURRENT_TEST between a
    test's phases, and a zygote serves only the environment it was started with), its kernels pointed at it."""
    started = []

    def start() -> zygote.Zygotes:
        z = zygote.Zygotes()
        started.append(z)
        monkeypatch.setenv(zygote.ENV_DIR, z.dir)
        z.ensure("python3")
        until(lambda: any(name.endswith(".sock") for name in os.listdir(z.dir)), 60, "the zygote's socket")
        return z

    yield start
    for z in started:
        z.close()


def forked(cwd) -> Kernel:
    kernel = Kernel("python3", cwd).start().ready()
    assert isinstance(kernel.km.provisioner.process, zygote.ForkedKernel), "not forked by the zygote"
    return kernel


def test_a_forked_kernel_looks_like_a_started_one(zygotes, monkeypatch, tmp_path):
    zygotes()
    (tmp_path / "here").mkdir()
    probes = {}
    for how in ("forked", "started"):
        if how == "started":
            monkeypatch.delenv(zygote.ENV_DIR)
        kernel = forked(tmp_path / "here") if how == "forked" else Kernel("python3", tmp_path / "here").start().ready()
        try:
            if how == "started":
                assert not isinstance(kernel.km.provisioner.process, zygote.ForkedKernel)
            else:
                assert psutil.Process(kernel.km.provisioner.pid).name() == f"nbflow-k{os.getpid()}"
            out, reply = execute(kernel, PROBE)
            assert reply["status"] == "ok", reply
            probes[how] = json.loads(out)
        finally:
            kernel.kill()
    forked_probe, started_probe = probes["forked"], probes["started"]
    assert forked_probe.pop("random") != started_probe.pop("random")
    assert forked_probe == started_probe
    assert forked_probe["parent"] == str(os.getpid()) and forked_probe["zygote_dir"] is None
    assert forked_probe["cwd"] == str(tmp_path / "here") and forked_probe["argv0"].endswith("ipykernel_launcher.py")
    assert forked_probe["child_exit"] == 7 and forked_probe["sigint"] and forked_probe["session_leader"]


def test_forked_kernels_do_not_share_random_state(zygotes, tmp_path):
    zygotes()
    values = []
    for _ in range(2):
        kernel = forked(tmp_path)
        try:
            out, _ = execute(kernel, "import random; print(random.random())")
            values.append(out)
        finally:
            kernel.kill()
    assert values[0] != values[1]


def test_a_forked_kernel_is_interrupted_and_killed_with_its_process_group(zygotes, tmp_path):
    zygotes()
    kernel = forked(tmp_path)
    pid = kernel.km.provisioner.pid
    try:
        out, reply = execute(kernel, "import subprocess, sys\n"
                                     "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                                     "print(p.pid)")
        grandchild = int(out)
        msg_id = kernel.kc.execute("import time\ntime.sleep(60)")
        time.sleep(1)
        kernel.interrupt()
        while True:
            reply = run_sync(kernel.kc.get_shell_msg)(timeout=20)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kernel.kill()
    assert not psutil.pid_exists(pid)
    until(lambda: not psutil.pid_exists(grandchild), 5, "the kernel's own child killed with its group")


def test_a_forked_kernel_dies_with_the_process_that_asked_for_it(zygotes, tmp_path):
    zygotes()
    script = ("import sys, time\nfrom nbflow.execution.kernels import Kernel\n"
              "k = Kernel('python3', sys.argv[1]).start().ready()\n"
              "print(type(k.km.provisioner.process).__name__, k.km.provisioner.pid, flush=True)\n"
              "time.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ))
    try:
        kind, pid = owner.stdout.readline().split()
        assert kind == "ForkedKernel"
        assert psutil.Process(int(pid)).name() == f"nbflow-k{owner.pid}"
    finally:
        owner.kill()
        owner.wait()
    until(lambda: not psutil.pid_exists(int(pid)), 10, "the orphaned kernel gone")


def started_the_ordinary_way(cwd, code: str) -> str:
    """Start a kernel, check it was not forked, and run ``code`` in it: its stdout."""
    kernel = Kernel("python3", cwd).start().ready()
    try:
        assert not isinstance(kernel.km.provisioner.process, zygote.ForkedKernel)
        return execute(kernel, code)[0].strip()
    finally:
        kernel.kill()


def test_a_different_environment_or_a_dead_zygote_starts_the_kernel_the_ordinary_way(zygotes, monkeypatch, tmp_path):
    z = zygotes()
    monkeypatch.setenv("SOME_SETTING_READ_AT_IMPORT", "1")
    assert started_the_ordinary_way(tmp_path, "import os; print(os.environ['SOME_SETTING_READ_AT_IMPORT'])") == "1"
    monkeypatch.delenv("SOME_SETTING_READ_AT_IMPORT")
    for proc in z._procs.values():
        proc.kill()
        proc.wait()
    # Its socket file lingers (killed, it could not remove it): connecting fails, the kernel starts anyway.
    assert started_the_ordinary_way(tmp_path, "print(6 * 7)") == "42"


def test_the_runner_runs_notebooks_in_forked_kernels(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "comm", ["import os\nimport nbflow\n"
                                          "nbflow.record('comm', open('/proc/self/comm').read().strip())\n"
                                          "nbflow.record('cwd', os.getcwd())"])
    store = open_store()
    runner = Runner(store, slots=1, poll_interval=0.1, warm_kernels=0)
    import threading

    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        results = []
        for _ in range(2):
            run = create_run(store, str(nb), allow_path=True)
            until(lambda run=run: _ended(store, run.id), 120, "the run to end")
            with store.read() as session:
                got = session.get(Run, run.id)
                assert got.state == "COMPLETED", got.error
                results.append((got.process_id, got.result))
            # The zygote starts with the first run; the second is forked once its socket is there.
            until(lambda: zygote._zygotes is not None and any(
                n.endswith(".sock") for n in os.listdir(zygote._zygotes.dir)), 60, "the runner's zygote")
        process_id, result = results[-1]
        assert result["comm"] == f"nbflow-k{process_id}"
        assert result["cwd"] == str(tmp_path)
    finally:
        runner.request_stop()
        thread.join(60)


def _ended(store, run_id: uuid.UUID) -> bool:
    with store.read() as session:
        return session.get(Run, run_id).ended_at is not None


@pytest.mark.parametrize("cmd, expected", [
    (["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"], True),
    (["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "c.json", "--HistoryManager.hist_file=:memory:"], True),
    (["/usr/bin/python3", "-m", "my_launcher", "-f", "{connection_file}"], False),
    (["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"], False),
])
def test_only_the_standard_ipykernel_command_is_forked(cmd, expected):
    assert zygote.forkable(cmd) is expected


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv(zygote.ENV_SWITCH, "0")
    assert zygote.for_runner("python3") == {}
