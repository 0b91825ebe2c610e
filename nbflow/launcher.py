"""Supervising run processes: start one per attempt, enforce the whole-run timeout, stop it cleanly
on cancel, notice when it dies, and carry the run through its retries.

The run process (``nbflow.runprocess``) writes the states it can know itself (RUNNING, COMPLETED, FAILED);
this side writes the ones it cannot: TimedOut (it was stopped), CRASHED (it died), CANCELLED.
Stopping is never merely cooperative: SIGTERM lets the process shut its kernel down, and after a grace
period everything left of the process tree, the kernel included, gets SIGKILL.

The supervision (``supervise``) needs only an ``Attempt``: a run process here (``start_local``), or an
attempt executing elsewhere, such as a task on a Dask cluster (``nbflow.executors``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update

from nbflow import containment, processes, states
from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import CellRun, Flow, Log, Run, utcnow

GRACE_SECONDS = processes.GRACE_SECONDS
WAIT_SLICE_SECONDS = 0.1
CANCEL_POLL_SECONDS = 0.5


def _running_cell(store: Store, run: Run) -> tuple[int | None, str | None]:
    with store.read() as session:
        row = session.execute(
            select(CellRun.cell_index, CellRun.cell_id)
            .where(CellRun.run_id == run.id, CellRun.attempt == run.attempt, CellRun.state == "RUNNING")
        ).first()
    return (row[0], row[1]) if row else (None, None)


def settle(store: Store, run_id: uuid.UUID, why: str, detail: str,
            cell: tuple[int | None, str | None] = (None, None), *, name: str | None = None) -> None:
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
            ename = name or ("TimedOut" if why == "timeout" else "Crashed")
            error = {"ename": ename, "evalue": detail, "traceback": [], "cell_index": cell_index,
                     "cell_id": cell_id}
            if state is states.S.PENDING:
                states.fail(session, run, error=error, message=detail)
            else:
                states.fail(session, run, error=error, crashed=why == "crash" and name is None,
                            name=name or ("TimedOut" if why == "timeout" else None), message=detail)
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


class Attempt(Protocol):
    """One attempt executing somewhere, as its supervisor sees it: a run process here (``LocalAttempt``)
    or one on a Dask worker (``nbflow.executors.dask``). ``supervise`` needs nothing more of it."""

    def started(self) -> bool:
        """Whether it is executing: the run's timeout counts from then, not while it waits for a place."""
        ...

    def wait(self, timeout: float) -> int | None:
        """The exit code once it has ended, else None after up to ``timeout`` seconds."""
        ...

    def terminate(self) -> None:
        """Stop it and everything it started (its kernel too); return once they are gone."""
        ...

    def exit_detail(self, code: int) -> str:
        """Why it ended with non-zero ``code``: the message of the CRASHED state."""
        ...

    def cleanup(self) -> None:
        """Once it has ended: release what it left behind."""
        ...


class LocalAttempt:
    """A run process on this machine."""

    def __init__(self, rp: processes.RunProcess) -> None:
        self.rp = rp

    def started(self) -> bool:
        return True

    def wait(self, timeout: float) -> int | None:
        try:
            return self.rp.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.rp.out_of_memory():  # its kernel is over the flow's memory limit (paused there): end the run
            self.out_of_memory = True
            self.rp.group.kill()
            return self.rp.proc.wait()
        return None

    out_of_memory = False

    def terminate(self) -> None:
        self.rp.terminate()
        self.rp.proc.wait()

    def exit_detail(self, code: int) -> str:
        if self.out_of_memory or self.rp.out_of_memory():
            return containment.oom_message(self.rp.group.limit)
        tail = _tail(self.rp.err_path)
        return f"the run process exited with code {code}" + (f": {tail.splitlines()[-1]}" if tail else "")

    def cleanup(self) -> None:
        self.rp.cleanup()


