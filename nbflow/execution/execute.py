"""The papermill integration: one attempt of one run, inside the run's own OS process.

``run_attempt`` (called by the run process, ``nbflow.execution.runprocess``, with the kernel it started) moves the
run PENDING -> RUNNING, executes the flow version's stored notebook through
``papermill.execute_notebook`` with the ``nbflow`` engine, and ends the attempt. The
engine is papermill's nbclient engine with a ``NotebookExecutionManager`` whose cell hooks also write
``cell_run`` rows as cells start and end (so progress can be watched live), stream output to ``log``
and collect ``nbflow.record`` values into the run's result.

Its own process, because papermill's ``cwd`` is a process-wide ``chdir`` and a kill must be clean:
``nbflow.execution.launcher`` supervises it (timeouts, cancellation, crashes, retries). papermill is given the
started kernel and its connected client (``km``/``kc``), so it neither waits for a kernel nor shuts one
down: the run process kills the kernel after the end is written (see ``nbflow.execution.kernels``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines
from papermill.log import logger as papermill_logger
from papermill.utils import merge_kwargs, remove_args
from sqlalchemy import insert, select, update

from nbflow.core import states
from nbflow.core.secrets import Redactor
from nbflow.execution import containment, tracing
from nbflow.record import RECORD_MIME
from nbflow.settings import get_settings
from nbflow.store import Store, open_store
from nbflow.store.database import announce_events
from nbflow.store.models import CellRun, Flow, FlowVersion, Log, Run, RunStateEvent, utcnow
from nbflow.store.retry import Backoff, is_unavailable, retrying

if TYPE_CHECKING:
    from nbflow.execution.kernels import Kernel

ENGINE_NAME = "nbflow"
LOG_FLUSH_SECONDS = 0.5
LOG_FLUSH_BYTES = 64_000
# A stopped attempt's last log lines get this long to be written (less than the supervisor's grace).
STOP_FLUSH_SECONDS = 1.0


def _error_from_outputs(cell: Any) -> dict[str, Any] | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return {"ename": out.get("ename"), "evalue": out.get("evalue"),
                    "traceback": list(out.get("traceback") or [])}
    return None


def _is_clean_exit(error: dict[str, Any] | None) -> bool:
    """``sys.exit()`` / ``sys.exit(0)`` ends a notebook successfully, as papermill treats it."""
    return bool(error) and error["ename"] == "SystemExit" and str(error["evalue"]) in ("", "0", "None")


class NotStarted(Exception):
    """The run stopped being PENDING (cancelled) before its attempt could start: nothing was executed."""


class RunRecorder:
    """Writes what the engine sees into the store: the start, cells, logs, results. One per attempt.

    Writes happen in a thread of their own (``_write_loop``): a cell never waits for the database.
    What the engine reports is queued under a lock, and the writer commits everything queued so far in
    one transaction, in order, so a run's records are at most one commit behind what it does. Two
    points wait for the writer: the first cell (nothing executes before the run is RUNNING, and a run
    cancelled meanwhile executes nothing) and the attempt's end, which is written after all the rest.
    """

    def __init__(self, store: Store, run_id: uuid.UUID, attempt: int, log_bytes: int, log_limit: int) -> None:
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
        self.log_bytes = log_bytes
        self.log_limit = log_limit
        self.truncated = log_bytes >= log_limit
        self.current_cell: int | None = None
        self.failed_cell: tuple[int, str | None, dict[str, Any]] | None = None
        self.clean_exit = False
        self.input_label: str | None = None
        self.trace: tracing.AttemptTrace | None = None  # the attempt's spans, when tracing is on
        # What the writer has yet to write, guarded by _lock: the start, new cell rows, cell updates
        # (in order), results and log lines.
        self._lock = threading.Lock()
        self._start = False
        self._new_cells: list[dict[str, Any]] = []
        self._cell_updates: list[tuple[int, dict[str, Any]]] = []
        self._results: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        # nbflow.core.secrets: the values of secrets the notebook reads become *** in all the run stores.
        self.redactor = Redactor(store)
        self._started = False
        # The writer: ``_queued`` counts the batches asked for, ``_written`` those committed.
        self._cond = threading.Condition()
        self._queued = 0
        self._written = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the writer ----------------------------------------------------------------------------
    def _kick(self) -> int:
        """Ask the writer to write what is queued; returns the ticket ``sync`` waits for. Once closed,
        nothing more is written here (the attempt's end writes what is left): nothing to wait for."""
        with self._cond:
            if self._closed:
                return self._written
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="nbflow-recorder", daemon=True)
                self._thread.start()
            self._queued += 1
            self._cond.notify_all()
            return self._queued

    def sync(self, timeout: float | None = None) -> None:
        """Wait until everything queued is committed (or ``timeout`` passed); raise what the writer met
        (NotStarted included)."""
        ticket = self._kick()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._written < ticket and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._cond.wait(left)
            if self._error is not None:
                raise self._error

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while self._written >= self._queued and not self._closed:
                    self._cond.wait()
                if self._written >= self._queued:
                    return
                target = self._queued
            try:
                batch = self._take()
                if batch.any():
                    # An outage is waited out, the same batch retried: nothing the notebook did is lost,
                    # and the notebook never waits for it (its supervisor stops it if the lease runs out).
                    retrying(functools.partial(self._write_batch_now, batch), self.store,
                             what=f"recording run {self.run_id}")
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._written = target
                self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued and stop the writer; the caller writes the end itself. With ``timeout``
        (a stopped attempt: its supervisor writes the end), give up waiting after that long: the writer
        may be waiting out an outage, and a stop must not wait for the database."""
        try:
            self.sync(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout)

    # -- the attempt ---------------------------------------------------------------------------
    def start(self) -> None:
        """Queue PENDING -> RUNNING: written while papermill prepares the notebook."""
        with self._lock:
            self._start = True
        self._kick()

    def _write_start(self, session: Any) -> None:
        run = states.lock_run(session, self.run_id)
        if run.attempt == self.attempt and run.state == states.S.RUNNING and run.process_id == os.getpid():
            return  # a retry of a start whose commit did commit (the connection broke as it answered)
        if run.state != states.S.PENDING or run.attempt != self.attempt:
            raise NotStarted(run.state)
        states.transition(session, run, states.S.RUNNING)
        run.process_id = os.getpid()
        run.heartbeat_at = utcnow()

    # -- cells ---------------------------------------------------------------------------------
    def notebook_start(self, nb: nbformat.NotebookNode) -> None:
        with self._lock:
            for index, cell in enumerate(nb.cells):
                if cell.get("cell_type") == "code":
                    self._new_cells.append({"run_id": self.run_id, "attempt": self.attempt, "cell_index": index,
                                            "cell_id": cell.get("id"), "state": "PENDING"})
        self._kick()

    def _update_cell(self, session: Any, index: int, **values: Any) -> None:
        # Only a live cell: one a reaper already ended (this attempt's lease ran out) stays as it said.
        session.execute(
            update(CellRun)
            .where(CellRun.run_id == self.run_id, CellRun.attempt == self.attempt, CellRun.cell_index == index,
                   CellRun.state.in_(["PENDING", "RUNNING"]))
            .values(**values)
        )

    def cell_start(self, index: int, cell: Any) -> None:
        if not self._started:
            self.sync()  # RUNNING is committed before any cell executes (NotStarted: it was cancelled)
            self._started = True
        if cell.get("cell_type") != "code":
            return
        self.current_cell = index
        if self.trace is not None:
            self.trace.cell_start(index, cell.get("id"))
        with self._lock:
            self._cell_updates.append((index, {"state": "RUNNING", "started_at": utcnow()}))
        self._kick()

    def cell_complete(self, index: int, cell: Any) -> None:
        if cell.get("cell_type") != "code":
            return
        # papermill calls this from a ``finally``: an exception on its way out (a cell timeout, a dead
        # kernel) means this cell did not complete, though its outputs show no error.
        inflight = sys.exc_info()[1]
        if inflight is not None and not isinstance(inflight, Exception):
            return  # stopped (Terminated, KeyboardInterrupt): the supervisor settles the cells
        error = _error_from_outputs(cell)
        if error is None and inflight is not None:
            error = {"ename": type(inflight).__name__, "evalue": str(inflight).strip(), "traceback": []}
        state = "COMPLETED"
        if error is not None:
            if _is_clean_exit(error):
                self.clean_exit = True
                error = None
            else:
                state = "FAILED"
                self.failed_cell = (index, cell.get("id"), error)
        if self.trace is not None:
            self.trace.cell_end(index, state, error)
        with self._lock:
            self._collect_results(cell)
            self._cell_updates.append((index, {"state": state, "ended_at": utcnow(),
                                               "execution_count": cell.get("execution_count"), "error": error}))
        self._kick()
        self.current_cell = None

    def _collect_results(self, cell: Any) -> None:
        for out in cell.get("outputs", []):
            payload = (out.get("data") or {}).get(RECORD_MIME)
            if out.get("output_type") in ("display_data", "execute_result") and isinstance(payload, dict):
                self._results[payload.get("name")] = payload.get("value")

    def notebook_end(self, session: Any, batch: _Batch | None = None) -> None:
        """In the transaction that ends the attempt: what is pending, and cells that never ran (after a
        failure, a clean exit or a stop) SKIPPED, not left PENDING."""
        self.write_batch(session, self._take() if batch is None else batch)
        session.execute(
            update(CellRun)
            .where(CellRun.run_id == self.run_id, CellRun.attempt == self.attempt,
                   CellRun.state.in_(["PENDING", "RUNNING"]))
            .values(state="SKIPPED")
        )

    # -- logs ----------------------------------------------------------------------------------
    def log(self, stream: str, text: str, *, force: bool = False, flush: bool | None = None) -> None:
        """Queue a log line; ``force`` bypasses the size limit and, unless ``flush=False`` (the line is
        written with the next transaction), writes it now."""
        if not text or (self.truncated and not force):
            return
        text = self.redactor.redact(text)
        data = text.encode("utf-8", "replace")
        if not force and self.log_bytes + len(data) > self.log_limit:
            # Keep what fits, then say once that the rest is only in the output notebook.
            self.truncated = True
            room = max(self.log_limit - self.log_bytes, 0)
            self._append(stream, data[:room].decode("utf-8", "ignore"), room)
            stream, size = "system", 0
            text = (f"[nbflow] log truncated: this run reached its limit of {self.log_limit} bytes "
                    "(NBFLOW_LOG_LIMIT_BYTES); the output notebook has everything")
        else:
            size = len(data)
        self._append(stream, text, size)
        if ((force if flush is None else flush) or self._pending_bytes >= LOG_FLUSH_BYTES
                or time.monotonic() - self._last_flush >= LOG_FLUSH_SECONDS):
            self.flush()

    def _append(self, stream: str, text: str, size: int) -> None:
        if not text:
            return
        with self._lock:
            self.log_bytes += size
            self._pending.append({"run_id": self.run_id, "attempt": self.attempt, "at": utcnow(), "stream": stream,
                                  "cell_index": self.current_cell, "text": text})
            self._pending_bytes += size

    def flush(self) -> None:
        """Have what is queued (log lines, cells, results) written soon, without waiting for it."""
        self._last_flush = time.monotonic()
        self._kick()

    def _take(self) -> _Batch:
        """Everything queued so far, taken off the queues: written (and retried) as one unit."""
        with self._lock:
            batch = _Batch(self._start, self._new_cells, self._cell_updates, self._results, self._pending,
                           self.log_bytes)
            self._start, self._new_cells, self._cell_updates, self._results = False, [], [], {}
            self._pending, self._pending_bytes = [], 0
        return batch

    def _write_batch_now(self, batch: _Batch) -> None:
        with self.store.write() as session:
            self.write_batch(session, batch)

    def write_pending(self, session: Any) -> None:
        """Write what is queued, in the caller's transaction."""
        self.write_batch(session, self._take())

    def write_batch(self, session: Any, batch: _Batch) -> None:
        """Write ``batch`` in the caller's transaction. Rows are this attempt's (``attempt`` in every key),
        and what is the run's own (its result, its log size) is written only while the run is still in
        this attempt: late writes of an attempt that was reaped and retried never touch the new one."""
        announce_events(session)  # PostgreSQL: the live event streams' watchers read it at once
        if batch.start:
            self._write_start(session)
        # Rows as Core INSERTs, not ORM objects: a fraction of the CPU, on a process whose main thread runs
        # the notebook meanwhile.
        if batch.new_cells:
            session.execute(insert(CellRun), batch.new_cells)
        for index, values in batch.cell_updates:
            self._update_cell(session, index, **values)
        if batch.results:
            run = session.get(Run, self.run_id)
            if run.attempt == self.attempt:
                run.result = {**(run.result or {}), **batch.results}
        if batch.logs:
            session.execute(insert(Log), batch.logs)
            session.execute(update(Run).where(Run.id == self.run_id, Run.attempt == self.attempt)
                            .values(log_bytes=batch.log_bytes))


