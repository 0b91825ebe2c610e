"""The runner (``nbflow worker``): claims queued runs and executes them, a few at a time.

A claim is one transaction that stamps the run with this worker's id. On PostgreSQL the candidates are
read with ``FOR UPDATE SKIP LOCKED``, so workers on several machines never wait on, or take, the same
run; on SQLite the write transaction starts with ``BEGIN IMMEDIATE`` and so claims are serialised.
Either way a run is executed by exactly one worker. Each claimed run is supervised in a thread of its
own by ``launcher.execute_run`` (its own process per attempt, timeouts, cancel requests, retries).

Crash recovery needs no set-up: supervisors renew a heartbeat lease on the runs they hold
(``NBFLOW_LEASE_SECONDS``, default 30) and the runner leading the ``reaper`` role (``nbflow.services.leader``; any
runner, failing over when it dies) reaps runs whose lease ran out (``reap``).

A runner declares labels (``--labels gpu``) and claims only runs of flows whose labels it has all
(``nbflow.core.workers``); it registers itself in the ``worker`` table while it runs (``nbflow workers``).

Schedules are fired into runs by ``nbflow.services.scheduler``; workers execute them like any queued run.
A run queued in this process wakes the runner at once (``Store.listen``), and on PostgreSQL so does one
queued anywhere (LISTEN/NOTIFY); polling is only the fallback. Claimed runs go to warm run processes
from ``nbflow.execution.pool`` when one is ready for their kernel, so they skip kernel start-up.

Database outages are weather (``nbflow.store.retry``): a step that cannot reach the database is
retried with a capped backoff, supervisors keep their run processes going and retry their writes, and
a run the reaper cannot handle (a bad stored value) is ended with the reason instead of stopping it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from nbflow.core import counts, states, workers
from nbflow.execution import launcher, tracing
from nbflow.execution.executors.base import Executor
from nbflow.execution.executors.local import LocalExecutor
from nbflow.execution.pool import KernelPool
from nbflow.services.leader import REAPER, Leadership
from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import CellRun, Run, utcnow
from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up, retrying

log = logging.getLogger("nbflow.runner")

# Warm slots per kernel name. One is enough to take kernel start-up off a triggered run's path; more
# help only when runs of one kernel arrive faster than a slot refills (~1 s).
DEFAULT_WARM_KERNELS = 1


def new_worker_id(kind: str = "worker") -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(store: Store, worker_id: str, limit: int, labels: Sequence[str] = ()) -> list[uuid.UUID]:
    """Take up to ``limit`` unclaimed runs, oldest first, for ``worker_id``, within the concurrency limits.
    Only runs of flows whose labels are all among ``labels`` (the worker's) are taken (``concurrency.labels_fit``).

    Retries that nobody holds (their worker died while they waited) become PENDING when due, first.
    Runs that a flow, tag or global limit holds back are skipped (left queued, or CANCELLED for a flow
    whose collision strategy is ``cancel-new``) and younger runs are taken instead: see
    ``nbflow.core.concurrency``, which counts the slots in use in this same transaction.
    """
    from nbflow.core import concurrency

    if limit <= 0:
        return []
    now = utcnow()
    with store.write() as session:
        due = session.execute(
            select(Run)
            .where(Run.state == states.S.SCHEDULED, Run.worker_id.is_(None), Run.expected_start_at <= now)
            .order_by(Run.expected_start_at).limit(limit).with_for_update(skip_locked=True)
        ).scalars()
        for run in due:
            states.transition(session, run, states.S.PENDING, message=f"attempt {run.attempt} is due")
        ids = concurrency.admit(session, limit, labels)
        if ids:
            session.execute(
                update(Run).where(Run.id.in_(ids), Run.worker_id.is_(None))
                .values(worker_id=worker_id, heartbeat_at=now)
            )
    return ids


def reap(store: Store, lease_seconds: float) -> list[uuid.UUID]:
    """Recover the runs of supervisors that stopped renewing their lease (killed, machine gone).

    A RUNNING run ends CRASHED (retried if it has attempts left, by whichever runner claims it); a
    CANCELLING one ends CANCELLED; a claimed run that never started, or a retry its worker was waiting
    out, goes back to the queue. A live supervisor renews every ``lease/4``, so a long healthy run is
    never touched. Returns the runs it ended or released.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    touched: list[uuid.UUID] = []
    with store.write() as session:
        stale = session.execute(
            select(Run)
            .where(Run.state.in_([states.S.RUNNING, states.S.CANCELLING]),
                   func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at) < cutoff)
            .with_for_update(skip_locked=True)
        ).scalars()
        for run in list(stale):
            try:
                with session.begin_nested():  # one bad row must not keep every other stale run RUNNING
                    _reap_one(session, run, lease_seconds, now)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                log.exception("reaping run %s failed; ending it without a retry", run.id)
                try:
                    with session.begin_nested():
                        _end_broken(session, run, f"reaping it failed: {type(exc).__name__}: {exc}", now)
                except Exception as again:
                    if is_unavailable(again):
                        raise
                    log.exception("run %s cannot be ended; skipped", run.id)
                    continue
            touched.append(run.id)
        released = session.execute(
            update(Run)
            .where(Run.worker_id.is_not(None),
                   ((Run.state == states.S.PENDING) & (func.coalesce(Run.heartbeat_at, Run.created_at) < cutoff))
                   | ((Run.state == states.S.SCHEDULED) & (Run.expected_start_at < cutoff)))
            .values(worker_id=None)
            .returning(Run.id)
        ).scalars()
        touched.extend(released)
    return touched


