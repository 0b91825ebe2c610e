"""Starting and stopping run processes.

A run process (``nbflow.execution.runprocess``) needs papermill, nbclient, jupyter_client and SQLAlchemy: ~0.5 s of
CPU to import, more than its kernel costs to start (~0.2 s). A runner starts one per run, so it forks
them from a *fork server* (``multiprocessing``'s ``forkserver``: a clean process started once, with
those modules imported, that forks a child per request; never a fork of the runner itself, whose
threads and database connections must not be copied). A forked run process is ready in ~10 ms, which
is what lets two slots do hundreds of runs a minute on two cores.

The foreground ``nbflow run`` starts one plain ``python -m nbflow.execution.runprocess`` instead: for a single
run, starting a fork server would only add to its time.

Either way the run process leads a session of its own, its stderr and its kernel's go to a file (kernel
chatter never reaches a terminal; a crash's last words are kept for the run's error), and it dies with its
supervisor. And either way it starts in a group of its own (``nbflow.execution.containment``: a cgroup where the
machine allows it), which its kernel joins too and whatever the notebook starts inherits: stopping the
run kills the whole group, new sessions and daemons included, and a flow's memory limit is set on it.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psutil

from nbflow.execution import containment, zygote
from nbflow.settings import KERNEL_SOCKET_PREFIX
from nbflow.store import Store

GRACE_SECONDS = 5.0
# Imported once by the fork server, inherited by every run process it forks. Not ``__main__``: the
# fork server must never run a user's script. As with any ``multiprocessing`` code, a script that
# starts a runner itself needs the ``if __name__ == "__main__":`` guard (the ``nbflow`` command has it).
PRELOAD = ["nbflow.execution.forkserver", "nbflow.cli", "nbflow.execution.runprocess", "nbflow.execution.execute"]


def terminate_tree(pid: int, grace: float = GRACE_SECONDS, group: containment.Group | None = None) -> None:
    """SIGTERM the process, then SIGKILL it and everything it started still alive after ``grace`` seconds:
    the whole of ``group`` where there is one; else its descendants and its process group (a process
    started in a new session, or reparented to init, escapes that: see ``nbflow.execution.containment``)."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if family:
        with contextlib.suppress(psutil.NoSuchProcess):
            root.terminate()
        psutil.wait_procs([root], timeout=grace)
    if group is not None and group.contained:
        group.kill()
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # it leads a session and process group of its own
    psutil.wait_procs(family, timeout=grace)


UNCONTAINED = containment.Mechanism("process", None, None, None, "no group")


def new_group() -> containment.Group:
    """A run process's group; an uncontained one (the process-tree fallback) if it cannot be created."""
    try:
        return containment.Group()
    except OSError as exc:
        containment.log.warning("run not contained: its cgroup could not be created (%s)", exc)
        return containment.Group(containment.Mechanism("process", None, None, None, str(exc)))