def _watch(store: Store, run: Run, attempt: Attempt, stop: threading.Event | None) -> tuple[Any, str | None]:
    """Wait for the attempt; stop it early on timeout, on a cancel request (the run turned
    CANCELLING, from any process) or when ``stop`` is set. Returns (exit code or the running cell, why)."""
    # The timeout counts from when the attempt executes: not while it waits for a place on a cluster.
    deadline = time.monotonic() + run.timeout if run.timeout and attempt.started() else None
    next_check = time.monotonic() + CANCEL_POLL_SECONDS
    beat_every = get_settings().lease_seconds / 4
    next_beat = time.monotonic()
    while True:
        code = attempt.wait(WAIT_SLICE_SECONDS)
        if code is not None:
            return code, None
        now = time.monotonic()
        why = None
        if deadline is None and run.timeout and attempt.started():
            deadline = now + run.timeout
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
            attempt.terminate()
            return cell, why


def working_directory(source_path: str | None, output_path: str) -> Path:
    """Where a run executes: the notebook's folder (relative paths in it work as in Jupyter), or the
    output's folder for a flow whose file is gone."""
    source_dir = Path(source_path).parent if source_path else None
    return source_dir if source_dir and source_dir.is_dir() else Path(output_path).parent


class WarmSource(Protocol):
    """Where supervisors get warm run processes from (``nbflow.pool.KernelPool``)."""

    def take(self, kernel_name: str) -> processes.RunProcess | None: ...


def start_local(store: Store, run: Run, *, progress: bool = False, pool: WarmSource | None = None) -> LocalAttempt:
    """Start one attempt of a PENDING run in its own process here: a warm one from ``pool`` if it has one
    for the run's kernel, else a forked one (a runner) or a fresh ``python -m nbflow.runprocess``."""
    with store.read() as session:
        flow = session.get(Flow, run.flow_id)
        source_path, memory_limit = flow.source_path, flow.memory_limit
    rp = pool.take(run.kernel_name) if pool is not None else None
    if rp is not None and not rp.hand(run.id, memory_limit):
        rp.discard()
        rp = None
    if rp is None:
        cwd = working_directory(source_path, run.output_path)
        if pool is not None:  # a runner: forked, with everything imported
            rp = processes.fork(store, run.kernel_name, cwd, run_id=run.id, memory_limit=memory_limit)
        else:  # the foreground `nbflow run`
            rp = processes.start(store, run.kernel_name, cwd, run.id, progress=progress, memory_limit=memory_limit)
    if not rp.memory_enforced:  # said in the run's log, never silently ignored
        with store.write() as session:
            session.add(Log(run_id=run.id, attempt=run.attempt, at=utcnow(), stream="system", cell_index=None,
                            text=f"the flow's memory limit of {containment.format_bytes(memory_limit or 0)} is not "
                                 f"enforced on this worker ({containment.mechanism().describe()})"))
    return LocalAttempt(rp)


def supervise(store: Store, run: Run, attempt: Attempt, stop: threading.Event | None = None) -> None:
    """Wait for a started attempt to end, one way or another, and write the end it could not write
    itself: TimedOut, CANCELLED (a cancel request or ``stop``) or CRASHED (a non-zero exit)."""
    try:
        try:
            outcome, why = _watch(store, run, attempt, stop)
        except KeyboardInterrupt:
            attempt.terminate()
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
        if outcome != 0:
            oom = getattr(attempt, "out_of_memory", False)  # a FAILED run, not a crash: over its memory limit
            settle(store, run.id, "crash", attempt.exit_detail(outcome), _running_cell(store, run),
                   name="OutOfMemory" if oom else None)
    finally:
        attempt.cleanup()


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
                pool: WarmSource | None = None, start: Callable[[Store, Run], Attempt] | None = None) -> Run:
    """Run a PENDING run in the foreground, through all its attempts, and return it ended.

    Each attempt is started by ``start`` (default: a run process here, see ``start_local``) and
    supervised here whatever started it, so retries, timeouts and cancels mean the same everywhere."""
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
            attempt = start_local(store, run, progress=progress, pool=pool) if start is None else start(store, run)
            supervise(store, run, attempt, stop)
        else:
            return run