@dataclass
class _Batch:
    """What a ``RunRecorder`` has queued, taken at once (``_take``)."""

    start: bool
    new_cells: list[dict[str, Any]]
    cell_updates: list[tuple[int, dict[str, Any]]]
    results: dict[str, Any]
    logs: list[dict[str, Any]]
    log_bytes: int

    def any(self) -> bool:
        return bool(self.start or self.new_cells or self.cell_updates or self.results or self.logs)


class LogStream(io.TextIOBase):
    """A file-like object papermill writes a cell's stdout or stderr to."""

    def __init__(self, recorder: RunRecorder, stream: str) -> None:
        self.recorder = recorder
        self.stream = stream

    def write(self, text: str) -> int:
        self.recorder.log(self.stream, text)
        return len(text)

    def writable(self) -> bool:
        return True


class NbflowExecutionManager(NotebookExecutionManager):
    """papermill's execution manager, plus the recorder's hooks.

    papermill saves the output notebook as each cell starts and as it completes. The save at a cell's
    start is skipped when the notebook was saved less than ``START_SAVE_AFTER`` ago (the previous cell's
    completion, a millisecond earlier): it would only mark the cell running, which the run's
    ``cell_run`` rows already show live. Completions, failures and papermill's autosaves still save."""

    START_SAVE_AFTER = timedelta(seconds=1)

    def __init__(self, nb: Any, recorder: RunRecorder | None, **kwargs: Any) -> None:
        self._starting = False
        self._final = False
        super().__init__(nb, **kwargs)
        self.recorder = recorder

    def save(self, **kwargs: Any) -> None:
        if self._final or (self._starting and self.now() - self.last_save_time < self.START_SAVE_AFTER):
            self.last_save_time = self.now()
            return
        if self.recorder:
            self.recorder.redactor.scrub_notebook(self.nb)  # before any write, and before cells are read
        super().save(**kwargs)

    def notebook_complete(self, **kwargs: Any) -> None:
        """papermill's, without its save when execution ended normally: ``papermill.execute_notebook``
        writes the output once more as it returns. An engine leaving with an exception (a dead kernel, a
        stop) skips that write, so then this one saves."""
        self._final = sys.exc_info()[1] is None
        try:
            super().notebook_complete(**kwargs)
        finally:
            self._final = False

    def notebook_start(self, **kwargs: Any) -> None:
        super().notebook_start(**kwargs)
        if self.recorder:
            self.recorder.notebook_start(self.nb)

    def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        self._starting = True
        try:
            super().cell_start(cell, cell_index, **kwargs)
        finally:
            self._starting = False
        if self.recorder and cell_index is not None:
            self.recorder.cell_start(cell_index, cell)

    def cell_complete(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        super().cell_complete(cell, cell_index, **kwargs)
        if self.recorder and cell_index is not None:
            self.recorder.cell_complete(cell_index, cell)


class NbflowEngine(NBClientEngine):
    """papermill's nbclient engine with nbflow's execution manager; takes ``recorder=`` as an engine kwarg."""

    @classmethod
    def execute_notebook(cls, nb: Any, kernel_name: str, output_path: str | None = None,
                         progress_bar: bool = True, log_output: bool = False, autosave_cell_every: int = 30,
                         recorder: RunRecorder | None = None, **kwargs: Any) -> Any:
        if recorder is not None and recorder.input_label:
            # papermill stores its input_path in the output's metadata; given a notebook object (what
            # nbflow passes) it would embed a copy of the whole input and rewrite it at every save.
            nb.metadata.papermill["input_path"] = recorder.input_label
        nb_man = NbflowExecutionManager(nb, recorder, output_path=output_path, progress_bar=progress_bar,
                                        log_output=log_output, autosave_cell_every=autosave_cell_every)
        nb_man.notebook_start()
        try:
            cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
        finally:
            nb_man.cleanup_pbar()
            if recorder is not None:
                recorder.redactor.scrub_notebook(nb_man.nb, drop_markers=True)
            nb_man.notebook_complete()
        return nb_man.nb

    @classmethod
    def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, log_output: bool = False,
                                 stdout_file: Any = None, stderr_file: Any = None, start_timeout: int = 60,
                                 execution_timeout: int | None = None, kc: Any = None, **kwargs: Any) -> Any:
        """papermill's ``NBClientEngine.execute_managed_notebook`` (papermill 2.x, same arguments), except
        that the client gets the kernel's already connected ``kc``: nbclient's constructor resets
        ``kc``, and a client it creates itself waits ~200 ms for IOPub before the first cell."""
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(
            safe_kwargs, timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
            startup_timeout=start_timeout, kernel_name=kernel_name, log=papermill_logger, log_output=log_output,
            stdout_file=stdout_file, stderr_file=stderr_file,
        )
        client = _NbflowNotebookClient(nb_man, **final_kwargs)
        client.kc = kc
        return client.execute()