class Forked:
    """The ``subprocess.Popen`` interface the supervisor uses, over a process the fork server forked."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid: int = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("nbflow.execution.runprocess", timeout or 0)
        return self.process.exitcode


class RunProcess:
    """A run process, the file its stderr goes to, and (for a warm slot) the pipe it takes its run from."""

    def __init__(self, proc: Any, err_path: str, kernel_name: str, channel: Any = None,
                 group: containment.Group | None = None) -> None:
        self.proc = proc  # subprocess.Popen or Forked
        self.err_path = err_path
        self.kernel_name = kernel_name
        self.channel = channel
        self.group = group if group is not None else containment.Group(UNCONTAINED)
        self.memory_enforced = True  # False: a memory limit was asked for and this machine cannot set it
        self._ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """A warm slot whose kernel is started and its client connected (it says so on its pipe)."""
        if not self._ready and self.channel is not None:
            with contextlib.suppress(EOFError, OSError):
                self._ready = self.channel.poll() and self.channel.recv() == "ready"
        return self._ready

    def limit_memory(self, limit: int | None) -> None:
        """Set the flow's memory limit on the group, before the run's code can run."""
        self.memory_enforced = self.group.set_memory_limit(limit)

    def out_of_memory(self) -> bool:
        return self.group.out_of_memory()

    def terminate(self) -> None:
        """Stop it (SIGTERM: the notebook's ``finally`` blocks run), then kill everything left of the run."""
        terminate_tree(self.pid, group=self.group)

    def hand(self, run_id: uuid.UUID, memory_limit: int | None = None) -> bool:
        """Give a warm slot its run (and its memory limit); False if it is gone (the caller starts a cold
        one instead)."""
        if self.channel is None or not self.alive():
            return False
        self.limit_memory(memory_limit)
        if not self.memory_enforced and self.group.memory_folder is not None:
            self.channel.close()  # its kernel already uses more than the limit (v1 refuses it): a cold start
            return False
        try:
            self.channel.send(str(run_id))
            return True
        except (OSError, ValueError):
            return False
        finally:
            self.channel.close()

    def discard(self) -> None:
        """An unused warm slot: closing its pipe makes it kill its kernel and exit; a stuck one is killed."""
        if self.channel is not None:
            self.channel.close()
        try:
            self.proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.terminate()
            self.proc.wait()
        self.cleanup()

    def cleanup(self) -> None:
        """Once the process has ended: whatever is left in its group (a run leaves no process behind), its
        stderr file, and the socket files of its kernel if it was killed before it could remove them."""
        self.group.remove()
        with contextlib.suppress(OSError):
            os.unlink(self.err_path)
        if self.proc.poll() is not None:
            for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{KERNEL_SOCKET_PREFIX}{self.pid}-*")):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _err_file() -> str:
    with tempfile.NamedTemporaryFile(prefix="nbflow-run-", suffix=".stderr", delete=False) as err:
        return err.name


def _fork_server() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def fork(store: Store, kernel_name: str, cwd: str | Path, *, run_id: uuid.UUID | None = None,
         memory_limit: int | None = None) -> RunProcess:
    """A run process forked by the fork server: for ``run_id``, or without one a warm slot."""
    from nbflow.execution.runprocess import forked_main

    ctx = _fork_server()
    argv = ["--kernel", kernel_name, "--cwd", str(cwd), "--parent-pid", str(os.getpid())]
    argv += [str(run_id)] if run_id is not None else ["--warm"]
    group = new_group()
    memory_enforced = group.set_memory_limit(memory_limit)
    # The fork server's environment and folder are those of when it started: pass ours.
    env = dict(os.environ, NBFLOW_DATABASE_URL=store.url, **zygote.for_runner(kernel_name), **group.env())
    err_path = _err_file()
    ours, theirs = ctx.Pipe() if run_id is None else (None, None)
    process = ctx.Process(target=forked_main, args=(argv, env, os.getcwd(), err_path, theirs),
                          name="nbflow-run", daemon=True)
    try:
        process.start()
    except BaseException:
        os.unlink(err_path)
        group.remove()
        raise
    finally:
        if theirs is not None:
            theirs.close()
    group.add(process.pid)  # it joins by itself too, first thing (nbflow.execution.kernels)
    rp = RunProcess(Forked(process), err_path, kernel_name, ours, group)
    rp.memory_enforced = memory_enforced
    return rp


def start(store: Store, kernel_name: str, cwd: str | Path, run_id: uuid.UUID, *, progress: bool = False,
          memory_limit: int | None = None) -> RunProcess:
    """A fresh ``python -m nbflow.execution.runprocess RUN_ID``, for the foreground ``nbflow run``; ``progress``
    draws papermill's progress bar on a copy of our stderr."""
    cmd = [sys.executable, "-m", "nbflow.execution.runprocess", str(run_id), "--kernel", kernel_name, "--cwd", str(cwd),
           "--parent-pid", str(os.getpid())]
    group = new_group()
    memory_enforced = group.set_memory_limit(memory_limit)
    env = dict(os.environ, NBFLOW_DATABASE_URL=store.url, **group.env())
    progress_fd = os.dup(sys.stderr.fileno()) if progress else None
    if progress_fd is not None:
        cmd += ["--progress-fd", str(progress_fd)]
    err_path = _err_file()
    try:
        with open(err_path, "wb") as err_fh:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_fh,
                start_new_session=True, pass_fds=() if progress_fd is None else (progress_fd,),
            )
    except BaseException:
        os.unlink(err_path)
        group.remove()
        raise
    finally:
        if progress_fd is not None:
            os.close(progress_fd)
    group.add(proc.pid)  # it joins by itself too, first thing (nbflow.execution.kernels)
    rp = RunProcess(proc, err_path, kernel_name, group=group)
    rp.memory_enforced = memory_enforced
    return rp