def _reap_one(session: Any, run: Run, lease_seconds: float, now: datetime) -> None:
    detail = f"its supervisor ({run.worker_id}) stopped renewing its lease of {lease_seconds:g}s"
    attempt = run.attempt
    if run.state == states.S.CANCELLING:
        states.transition(session, run, states.S.CANCELLED, message=detail)
    else:
        error = {"ename": "Crashed", "evalue": detail, "traceback": [], "cell_index": None, "cell_id": None}
        states.fail(session, run, error=error, crashed=True, message=detail)
        run.worker_id = None  # a retry is anyone's
    _close_cells(session, run.id, attempt, now)


def _end_broken(session: Any, run: Run, why: str, now: datetime) -> None:
    """End a stale run that could not be reaped the usual way (a bad stored value): CRASHED (CANCELLED if
    it was being cancelled) with the reason, and no retry, so that it leaves the reaper's sight."""
    attempt = run.attempt
    if run.state == states.S.CANCELLING:
        states.transition(session, run, states.S.CANCELLED, message=why[:500])
    else:
        run.error = {"ename": "Crashed", "evalue": why, "traceback": [], "cell_index": None, "cell_id": None}
        states.transition(session, run, states.S.CRASHED, message=why[:500])
    run.worker_id = None
    _close_cells(session, run.id, attempt, now)


def _close_cells(session: Any, run_id: uuid.UUID, attempt: int, now: datetime) -> None:
    live = (CellRun.run_id == run_id) & (CellRun.attempt == attempt)
    session.execute(update(CellRun).where(live, CellRun.state == "RUNNING").values(state="FAILED", ended_at=now))
    session.execute(update(CellRun).where(live, CellRun.state == "PENDING").values(state="SKIPPED"))