class _NbflowNotebookClient(PapermillNotebookClient):
    """Shows each kernel message to the run's redactor before it is stored or logged: a secret's marker
    (nbflow.core.secrets) arrives before its value can appear in any later output."""

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        recorder = getattr(self.nb_man, "recorder", None)
        if recorder is not None:
            recorder.redactor.observe(msg)
        return super().process_message(msg, cell, cell_index)


papermill_engines.register(ENGINE_NAME, NbflowEngine)


def _load_attempt(store: Store, run_id: uuid.UUID) -> tuple[Run, FlowVersion, Flow] | None:
    """The run and what it executes, if it is still PENDING. The recorder writes RUNNING (checking again
    that it is still PENDING) while papermill prepares the notebook."""
    def load() -> tuple[Run, FlowVersion, Flow] | None:
        with store.read() as session:
            run = session.get(Run, run_id)
            if run is None or run.state != states.S.PENDING:
                return None  # cancelled (or claimed) before this process got to it
            version = session.get(FlowVersion, run.flow_version_id)
            flow = session.get(Flow, run.flow_id)
            return run, version, flow

    return retrying(load, store, what=f"starting run {run_id}", read_only=True)


def _end_attempt(store: Store, recorder: RunRecorder, error: dict[str, Any] | None, *,
                 name: str | None = None, message: str | None = None) -> str:
    """End the attempt in one transaction, after everything the recorder queued: last logs, skipped
    cells, the failing cell's id, the state. Returns the run's state after it.

    Retried while the database is unavailable: a run that finished during an outage shorter than its
    lease ends as it finished. The end is written only if the run is still in this attempt and live:
    if its lease ran out meanwhile and a reaper ended it (and maybe a retry runs elsewhere), the state
    machine's word stands and this attempt's late end changes nothing of the run."""
    try:
        recorder.close()
    except NotStarted:  # a notebook without cells, cancelled before it started
        return _state_of(store, recorder.run_id)
    batch = recorder._take()

    def end() -> str:
        with store.write() as session:
            run = states.lock_run(session, recorder.run_id)
            if run.attempt != recorder.attempt or run.state not in (states.S.RUNNING, states.S.CANCELLING):
                recorder.write_batch(session, batch)  # this attempt's rows only (see write_batch)
                return run.state
            recorder.notebook_end(session, batch)
            if error is not None and error.get("cell_index") is not None and error.get("cell_id") is None:
                error["cell_id"] = session.execute(
                    select(CellRun.cell_id).where(CellRun.run_id == run.id, CellRun.attempt == recorder.attempt,
                                                  CellRun.cell_index == error["cell_index"])
                ).scalar()
            if error is None:
                states.finish(session, run, message=message)
            else:
                states.fail(session, run, error=error, name=name, message=message)
            return run.state

    return retrying(end, store, what=f"ending run {recorder.run_id}")


