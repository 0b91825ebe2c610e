"""Supervising run processes: start one per attempt, enforce the whole-run timeout, stop it cleanly
on cancel, notice when it dies, and carry the run through its retries.

The run process (``nbflow.runprocess``) writes the states it can know itself (RUNNING, COMPLETED, FAILED);
this side writes the ones it cannot: TimedOut (it was stopped), CRASHED (it died), CANCELLED.
Stopping is never merely cooperative: SIGTERM lets the process shut its kernel down, and after a grace
period everything left of the process tree, the kernel included, gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psutil
from sqlalchemy import select, update

from nbflow import states
from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import CellRun, Flow, Run, utcnow

GRACE_SECONDS = 5.0
WAIT_SLICE_SECONDS = 0.1
CANCEL_POLL_SECONDS = 0.5


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


def _running_cell(store: Store, run: Run) -> tuple[int | None, str | None]:
    with store.read() as session:
        row = session.execute(
            select(CellRun.cell_index, CellRun.cell_id)
            .where(CellRun.run_id == run.id, CellRun.attempt == run.attempt, CellRun.state == "RUNNING")
        ).first()
    return (row[0], row[1]) if row else (None, None)


def settle(store: Store, run_id: uuid.UUID, why: str, detail: str,
            cell: tuple[int | None, str | None] = (None, None)) -> None:
    """Write the end the process could not write itself, if the run is still live.

    ``cell`` is the cell that was running when the process was stopped (read before stopping it): it
    ends FAILED (CANCELLED on a cancel) and the cells that never ran end SKIPPED.
    """
    cell_index, cell_id = cell
    with store.write() as session:
        run = states.lock_run(session, run_id)
        state = states.StateType(run.state)
        if state in states.TERMINAL or (state is states.S.SCHEDULED and why != "cancel"):
            return
        attempt = run.attempt
        error: dict[str, Any] | None = None
        if why == "cancel" or state is states.S.CANCELLING:
            if state is not states.S.CANCELLING:
                states.transition(session, run, states.S.CANCELLING, message=detail)
            states.transition(session, run, states.S.CANCELLED, message=detail)
        else:
            ename = "TimedOut" if why == "timeout" else "Crashed"
            error = {"ename": ename, "evalue": detail, "traceback": [], "cell_index": cell_index,
                     "cell_id": cell_id}
            if state is states.S.PENDING:
                states.fail(session, run, error=error, message=detail)
            else:
                states.fail(session, run, error=error, crashed=why == "crash",
                            name="TimedOut" if why == "timeout" else None, message=detail)
        live = (CellRun.run_id == run_id) & (CellRun.attempt == attempt) & CellRun.state.in_(["PENDING", "RUNNING"])
        now = utcnow()
        if cell_index is not None:
            session.execute(update(CellRun).where(live, CellRun.cell_index == cell_index).values(
                state="CANCELLED" if error is None else "FAILED", ended_at=now, error=error))
        session.execute(update(CellRun).where(live).values(state="SKIPPED"))


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - limit, 0))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _watch(store: Store, run: Run, proc: subprocess.Popen[bytes], stop: threading.Event | None
           ) -> tuple[Any, str | None]:
    """Wait for the run process; stop it early on timeout, on a cancel request (the run turned
    CANCELLING, from any process) or when ``stop`` is set. Returns (exit code or the running cell, why)."""
    deadline = time.monotonic() + run.timeout if run.timeout else None
    next_check = time.monotonic() + CANCEL_POLL_SECONDS
    beat_every = get_settings().lease_seconds / 4
    next_beat = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=WAIT_SLICE_SECONDS), None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        why = None
        if deadline is not None and now >= deadline:
            why = "timeout"
        elif stop is not None and stop.is_set():
            why = "stop"
        elif now >= next_check:
            if now >= next_beat:  # renew the lease: a live supervisor's run is never declared crashed
                next_beat = now + beat_every
                with store.write() as session:
                    session.execute(update(Run).where(Run.id == run.id).values(heartbeat_at=utcnow()))
            next_check = now + CANCEL_POLL_SECONDS
            with store.read() as session:
                if session.get(Run, run.id).state == states.S.CANCELLING:
                    why = "cancel"
        if why is not None:
            cell = _running_cell(store, run)
            terminate_tree(proc.pid)
            proc.wait()
            return cell, why


def working_directory(source_path: str | None, output_path: str) -> Path:
    """Where a run executes: the notebook's folder (relative paths in it work as in Jupyter), or the
    output's folder for a flow whose file is gone."""
    source_dir = Path(source_path).parent if source_path else None
    return source_dir if source_dir and source_dir.is_dir() else Path(output_path).parent


class RunProcess:
    """A run process (``python -m nbflow.runprocess``) and the file its stderr goes to.

    Its stderr (and its kernel's) goes to a file, so kernel chatter never reaches a terminal and a
    crash's last words are kept for the run's error."""

    def __init__(self, proc: subprocess.Popen[bytes], err_path: str, kernel_name: str) -> None:
        self.proc = proc
        self.err_path = err_path
        self.kernel_name = kernel_name
        self._ready = False
        if proc.stdout is not None:
            os.set_blocking(proc.stdout.fileno(), False)

    def ready(self) -> bool:
        """A warm slot whose kernel is started and its client connected (it says so on stdout)."""
        if not self._ready and self.proc.stdout is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                self._ready = b"ready" in (os.read(self.proc.stdout.fileno(), 64) or b"")
        return self._ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, run_id: uuid.UUID) -> bool:
        """Give a warm slot its run; False if it is gone (the caller starts a cold one instead)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{run_id}\n".encode())
            self.proc.stdin.close()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def discard(self) -> None:
        """An unused warm slot: EOF makes it kill its kernel and exit; a stuck one is killed."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
        try:
            self.proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            terminate_tree(self.proc.pid)
            self.proc.wait()
        self.cleanup()

    def cleanup(self) -> None:
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(self.err_path)


