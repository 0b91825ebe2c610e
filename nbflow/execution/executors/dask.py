"""The Dask executor: each attempt of a claimed run as a task on a Dask ``distributed`` cluster.

The worker (``nbflow worker --executor dask --dask-scheduler tcp://host:8786``) claims runs as always
and supervises each one from its own process (``launcher.supervise``: lease renewal, timeout, cancel,
CRASHED); only where the attempt executes changes. The task, on a Dask worker, starts
``python -m nbflow.execution.runprocess RUN_ID`` there -- a process of its own, so papermill's ``chdir`` and the
kernel stay out of the Dask worker -- and that process reports cells, logs, results and states to the
store exactly as it does locally. So every Dask worker needs nbflow installed, the flows' notebooks and
``NBFLOW_HOME`` at the same paths (shared storage), and the database: SQLite only when the Dask
workers share the worker's machine, PostgreSQL otherwise.

How a stop reaches a running task, given that ``Future.cancel`` cannot stop one: the task polls a
Dask ``Event`` the supervisor sets (cancel, timeout, worker shutdown) and then terminates its run process
tree, kernel included, and returns; the supervisor waits for that before writing the run's end. A
second ``Event``, set by the task when it starts, tells the supervisor whether there is anything to wait
for (a task still queued is simply cancelled) and tells a task that Dask re-ran it after its Dask worker
died: it then starts nothing and reports the attempt lost, so the run ends CRASHED (and is retried
if it has retries left) instead of executing twice. The run process dies with its Dask worker (it
watches the worker's pid). If the nbflow worker dies instead, its lease runs out, another worker's
reaper ends the run, and the task, which also watches the run in the store, stops its process.

``dask.distributed`` is imported only here, when a ``DaskExecutor`` is made:
``pip install 'nbflow-orchestrator[dask]'``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from sqlalchemy import update

from nbflow.core import states
from nbflow.errors import ExecutorUnavailable
from nbflow.execution import containment, launcher, processes
from nbflow.execution.executors.base import Executor
from nbflow.store import Store, open_store
from nbflow.store.models import Flow, Run

log = logging.getLogger("nbflow.executors.dask")

CONNECT_TIMEOUT_SECONDS = 10.0
STOP_POLL_SECONDS = 0.2  # how soon a task notices its stop event
STORE_POLL_SECONDS = 2.0  # how soon a task notices its run was ended by someone else
EXIT_STOPPED = 143  # the task stopped its run process (or never started one) because it was told to
EXIT_LOST = -1  # the task could not execute the attempt (see its detail)


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"the Dask executor needs dask.distributed, which is not installed ({exc}): "
            "pip install 'nbflow-orchestrator[dask]'"
        ) from None
    return distributed


class DaskExecutor(Executor):
    """Submits each attempt to the Dask cluster whose scheduler listens at ``scheduler_address``."""

    def __init__(self, scheduler_address: str, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self.scheduler_address = scheduler_address
        self.timeout = timeout
        self._lock = threading.Lock()
        self.client = self._connect()

    def _connect(self) -> Any:
        distributed = _distributed()
        try:
            return distributed.Client(self.scheduler_address, timeout=self.timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ExecutorUnavailable(f"cannot reach the Dask scheduler at {self.scheduler_address!r}: {exc}"
                                      ) from None

    def _connected(self) -> Any:
        """The client, connected again if it gave up on a scheduler that went away (and came back)."""
        with self._lock:
            deadline = time.monotonic() + self.timeout + 1
            while self.client.status == "connecting" and time.monotonic() < deadline:  # reconnecting on its own
                time.sleep(0.1)
            if self.client.status != "running":
                self.client.close()
                self.client = self._connect()
            return self.client

    def execute(self, store: Store, run_id: uuid.UUID, stop: threading.Event | None = None) -> Run:
        try:
            return launcher.execute_run(store, run_id, stop=stop,
                                        start=lambda st, run: DaskAttempt(self._connected(), st, run))
        except ExecutorUnavailable as exc:
            # No cluster, no capacity: the run, PENDING and untouched (an attempt is started only once
            # connected), goes back to the queue for this worker or another to take again, rather than
            # ending CRASHED after no attempt at all. Reconnecting takes the connect timeout: the back-off.
            log.warning("%s: run %s stays queued", exc, run_id)
            with store.write() as session:
                session.execute(update(Run).where(Run.id == run_id, Run.state == states.S.PENDING)
                                .values(worker_id=None))
                return session.get(Run, run_id)

    def close(self) -> None:
        self.client.close()


class DaskAttempt:
    """One attempt as a Dask task, seen from the supervising worker (a ``launcher.Attempt``)."""

    def __init__(self, client: Any, store: Store, run: Run) -> None:
        distributed = _distributed()
        key = f"nbflow-run-{run.id}-{run.attempt}"
        self.stop_event = distributed.Event(f"{key}-stop", client=client)
        self.started_event = distributed.Event(f"{key}-started", client=client)
        self.detail = ""
        self._started = False
        try:
            self.future = client.submit(run_task, str(run.id), store.url, self.stop_event.name,
                                        self.started_event.name, key=key, pure=False)
        except Exception as exc:  # the connection went in the meantime: the attempt is lost, not stuck
            self.future = None
            self.detail = f"could not submit the attempt to Dask: {type(exc).__name__}: {exc}"

    def started(self) -> bool:
        if not self._started:
            with contextlib.suppress(Exception):  # the scheduler unreachable: not known to have started
                self._started = self.started_event.is_set()
        return self._started

    def wait(self, timeout: float) -> int | None:
        if self.future is None:
            return EXIT_LOST
        try:
            code, self.detail = self.future.result(timeout=timeout)
        except TimeoutError:
            return None
        except Exception as exc:  # the task raised, or Dask gave up on it (KilledWorker, cancelled)
            self.detail = f"the Dask task failed: {type(exc).__name__}: {exc}"
            return EXIT_LOST
        return code

    def terminate(self) -> None:
        """Tell the task to stop its run process and wait until it has; a task not started yet is
        cancelled (it would start nothing anyway: it looks at the stop event first)."""
        if self.future is None:
            return
        try:
            self.stop_event.set()
            if self.started():
                self.future.result(timeout=processes.GRACE_SECONDS * 3)
                return
        except Exception:  # it ended some other way (its Dask worker died), hangs, or the scheduler is gone
            pass
        self.future.cancel()

    def exit_detail(self, code: int) -> str:
        return self.detail or f"the run process exited with code {code}"

    def cleanup(self) -> None:
        """Forget the task and its events (best effort: with the scheduler gone there is nothing to forget)."""
        with contextlib.suppress(Exception):
            if self.future is not None:
                self.future.release()
            self.stop_event.clear()
            self.started_event.clear()


def run_task(run_id: str, database_url: str, stop_event: str, started_event: str) -> tuple[int, str]:
    """The Dask task: execute one attempt in a run process on this Dask worker and wait for it, or stop
    it when told to (the stop event) or when the run was ended by someone else (its supervisor's lease
    ran out). Returns the run process's exit code and, when it is not 0, why."""
    import distributed

    started = distributed.Event(started_event)
    if started.is_set():
        return EXIT_LOST, "the Dask worker executing the attempt died"
    started.set()
    stop = distributed.Event(stop_event)
    if stop.is_set():
        return EXIT_STOPPED, "stopped before it started"
    store = open_store(database_url)
    rid = uuid.UUID(run_id)
    with store.read() as session:
        run = session.get(Run, rid)
        attempt, kernel_name = run.attempt, run.kernel_name
        cwd = containment.working_directory(session.get(Flow, run.flow_id).source_path, run.output_path)
    # The run process watches this Dask worker's pid (--parent-pid): it and its kernel die with it.
    local = launcher.LocalAttempt(processes.start(store, kernel_name, cwd, rid))
    try:
        next_look = time.monotonic() + STORE_POLL_SECONDS
        while (code := local.wait(STOP_POLL_SECONDS)) is None:
            ended = False
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + STORE_POLL_SECONDS
                ended = _ended_elsewhere(store, rid, attempt)
            if ended or stop.is_set():
                local.terminate()
                return EXIT_STOPPED, "stopped"
        return code, local.exit_detail(code) if code else ""
    finally:
        local.cleanup()


def _ended_elsewhere(store: Store, run_id: uuid.UUID, attempt: int) -> bool:
    """The attempt is over without us: a reaper ended it (its supervisor died), or a later one began."""
    with store.read() as session:
        run = session.get(Run, run_id)
        return run.attempt != attempt or states.StateType(run.state) in states.TERMINAL