def prepare() -> None:
    """Do what every run needs before a run is known: a warm slot's run should not pay for it.
    Only a warm-up: with the database away, the slot stays (its run opens the store again, waiting)."""
    from nbflow.errors import DatabaseError

    try:
        store = open_store()
    except DatabaseError:
        store = None
    if store is not None:
        _compile_statements(store)
    if tracing.enabled():
        tracing.tracer()  # the SDK's imports and the exporters' set-up, before the run too
    # nbformat compiles its JSON-schema validator on first use (~30 ms): not on a run's clock (a no-op in a
    # process forked by the fork server, which did it once: nbflow.execution.forkserver).
    nbformat.reads(nbformat.writes(nbformat.v4.new_notebook()), as_version=4)


def _compile_statements(store: Store) -> None:
    # SQLAlchemy compiles each statement on its first use in a process: compile an attempt's
    # statements now, in a write transaction that changes nothing and is rolled back.
    nobody = uuid.uuid4()
    try:
        with store.write() as session:
            session.execute(select(Run).where(Run.id == nobody).with_for_update()).first()
            session.get(Run, nobody)
            session.get(FlowVersion, 0)
            session.get(Flow, 0)
            cell = (CellRun.run_id == nobody) & (CellRun.attempt == 0) & (CellRun.cell_index == 0)
            session.execute(update(CellRun).where(cell).values(state="RUNNING", started_at=utcnow()))
            session.execute(update(CellRun).where(cell).values(state="COMPLETED", ended_at=utcnow(),
                                                               execution_count=1, error=None))
            session.execute(update(Run).where(Run.id == nobody).values(log_bytes=0))
            # The flush of PENDING -> RUNNING (the run's UPDATE, its event's INSERT) compiled on the newest
            # run, as ``RunRecorder._write_start`` will change it: 5-7 ms off a warm run's first write.
            sample = session.execute(select(Run).order_by(Run.created_at.desc()).limit(1)).scalar()
            if sample is not None:
                now = utcnow()
                sample.state, sample.state_name, sample.started_at = "RUNNING", "Running", now
                sample.process_id, sample.heartbeat_at = os.getpid(), now
                session.add(RunStateEvent(run_id=sample.id, from_state="PENDING", to_state="RUNNING",
                                          to_name="Running", attempt=sample.attempt, at=now, message=None))
                session.flush()
                for _ in range(2):  # one row, then two: the INSERT and the executemany INSERT
                    session.execute(insert(CellRun), [{"run_id": sample.id, "attempt": -1 - _, "cell_index": i,
                                                       "cell_id": None, "state": "PENDING"} for i in range(_ + 1)])
                    session.execute(insert(Log), [{"run_id": sample.id, "attempt": -1, "at": now, "stream": "system",
                                                   "cell_index": None, "text": ""}] * (_ + 1))
            raise _Rollback
    except _Rollback:
        pass
    except Exception as exc:  # only a warm-up: a database away now is waited for by the run's own writes
        if not is_unavailable(exc):
            raise