def spawn(store: Store, kernel_name: str, cwd: str | Path, *, run_id: uuid.UUID | None = None,
          progress: bool = False) -> RunProcess:
    """Start a run process for ``run_id``, or, without one, a warm slot that waits for its run on stdin."""
    cmd = [sys.executable, "-m", "nbflow.runprocess", "--kernel", kernel_name, "--cwd", str(cwd),
           "--parent-pid", str(os.getpid())]
    cmd += [str(run_id)] if run_id is not None else ["--warm"]
    env = dict(os.environ, NBFLOW_DATABASE_URL=store.url)
    # The progress bar gets a copy of our stderr of its own.
    progress_fd = os.dup(sys.stderr.fileno()) if progress else None
    if progress_fd is not None:
        cmd += ["--progress-fd", str(progress_fd)]
    with tempfile.NamedTemporaryFile(prefix="nbflow-run-", suffix=".stderr", delete=False) as err:
        err_path = err.name
    try:
        with open(err_path, "wb") as err_fh:
            proc = subprocess.Popen(
                cmd, env=env, stderr=err_fh,
                stdout=subprocess.PIPE if run_id is None else subprocess.DEVNULL,
                stdin=subprocess.PIPE if run_id is None else subprocess.DEVNULL,
                start_new_session=True, pass_fds=() if progress_fd is None else (progress_fd,),
            )
    except BaseException:
        os.unlink(err_path)
        raise
    finally:
        if progress_fd is not None:
            os.close(progress_fd)
    return RunProcess(proc, err_path, kernel_name)


class WarmSource(Protocol):
    """Where supervisors get warm run processes from (``nbflow.pool.KernelPool``)."""

    def take(self, kernel_name: str) -> RunProcess | None: ...


def run_attempt_process(store: Store, run: Run, *, progress: bool = False,
                        stop: threading.Event | None = None, pool: WarmSource | None = None) -> None:
    """Run one attempt of a PENDING run in its own process (a warm one from ``pool`` if it has one
    for the run's kernel) and wait for it to end, one way or another."""
    rp = pool.take(run.kernel_name) if pool is not None else None
    if rp is not None and not rp.hand(run.id):
        rp.discard()
        rp = None
    if rp is None:
        with store.read() as session:
            source_path = session.get(Flow, run.flow_id).source_path
        rp = spawn(store, run.kernel_name, working_directory(source_path, run.output_path), run_id=run.id,
                   progress=progress)
    proc = rp.proc
    try:
        try:
            outcome, why = _watch(store, run, proc, stop)
        except KeyboardInterrupt:
            terminate_tree(proc.pid)
            proc.wait()
            settle(store, run.id, "cancel", "cancelled by the user (interrupt)")
            raise
        if why == "timeout":
            settle(store, run.id, "timeout", f"the run exceeded its timeout of {run.timeout:g}s", outcome)
            return
        if why == "cancel":
            settle(store, run.id, "cancel", "cancelled", outcome)
            return
        if why == "stop":
            settle(store, run.id, "cancel", "the worker shut down before the run finished", outcome)
            return
        rc = outcome
        if rc != 0:
            tail = _tail(rp.err_path)
            detail = f"the run process exited with code {rc}" + (f": {tail.splitlines()[-1]}" if tail else "")
            settle(store, run.id, "crash", detail, _running_cell(store, run))
    finally:
        rp.cleanup()


def _promote(store: Store, run_id: uuid.UUID, wait: Callable[[float], Any]) -> bool:
    """Wait out an AwaitingRetry run's delay, then move it SCHEDULED -> PENDING. False if it was cancelled."""
    with store.read() as session:
        run = session.get(Run, run_id)
        due = run.expected_start_at
    if due is not None:
        delay = (due - utcnow()).total_seconds()
        if delay > 0:
            wait(delay)
    with store.write() as session:
        run = states.lock_run(session, run_id)
        if run.state != states.S.SCHEDULED:
            return False
        states.transition(session, run, states.S.PENDING, message=f"attempt {run.attempt} starting")
    return True


def execute_run(store: Store, run_id: uuid.UUID, *, progress: bool = False,
                wait: Callable[[float], Any] = time.sleep, stop: threading.Event | None = None,
                pool: WarmSource | None = None) -> Run:
    """Run a PENDING run in the foreground, through all its attempts, and return it ended."""
    if stop is not None and wait is time.sleep:
        wait = stop.wait
    while True:
        with store.read() as session:
            run = session.get(Run, run_id)
        if run.state == states.S.CANCELLING:  # cancelled before its process took it
            settle(store, run_id, "cancel", "cancelled before it started")
        elif run.state == states.S.SCHEDULED:
            if stop is not None and stop.is_set():
                return run
            if not _promote(store, run_id, wait):
                continue
        elif run.state == states.S.PENDING:
            run_attempt_process(store, run, progress=progress, stop=stop, pool=pool)
        else:
            return run
