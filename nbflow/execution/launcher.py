"""Supervising run processes: start one per attempt, enforce the whole-run timeout, stop it cleanly
on cancel, notice when it dies, and carry the run through its retries.

The run process (``nbflow.execution.runprocess``) writes the states it can know itself (RUNNING, COMPLETED, FAILED);
this side writes the ones it cannot: TimedOut (it was stopped), CRASHED (it died), CANCELLED.
Stopping is never merely cooperative: SIGTERM lets the process shut its kernel down, and after a grace
period everything left of the process tree, the kernel included, gets SIGKILL.

The supervision (``supervise``) needs only an ``Attempt``: a run process here (``start_local``), or an
attempt executing elsewhere, such as a task on a Dask cluster (``nbflow.execution.executors``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import select, update

from nbflow.checks import MAX_SECONDS
from nbflow.core import states
from nbflow.execution import containment, processes
from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import CellRun, Flow, Log, Run, utcnow
from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up, retrying

log = logging.getLogger("nbflow.launcher")

GRACE_SECONDS = processes.GRACE_SECONDS
WAIT_SLICE_SECONDS = 0.1
CANCEL_POLL_SECONDS = 0.5
# A run found ended (by its own process) while that process still runs: the time it gets to exit on its
# own before it is stopped (it only kills its kernel and exits once its end is written).
ENDED_EXIT_SECONDS = 10.0


def _running_cell(store: Store, run: Run) -> tuple[int | None, str | None]:
    def read() -> tuple[int | None, str | None]:
        with store.read() as session:
            row = session.execute(
                select(CellRun.cell_index, CellRun.cell_id)
                .where(CellRun.run_id == run.id, CellRun.attempt == run.attempt, CellRun.state == "RUNNING")
            ).first()
        return (row[0], row[1]) if row else (None, None)

    try:  # only to say which cell was stopped: not worth waiting out an outage for
        return read()
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        report_down(store, exc, "reading a run's cells")
        return None, None


def settle(store: Store, run_id: uuid.UUID, why: str, detail: str,
           cell: tuple[int | None, str | None] = (None, None), *, attempt: int | None = None,
           worker_id: str | None = None, stop: threading.Event | None = None, name: str | None = None) -> bool:
    """Write the end the process could not write itself, if the run is still live (and, given
    ``attempt``, still in that attempt; given ``worker_id``, still that worker's). Returns whether it
    wrote it. ``name``: the FAILED state's name instead of Crashed/TimedOut (``OutOfMemory``).

    ``cell`` is the cell that was running when the process was stopped (read before stopping it): it
    ends FAILED (CANCELLED on a cancel) and the cells that never ran end SKIPPED.

    Retried while the database is unavailable (until ``stop`` is set). The ``attempt`` guard is what
    keeps a late write from an old attempt (its supervisor cut off from the database for longer than
    the lease, the run reaped and retried meanwhile) off the attempt that replaced it.
    """
    return retrying(lambda: _settle(store, run_id, why, detail, cell, attempt, worker_id, name), store,
                    what=f"ending run {run_id}", stop=stop)


def _settle(store: Store, run_id: uuid.UUID, why: str, detail: str, cell: tuple[int | None, str | None],
            expected_attempt: int | None, worker_id: str | None, name: str | None = None) -> bool:
    cell_index, cell_id = cell
    with store.write() as session:
        run = states.lock_run(session, run_id)
        state = states.StateType(run.state)
        if expected_attempt is not None and run.attempt != expected_attempt:
            return False
        if worker_id is not None and run.worker_id != worker_id:
            return False
        if state in states.TERMINAL or (state is states.S.SCHEDULED and why != "cancel"):
            return False
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
    return True


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
    or one on a Dask worker (``nbflow.execution.executors.dask``). ``supervise`` needs nothing more of it."""

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


class _Lease:
    """What the supervisor knows of its hold on the run: renewed every ``lease/4``, checked every
    ``CANCEL_POLL_SECONDS`` (a cancel request, or the run taken from it), both skipped while the
    database is unavailable, retried with backoff, and counted: once it could not renew for a whole
    lease it must assume a reaper elsewhere has ended the attempt, and stops it (``lease_lost``)."""

    def __init__(self, store: Store, run: Run) -> None:
        self.store = store
        self.run_id = run.id
        self.attempt = run.attempt
        self.owner = run.worker_id
        self.lease = get_settings().lease_seconds
        self.renewed = time.monotonic()  # the claim (or the runner's renewal) just renewed it
        self.next_beat = time.monotonic()
        self.next_check = time.monotonic() + CANCEL_POLL_SECONDS
        self.ended_seen: float | None = None
        self.backoff = Backoff(first=CANCEL_POLL_SECONDS)

    def lease_lost(self, now: float) -> bool:
        return now - self.renewed > self.lease

    def poll(self, now: float) -> str | None:
        """Renew when due and read the run: "cancel", "lost" (no longer this attempt's), or None."""
        if now < self.next_check:
            return None
        try:
            wrote, why = self._poll(now)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            report_down(self.store, exc, f"supervising run {self.run_id}")
            self.next_check = now + self.backoff.next()
            return None
        report_up(self.store, read_only=not wrote)
        self.backoff.reset()
        self.next_check = now + CANCEL_POLL_SECONDS
        return why

    def _poll(self, now: float) -> tuple[bool, str | None]:
        wrote = now >= self.next_beat
        if wrote:  # renew the lease: a live supervisor's run is never declared crashed
            with self.store.write() as session:
                session.execute(update(Run).where(Run.id == self.run_id, Run.attempt == self.attempt)
                                .values(heartbeat_at=utcnow()))
            self.renewed = now
            self.next_beat = now + self.lease / 4
        with self.store.read() as session:
            row = session.execute(select(Run.state, Run.attempt, Run.worker_id).where(Run.id == self.run_id)).one()
        state, attempt, owner = states.StateType(row[0]), row[1], row[2]
        # A reaper that ends an attempt clears the run's worker: ours no more, wherever its retry runs.
        # Our own process failing with a retry left moves it to SCHEDULED, attempt + 1, still ours.
        if owner != self.owner or (attempt != self.attempt and state is not states.S.SCHEDULED):
            return wrote, "lost"  # this attempt must stop, and write nothing
        if state is states.S.CANCELLING:
            return wrote, "cancel"
        if state in states.TERMINAL or state is states.S.SCHEDULED:  # its process wrote its end: it exits
            self.ended_seen = self.ended_seen or now
            if now - self.ended_seen > ENDED_EXIT_SECONDS:
                return wrote, "ended"
        return wrote, None


def _watch(store: Store, run: Run, attempt: Attempt, stop: threading.Event | None) -> tuple[Any, str | None]:
    """Wait for the attempt; stop it early on timeout, on a cancel request (the run turned
    CANCELLING, from any process), when ``stop`` is set, when the run is no longer this attempt's
    ("lost"), when its process wrote its end but does not exit ("ended") or when the lease could not
    be renewed for a whole lease ("lease").
    Returns (exit code or the running cell, why)."""
    # The timeout counts from when the attempt executes: not while it waits for a place on a cluster.
    deadline = time.monotonic() + run.timeout if run.timeout and attempt.started() else None
    lease = _Lease(store, run)
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
        else:
            why = lease.poll(now)
            if why is None and lease.lease_lost(now):
                why = "lease"
        if why is not None:
            cell = _running_cell(store, run) if why not in ("lost", "ended") else (None, None)
            attempt.terminate()
            return cell, why


class WarmSource(Protocol):
    """Where supervisors get warm run processes from (``nbflow.execution.pool.KernelPool``)."""

    def take(self, kernel_name: str) -> processes.RunProcess | None: ...


def start_local(store: Store, run: Run, *, progress: bool = False, pool: WarmSource | None = None) -> LocalAttempt:
    """Start one attempt of a PENDING run in its own process here: a warm one from ``pool`` if it has one
    for the run's kernel, else a forked one (a runner) or a fresh ``python -m nbflow.execution.runprocess``."""
    def flow_settings() -> tuple[str | None, int | None]:
        with store.read() as session:
            flow = session.get(Flow, run.flow_id)
            return flow.source_path, flow.memory_limit

    source_path, memory_limit = retrying(flow_settings, store, what=f"starting run {run.id}", read_only=True)
    rp = pool.take(run.kernel_name) if pool is not None else None
    if rp is not None and not rp.hand(run.id, memory_limit):
        rp.discard()
        rp = None
    if rp is None:
        cwd = containment.working_directory(source_path, run.output_path)
        if pool is not None:  # a runner: forked, with everything imported
            rp = processes.fork(store, run.kernel_name, cwd, run_id=run.id, memory_limit=memory_limit)
        else:  # the foreground `nbflow run`
            rp = processes.start(store, run.kernel_name, cwd, run.id, progress=progress, memory_limit=memory_limit)
    if not rp.memory_enforced:  # said in the run's log, never silently ignored
        def say() -> None:
            with store.write() as session:
                session.add(Log(run_id=run.id, attempt=run.attempt, at=utcnow(), stream="system", cell_index=None,
                                text=f"the flow's memory limit of {containment.format_bytes(memory_limit or 0)} is "
                                     f"not enforced on this worker ({containment.mechanism().describe()})"))

        retrying(say, store, what=f"starting run {run.id}")
    return LocalAttempt(rp)


def supervise(store: Store, run: Run, attempt: Attempt, stop: threading.Event | None = None) -> bool:
    """Wait for a started attempt to end, one way or another, and write the end it could not write
    itself: TimedOut, CANCELLED (a cancel request or ``stop``) or CRASHED (a non-zero exit, a lease
    that ran out, or the supervision itself failing). Returns False if the run was taken from this
    attempt (reaped, maybe retried elsewhere): then it wrote nothing, and must not go on with the run.

    Whatever it meets, the run does not stay RUNNING: an error here stops the attempt and ends it
    CRASHED with the error as its reason (or, if the database is gone and ``stop`` is set, leaves it
    to the lease: a reaper ends it)."""
    def ended(why: str, detail: str, cell: tuple[int | None, str | None] = (None, None),
              name: str | None = None) -> None:
        settle(store, run.id, why, detail, cell, attempt=run.attempt, stop=stop, name=name)

    try:
        try:
            outcome, why = _watch(store, run, attempt, stop)
        except KeyboardInterrupt:
            attempt.terminate()
            ended("cancel", "cancelled by the user (interrupt)")
            raise
        except Exception as exc:
            attempt.terminate()
            if is_unavailable(exc):
                raise
            log.exception("supervising run %s failed; ending it CRASHED", run.id)
            ended("crash", f"its supervisor failed: {type(exc).__name__}: {exc}"[:500])
            return True
        if why == "lost":
            log.warning("run %s: attempt %s was ended elsewhere (its lease ran out); stopped it", run.id, run.attempt)
            return False
        if why == "ended":  # it wrote its end, then did not exit: stopped, nothing more to write
            return True
        if why == "lease":
            lease = get_settings().lease_seconds
            ended("crash", f"its supervisor could not renew its lease of {lease:g}s (the database was "
                           "unreachable for longer): the attempt was stopped", outcome)
            return True
        if why == "timeout":
            ended("timeout", f"the run exceeded its timeout of {run.timeout:g}s", outcome)
            return True
        if why == "cancel":
            ended("cancel", "cancelled", outcome)
            return True
        if why == "stop":
            ended("cancel", "the worker shut down before the run finished", outcome)
            return True
        if outcome != 0:
            oom = getattr(attempt, "out_of_memory", False)  # a FAILED run, not a crash: over its memory limit
            ended("crash", attempt.exit_detail(outcome), _running_cell(store, run),
                  name="OutOfMemory" if oom else None)
        return True
    finally:
        attempt.cleanup()


def _promote(store: Store, run_id: uuid.UUID, owner: str | None, wait: Callable[[float], Any],
             stop: threading.Event | None = None) -> bool:
    """Wait out an AwaitingRetry run's delay, then move it SCHEDULED -> PENDING. False if it was
    cancelled, or is no longer ``owner``'s (released to the queue or claimed elsewhere meanwhile)."""
    def due_at() -> Any:
        with store.read() as session:
            return session.get(Run, run_id).expected_start_at

    due = retrying(due_at, store, what=f"retrying run {run_id}", stop=stop, read_only=True)
    if due is not None:
        delay = (due - utcnow()).total_seconds()
        if delay > 0:
            wait(min(delay, MAX_SECONDS))  # a date far off (an old row's huge delay) must not overflow a wait

    def promote() -> bool:
        with store.write() as session:
            run = states.lock_run(session, run_id)
            if run.state != states.S.SCHEDULED or run.worker_id != owner:
                return False
            states.transition(session, run, states.S.PENDING, message=f"attempt {run.attempt} starting")
        return True

    return retrying(promote, store, what=f"retrying run {run_id}", stop=stop)


def execute_run(store: Store, run_id: uuid.UUID, *, progress: bool = False,
                wait: Callable[[float], Any] = time.sleep, stop: threading.Event | None = None,
                pool: WarmSource | None = None, start: Callable[[Store, Run], Attempt] | None = None) -> Run:
    """Run a PENDING run in the foreground, through all its attempts, and return it ended.

    Each attempt is started by ``start`` (default: a run process here, see ``start_local``) and
    supervised here whatever started it, so retries, timeouts and cancels mean the same everywhere.
    The run is this call's while its ``worker_id`` stays what it was at the start (its claim): once a
    reaper released it, or it was taken by another worker, this returns without touching it.
    Database outages are waited out (retried), until ``stop`` is set."""
    if stop is not None and wait is time.sleep:
        wait = stop.wait

    def read() -> Run:
        with store.read() as session:
            return session.get(Run, run_id)

    owner: Any = ...
    while True:
        run = retrying(read, store, what=f"reading run {run_id}", stop=stop, read_only=True)
        if owner is ...:
            owner = run.worker_id
        elif run.worker_id != owner and run.state not in states.TERMINAL:
            return run  # taken from us (reaped and released): whoever holds it now carries it on
        if run.state == states.S.CANCELLING:  # cancelled before its process took it
            settle(store, run_id, "cancel", "cancelled before it started", stop=stop)
        elif run.state == states.S.SCHEDULED:
            if stop is not None and stop.is_set():
                return run
            if not _promote(store, run_id, owner, wait, stop):
                continue
        elif run.state == states.S.PENDING:
            attempt = start_local(store, run, progress=progress, pool=pool) if start is None else start(store, run)
            if not supervise(store, run, attempt, stop):
                return retrying(read, store, what=f"reading run {run_id}", stop=stop, read_only=True)
        else:
            return run