class _Rollback(Exception):
    """Ends ``prepare``'s transaction without committing it."""


def _open_store() -> Store:
    """The run's store, waiting up to a lease for a database that is away (an attempt started during an
    outage): the worker that claimed the run reached it with the same URL, so a failure here is the
    outage, and its supervisor stops the attempt if it outlasts the lease anyway."""
    from nbflow.errors import DatabaseError

    give_up = time.monotonic() + get_settings().lease_seconds
    backoff = Backoff()
    while True:
        try:
            return open_store()
        except DatabaseError:
            if time.monotonic() >= give_up:
                raise
            time.sleep(backoff.next())


def _state_of(store: Store, run_id: uuid.UUID) -> str:
    def read() -> str:
        with store.read() as session:
            return session.get(Run, run_id).state

    return retrying(read, store, what=f"reading run {run_id}", read_only=True)


def run_attempt(run_id: uuid.UUID, *, kernel: Kernel, progress: Any = False) -> str:
    """Execute one attempt of a PENDING run with ``kernel`` (started, maybe not yet ready); returns
    the state the attempt left it in."""
    store = _open_store()
    loaded = _load_attempt(store, run_id)
    if loaded is None:
        return _state_of(store, run_id)
    run, version, flow = loaded
    recorder = RunRecorder(store, run_id, run.attempt, run.log_bytes, get_settings().log_limit_bytes)
    recorder.trace = tracing.AttemptTrace.start(run_id=str(run_id), flow=flow.name, version=version.version,
                                                attempt=run.attempt, trigger=run.trigger)
    if recorder.trace is None:  # tracing off: nothing else to do
        return _execute(store, recorder, run, version, flow, kernel, progress)
    state = "STOPPED"  # the supervisor stopped the attempt (cancel, timeout, shutdown): it writes the state
    try:
        state = _execute(store, recorder, run, version, flow, kernel, progress)
    finally:
        recorder.trace.end(state, recorder.failed_cell[2] if recorder.failed_cell else None)
    return state


