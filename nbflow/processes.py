"""Starting and stopping run processes.

A run process (``nbflow.runprocess``) needs papermill, nbclient, jupyter_client and SQLAlchemy: ~0.5 s of
CPU to import, more than its kernel costs to start (~0.2 s). A runner starts one per run, so it forks
them from a *fork server* (``multiprocessing``'s ``forkserver``: a clean process started once, with
those modules imported, that forks a child per request; never a fork of the runner itself, whose
threads and database connections must not be copied). A forked run process is ready in ~10 ms, which
is what lets two slots do hundreds of runs a minute on two cores.

The foreground ``nbflow run`` starts one plain ``python -m nbflow.runprocess`` instead: for a single
run, starting a fork server would only add to its time.

Either way the run process leads a session of its own (so its kernel and whatever the notebook starts
can be stopped together), its stderr and its kernel's go to a file (kernel chatter never reaches a
terminal; a crash's last words are kept for the run's error), and it dies with its supervisor.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psutil

from nbflow import zygote
from nbflow.settings import KERNEL_SOCKET_PREFIX
from nbflow.store import Store

GRACE_SECONDS = 5.0
# Imported once by the fork server, inherited by every run process it forks. Not ``__main__``: the
# fork server must never run a user's script. As with any ``multiprocessing`` code, a script that
# starts a runner itself needs the ``if __name__ == "__main__":`` guard (the ``nbflow`` command has it).
PRELOAD = ["nbflow.forkserver", "nbflow.cli", "nbflow.runprocess", "nbflow.execute"]


def terminate_tree(pid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the process, then SIGKILL it and every descendant still alive after ``grace`` seconds."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        root.terminate()
    _, alive = psutil.wait_procs([root], timeout=grace)
    for proc in [*alive, *family[1:]]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=grace)


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
            raise subprocess.TimeoutExpired("nbflow.runprocess", timeout or 0)
        return self.process.exitcode


class RunProcess:
    """A run process, the file its stderr goes to, and (for a warm slot) the pipe it takes its run from."""

    def __init__(self, proc: Any, err_path: str, kernel_name: str, channel: Any = None) -> None:
        self.proc = proc  # subprocess.Popen or Forked
        self.err_path = err_path
        self.kernel_name = kernel_name
        self.channel = channel
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

    def hand(self, run_id: uuid.UUID) -> bool:
        """Give a warm slot its run; False if it is gone (the caller starts a cold one instead)."""
        if self.channel is None or not self.alive():
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
            terminate_tree(self.proc.pid)
            self.proc.wait()
        self.cleanup()

    def cleanup(self) -> None:
        """Once the process has ended: its stderr file, and the socket files of its kernel if it was
        killed before it could remove them."""
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


def fork(store: Store, kernel_name: str, cwd: str | Path, *, run_id: uuid.UUID | None = None) -> RunProcess:
    """A run process forked by the fork server: for ``run_id``, or without one a warm slot."""
    from nbflow.runprocess import forked_main

    ctx = _fork_server()
    argv = ["--kernel", kernel_name, "--cwd", str(cwd), "--parent-pid", str(os.getpid())]
    argv += [str(run_id)] if run_id is not None else ["--warm"]
    # The fork server's environment and folder are those of when it started: pass ours.
    env = dict(os.environ, NBFLOW_DATABASE_URL=store.url, **zygote.for_runner(kernel_name))
    err_path = _err_file()
    ours, theirs = ctx.Pipe() if run_id is None else (None, None)
    process = ctx.Process(target=forked_main, args=(argv, env, os.getcwd(), err_path, theirs),
                          name="nbflow-run", daemon=True)
    try:
        process.start()
    except BaseException:
        os.unlink(err_path)
        raise
    finally:
        if theirs is not None:
            theirs.close()
    return RunProcess(Forked(process), err_path, kernel_name, ours)


def start(store: Store, kernel_name: str, cwd: str | Path, run_id: uuid.UUID, *, progress: bool = False
          ) -> RunProcess:
    """A fresh ``python -m nbflow.runprocess RUN_ID``, for the foreground ``nbflow run``; ``progress``
    draws papermill's progress bar on a copy of our stderr."""
    cmd = [sys.executable, "-m", "nbflow.runprocess", str(run_id), "--kernel", kernel_name, "--cwd", str(cwd),
           "--parent-pid", str(os.getpid())]
    env = dict(os.environ, NBFLOW_DATABASE_URL=store.url)
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
        raise
    finally:
        if progress_fd is not None:
            os.close(progress_fd)
    return RunProcess(proc, err_path, kernel_name)