class Runner:
    """Claim-and-execute loop with ``slots`` runs at once."""

    def __init__(self, store: Store, *, slots: int = 2, poll_interval: float = 1.0,
                 worker_id: str | None = None, warm_kernels: int = DEFAULT_WARM_KERNELS,
                 labels: Sequence[str] = (), executor: Executor | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        tracing.check()  # its run processes trace: a tracing set-up that cannot work stops the runner now
        self.store = store
        self.slots = slots
        self.poll_interval = poll_interval
        self.worker_id = worker_id or new_worker_id()
        self.labels = workers.check_labels(labels)
        self.draining = threading.Event()  # set: claim nothing more
        self.stop = threading.Event()  # set: stop the runs in flight too
        # Set when there may be work: a run queued or a slot freed, in this process (Store.listen) or
        # another (PostgreSQL NOTIFY). Polling every ``poll_interval`` is only the fallback.
        self.wake = threading.Event()
        self._threads: dict[uuid.UUID, threading.Thread] = {}
        self.lease_seconds = get_settings().lease_seconds
        # Reaping is housekeeping: only the runner leading the reaper role does it (nbflow.services.leader).
        self.leadership = Leadership(store, REAPER, self.worker_id, self.lease_seconds)
        self._next_reap = 0.0  # on taking the role, reconcile what we find, then every half lease
        self.healthy = True  # whether the last step() reached the database
        # Set (under the lock) when an idle runner leaves the registry before its last look at the queue:
        # no beat may bring its row back after that (see ``_leave_if_idle``).
        self._beat_lock = threading.Lock()
        self._unlisted = False
        self._errors_logged: set[tuple[str, str, str]] = set()
        self.pool = KernelPool(store, warm_kernels)
        self.executor = executor or LocalExecutor(self.pool)  # where claimed runs execute (nbflow.execution.executors)

    def _execute(self, run_id: uuid.UUID) -> None:
        """A run's supervisor thread. It never dies silently: whatever the attempt loop raises, the run is
        ended CRASHED with the error as its reason (or, with the database gone while stopping, left to
        its lease, which no one renews any more: a reaper ends it)."""
        try:
            run = self.executor.execute(self.store, run_id, stop=self.stop)
            if run.state == states.S.SCHEDULED:  # stopped while waiting out a retry delay: let anyone take it
                retrying(lambda: self._release(run_id), self.store, what="releasing a run", stop=self.stop)
        except Exception as exc:
            self._supervisor_failed(run_id, exc)
        finally:
            self.wake.set()  # a slot is free

    def _release(self, run_id: uuid.UUID) -> None:
        with self.store.write() as session:
            session.execute(update(Run).where(Run.id == run_id, Run.worker_id == self.worker_id)
                            .values(worker_id=None))

    def _supervisor_failed(self, run_id: uuid.UUID, exc: Exception) -> None:
        if is_unavailable(exc):  # only while stopping: retries give up then
            log.warning("run %s: the database is unavailable while stopping; its lease will end it", run_id)
            return
        log.error("the supervisor of run %s failed; ending it CRASHED", run_id, exc_info=exc)
        try:
            launcher.settle(self.store, run_id, "crash", f"its supervisor failed: {type(exc).__name__}: {exc}"[:500],
                            worker_id=self.worker_id, stop=self.stop)  # not a run taken over elsewhere
        except Exception:
            log.exception("run %s could not be ended; its lease will end it", run_id)

    def _supervised(self) -> list[uuid.UUID]:
        """The runs whose supervisor thread is alive (a copy: the step thread changes the dict)."""
        return [run_id for run_id, thread in list(self._threads.items()) if thread.is_alive()]

    def _renew_leases(self) -> None:
        """Renew the lease of every run this worker supervises, every quarter lease, until it stops.

        Each supervisor renews its own run too, but only once its process runs: a run claimed and
        still being handed to a process (a slow start under load) must not look abandoned to the
        reapers of other workers, or of this one. Only runs with a live supervisor thread: a run whose
        supervisor is gone must not be kept alive here, RUNNING forever."""
        backoff = Backoff(cap=self.lease_seconds / 4)
        delay = self.lease_seconds / 4
        while not self.stop.wait(delay):
            delay = self.lease_seconds / 4
            try:
                with self._beat_lock, self.store.write() as session:
                    held = self._supervised()
                    if held:
                        session.execute(
                            update(Run)
                            .where(Run.id.in_(held), Run.worker_id == self.worker_id,
                                   Run.state.in_([states.S.PENDING, states.S.RUNNING, states.S.CANCELLING]))
                            .values(heartbeat_at=utcnow())
                        )
                    if not self._unlisted:
                        workers.beat(session, self.worker_id, self.labels, self.slots)
            except Exception as exc:  # the next beat tries again
                self._loop_error(exc, "renewing leases")
                delay = backoff.next()
            else:
                report_up(self.store)
                backoff.reset()

    def _loop_error(self, exc: Exception, what: str) -> None:
        """A pass of a loop failed: an outage is reported once (``nbflow.store.retry``); a bug is
        logged with its traceback once per kind, and the loop goes on either way."""
        if is_unavailable(exc):
            report_down(self.store, exc, what)
            return
        key = (what, type(exc).__name__, str(exc)[:200])
        if key not in self._errors_logged:
            self._errors_logged.add(key)
            log.error("%s failed (the runner goes on; logged once)", what, exc_info=exc)

    def _attempt(self, what: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
        except Exception as exc:
            self._loop_error(exc, what)
            return False
        return True

    def _housekeeping(self) -> None:
        if not self.leadership.check():
            self._next_reap = 0.0  # whenever we take the role over, reap at once
        elif time.monotonic() >= self._next_reap:
            reap(self.store, self.lease_seconds)
            workers.prune(self.store, self.lease_seconds)
            counts.compact(self.store)  # fold the run-count deltas (nbflow.core.counts)
            report_up(self.store)
            self._next_reap = time.monotonic() + self.lease_seconds / 2  # after it worked: else try again soon

    def _claim(self) -> None:
        free = self.slots - len(self._threads)
        claimed = claim(self.store, self.worker_id, free, self.labels)
        if free > 0:  # it wrote (a full runner asks nothing of the database)
            report_up(self.store)
        for run_id in claimed:
            if run_id in self._threads:  # ours already (cannot happen while our lease holds): one supervisor
                continue
            thread = threading.Thread(target=self._execute, args=(run_id,), name=f"run-{run_id}", daemon=True)
            self._threads[run_id] = thread
            thread.start()

    def step(self) -> int:
        """Reap finished runs and claim new ones for free slots; returns how many runs are in flight.
        Never raises for a database error or a bad row: ``healthy`` says whether the pass went through."""
        for run_id, thread in list(self._threads.items()):
            if not thread.is_alive():
                del self._threads[run_id]
        self.healthy = self._attempt("reaping", self._housekeeping)
        if not self.draining.is_set():
            self.healthy = self._attempt("claiming runs", self._claim) and self.healthy
        return len(self._threads)

    def run(self, *, exit_when_idle: bool = False, grace: float = 30.0, idle_exit: float | None = None) -> None:
        """Loop until asked to stop (or, with ``exit_when_idle``, until nothing is queued or running; with
        ``idle_exit``, once nothing was for that many seconds: an autostarted runner goes away by itself),
        then shut down gracefully. A database outage only slows the loop down (capped backoff), and does
        not count as idle time."""
        self.store.listen(self.wake)
        try:  # a database that is down at start-up is waited for, like one that goes down later
            retrying(lambda: workers.register(self.store, self.worker_id, self.labels, self.slots), self.store,
                     what="registering the worker", stop=self.draining)
            retrying(self.pool.start, self.store, what="starting the kernel pool", stop=self.draining,
                     read_only=True)
        except Exception:
            if not self.draining.is_set():
                raise
        listener = threading.Thread(target=self.store.notifications, args=(self.wake, self.draining),
                                    name="nbflow-listen", daemon=True)
        listener.start()
        threading.Thread(target=self._renew_leases, name="nbflow-lease", daemon=True).start()
        backoff = Backoff(first=self.poll_interval, cap=max(self.poll_interval, 5.0))
        idle_since: float | None = None
        try:
            while not self.draining.is_set():
                self.wake.clear()  # before looking: a wake-up during step() is not lost
                busy = self.step()
                if busy == 0 and exit_when_idle and self.healthy:
                    break
                if busy or not self.healthy:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                if idle_exit is not None and idle_since is not None:
                    left = idle_since + idle_exit - time.monotonic()
                    if left <= 0:
                        if self._leave_if_idle():
                            log.info("nothing queued or running for %gs: exiting", idle_exit)
                            break
                        idle_since = None
                if self.healthy:
                    backoff.reset()
                    wait = self.poll_interval if idle_since is None or idle_exit is None else min(
                        self.poll_interval, max(left, 0.0))
                    self.wake.wait(wait)
                else:  # an outage: wake-ups cannot help until it is back
                    self.draining.wait(backoff.next())
        except KeyboardInterrupt:
            pass  # Ctrl-C asks for the same graceful stop as SIGTERM
        finally:
            self.store.unlisten(self.wake)
        self.shutdown(grace)

    def _leave_if_idle(self) -> bool:
        """Leave the registry, then look at the queue one last time: True if there is still nothing to do
        (exit), else back in the registry. In this order, a trigger that found this runner registered had
        queued its run before the last look, which takes it; one that queues later finds no runner and
        starts one (nbflow.services.autostart). So no run is left waiting on a runner that is leaving."""
        try:
            with self._beat_lock:
                self._unlisted = True
            workers.unregister(self.store, self.worker_id)
            if self.step() == 0 and self.healthy:
                return True
        except Exception as exc:  # the database is down: not idle, stay
            self._loop_error(exc, "leaving the registry")
        with self._beat_lock:
            self._unlisted = False  # the next beat (a quarter lease) lists it again; register now for sure
        self._attempt("registering the worker",
                      lambda: workers.register(self.store, self.worker_id, self.labels, self.slots))
        return False

    def request_stop(self) -> None:
        """Begin a graceful shutdown (from a signal handler or another thread)."""
        self.draining.set()
        self.wake.set()

    def shutdown(self, grace: float = 30.0) -> None:
        """Claim nothing more, let the runs in flight finish for up to ``grace`` seconds, then cancel
        the rest cleanly: they end CANCELLED (kernel interrupted, then killed), never RUNNING forever."""
        self.draining.set()
        deadline = time.monotonic() + grace
        try:
            for thread in list(self._threads.values()):
                thread.join(max(deadline - time.monotonic(), 0))
        finally:
            self.stop.set()
            for thread in list(self._threads.values()):
                thread.join(launcher.GRACE_SECONDS * 3)
            self.pool.close()  # after the runs: their processes go when the pool's thread does
            self.leadership.resign()
            try:
                workers.unregister(self.store, self.worker_id)
            except Exception as exc:  # the database is gone: the reaper leader forgets us once our beat is old
                self._loop_error(exc, f"unregistering worker {self.worker_id}")