def _execute(store: Store, recorder: RunRecorder, run: Run, version: FlowVersion, flow: Flow, kernel: Kernel,
             progress: Any) -> str:
    """``run_attempt``'s work once the run is loaded: apart, so that tracing wraps it when on and costs
    nothing when off."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill import execute_notebook
    from papermill.exceptions import PapermillExecutionError

    run_id = recorder.run_id
    recorder.start()
    recorder.log("system", f"attempt {run.attempt} of {run.max_attempts}: flow {flow.name} v{version.version}, "
                           f"kernel {run.kernel_name} ({'warm' if kernel.warm else 'cold'}), pid {os.getpid()}",
                 force=True, flush=False)
    if not version.has_parameters_cell and run.parameters:
        recorder.log("system", "the notebook has no cell tagged 'parameters': papermill injects the parameters "
                               "in a new cell at the top", force=True, flush=False)
    recorder.input_label = f"{flow.source_path or flow.name} (nbflow flow {flow.name} v{version.version})"
    nb = nbformat.reads(version.source, as_version=4)
    output = Path(run.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    cwd = containment.working_directory(flow.source_path, run.output_path)
    error: dict[str, Any] | None = None
    name: str | None = None
    try:
        kernel.ready()
        kernel.chdir(cwd)
        if recorder.trace is not None:  # the notebook's own spans join the attempt's trace
            kernel.set_env(tracing.carrier(recorder.trace.span))
        execute_notebook(
            nb, str(output), parameters=run.parameters, engine_name=ENGINE_NAME, kernel_name=run.kernel_name,
            progress_bar=progress, cwd=str(cwd), stdout_file=LogStream(recorder, "stdout"),
            stderr_file=LogStream(recorder, "stderr"),
            execution_timeout=math.ceil(run.cell_timeout) if run.cell_timeout else None,  # nbclient: whole seconds
            km=kernel.km, kc=kernel.kc, recorder=recorder,
        )
    except NotStarted:  # nothing executed, nothing else to write (the writer stopped at the error)
        return _state_of(store, run_id)
    except PapermillExecutionError as exc:
        error = {"ename": exc.ename, "evalue": exc.evalue, "traceback": list(exc.traceback),
                 "cell_index": recorder.failed_cell[0] if recorder.failed_cell else exc.cell_index,
                 "cell_id": recorder.failed_cell[1] if recorder.failed_cell else None}
    except CellTimeoutError as exc:
        name = "TimedOut"
        index = recorder.failed_cell[0] if recorder.failed_cell else None
        error = {"ename": "CellTimeoutError", "traceback": [str(exc)], "cell_index": index, "cell_id": None,
                 "evalue": f"cell {index} ran longer than the cell timeout of {run.cell_timeout:g}s"}
    except DeadKernelError as exc:
        error = {"ename": "DeadKernelError", "evalue": f"the kernel died: {exc}", "traceback": [],
                 "cell_index": recorder.failed_cell[0] if recorder.failed_cell else None, "cell_id": None}
        if (limit := containment.kernel_oom_limit()) is not None:  # killed over its flow's memory limit
            name = "OutOfMemory"
            error.update(ename=name, evalue=containment.oom_message(limit))
    except Exception as exc:
        error = {"ename": type(exc).__name__, "evalue": str(exc),
                 "traceback": traceback.format_exception(exc),
                 "cell_index": recorder.failed_cell[0] if recorder.failed_cell else None, "cell_id": None}
    except BaseException:
        with contextlib.suppress(Exception):
            recorder.close(timeout=STOP_FLUSH_SECONDS)
        raise  # stopped by the supervisor: it writes the state and settles the cells
    message = None
    if error:
        error = recorder.redactor.redact_value(error)
        message = f"{error['ename']}: {error['evalue']}"[:500]
        recorder.log("system", f"attempt {run.attempt} failed: {message}", force=True, flush=False)
    elif recorder.clean_exit:
        message = "the notebook called sys.exit(0)"
    return _end_attempt(store, recorder, error, name=name, message=message)
