"""The run service: create runs (after every check has passed), find them, and describe them.

``run_document`` is the one JSON shape of a run, shared by the CLI and (later) the REST API, so scripts
and agents see the same document everywhere. docs/run-json.md describes it.
"""

from __future__ import annotations

import base64
import binascii
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import String, and_, bindparam, cast, or_, select
from sqlalchemy.orm import Session, defer

from nbflow import checks
from nbflow.checks import MAX_NAME_LENGTH, text_problem
from nbflow.core import states
from nbflow.core.flows import (
    NotebookSource,
    flow_by_path,
    flow_for_path,
    get_flow,
    inspect_parameters,
    latest_version,
    parse_notebook,
    read_notebook_cached,
    resolve_kernel,
    sync_version,
)
from nbflow.core.parameters import validate
from nbflow.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidFlowName,
    InvalidQuery,
    NbflowError,
    ParameterError,
    RunNotFound,
)
from nbflow.settings import get_settings
from nbflow.store import Store, wake_runners
from nbflow.store.models import CellRun, Flow, FlowVersion, Log, Run, RunStateEvent, utcnow


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def looks_like_path(target: str) -> bool:
    """Whether the local CLI's ``nbflow run TARGET`` / ``nbflow trigger TARGET`` means a notebook file.

    Only ever consulted where the caller said a path is allowed (``create_run(..., allow_path=True)``):
    the command line of the user's own machine. Over HTTP a flow is a name and nothing else, whatever it
    looks like (``report.ipynb`` is a valid flow name). ``os.path.isfile`` answers False, never raises,
    for a name the file system refuses (too long, a NUL).
    """
    return target.endswith(".ipynb") or "/" in target or os.path.isfile(target)


def check_flow_reference(target: str) -> str:
    """``target`` if it can be a flow's name, else ``InvalidFlowName`` (422): text longer than any flow
    name (``nbflow.checks.MAX_NAME_LENGTH``), or that no database can hold (NUL, a lone surrogate). Any
    other unknown name is simply not found (404), whatever it looks like."""
    problem = text_problem(target, max_length=MAX_NAME_LENGTH) if isinstance(target, str) else "is not text"
    if problem is not None:
        shown = target[:40] + "..." if isinstance(target, str) and len(target) > 40 else target
        raise InvalidFlowName(f"invalid flow name {shown!r}: it {problem}; a flow name is at most "
                              f"{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'")
    return target


def create_run(
    store: Store, target: str, parameters: dict[str, Any] | None = None, *,
    kernel: str | None = None, trigger: str = "manual", state: states.StateType = states.S.PENDING,
    worker_id: str | None = None, parent_run_id: uuid.UUID | None = None, idempotency_key: str | None = None,
    allow_path: bool = False,
) -> Run:
    """Validate everything, then insert the run in one transaction.

    ``target`` is a registered flow's name. Only with ``allow_path=True`` (the local CLI's ``nbflow run
    PATH``, on the user's own machine) may it be a notebook file, registered on the fly; no HTTP door
    passes it, so no remote caller can make the server read or run a file by naming it.
    A rejected request writes nothing: no run, and no flow or version either (a first ``nbflow run`` of
    a notebook registers it, but only once the request has passed every check).
    ``worker_id`` claims the run at birth (``nbflow run`` executes it itself); without it the run is
    queued for any worker. A taken ``idempotency_key`` raises ``IntegrityError`` (see ``create_runs_once``).
    """
    found = _look_up(store, target, kernel, allow_path=allow_path)
    values = _checked_values(store, found, parameters or {})
    flow, version = _registered(store, target, found, kernel)
    with store.write() as session:
        run = new_run(flow, version, values, found.kernel_name, trigger=trigger, worker_id=worker_id,
                      heartbeat_at=utcnow() if worker_id else None, parent_run_id=parent_run_id,
                      idempotency_key=idempotency_key)
        states.initial_state(session, run, state)
    return run


def _run_by_key(store: Store, key: str, flow_name: str, parameters: dict[str, Any]) -> Run | None:
    with store.read() as session:
        run = session.execute(select(Run).where(Run.idempotency_key == key)).scalar_one_or_none()
        if run is None:
            return None
        flow = session.get(Flow, run.flow_id)
        version = session.get(FlowVersion, run.flow_version_id)
        assert flow is not None and version is not None
        if flow.name != flow_name:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for run {run.id} of flow {flow.name!r}, not {flow_name!r}")
        try:  # compare as the first request's values were stored: converted to the parameters' types
            same = validate(version.parameters, parameters,
                            has_parameters_cell=version.has_parameters_cell) == run.parameters
        except ParameterError:
            same = False
        if not same:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for run {run.id} with other parameters "
                f"({run.parameters}); use a new key for a different request")
        return run

def retry_run(store: Store, run_id: str | uuid.UUID) -> Run:
    """Run an ended run again, as a new run: terminal states are final, so a retry never rewrites history.

    The new run uses the flow's current version (a user retries after fixing the notebook) with the old
    run's parameters, checked again against the current parameter spec, and points back at the old run
    (``parent_run_id``, trigger ``retry``). A run that has not ended is refused: cancel it first.
    """
    with store.read() as session:
        old = find_run(session, run_id)
        state = states.StateType(old.state)
        flow = session.get(Flow, old.flow_id)
        assert flow is not None
        flow_name, parameters, parent = flow.name, dict(old.parameters or {}), old.id
    if state not in states.TERMINAL:
        raise IllegalTransition(f"run {parent} has not ended ({state}); only an ended run can be retried")
    return create_run(store, flow_name, parameters, trigger="retry", parent_run_id=parent)


def new_run(flow: Flow, version: FlowVersion, parameters: dict[str, Any], kernel_name: str, *,
            trigger: str, **fields: Any) -> Run:
    """A run of ``version`` with the flow's retry and timeout settings, not yet added to a session."""
    return Run(**new_run_values(flow, version, parameters, kernel_name, trigger=trigger, **fields))


def new_run_values(flow: Flow, version: FlowVersion, parameters: dict[str, Any], kernel_name: str, *,
                   trigger: str, runs_dir: Path | None = None, **fields: Any) -> dict[str, Any]:
    """``new_run``'s columns, for a Core INSERT of many runs (``create_runs_once``), where building an ORM
    object per run cost more than its insert. ``runs_dir``: the settings' (resolved once by a caller
    creating many runs, as it costs two ``realpath`` calls)."""
    run_id = uuid.uuid4()
    runs_dir = runs_dir or get_settings().runs_dir
    return dict(
        id=run_id, flow_id=flow.id, flow_version_id=version.id, parameters=dict(parameters),
        kernel_name=kernel_name, attempt=1, max_attempts=flow.retries + 1, retry_delay=flow.retry_delay,
        retry_backoff=flow.retry_backoff, timeout=flow.timeout, cell_timeout=flow.cell_timeout,
        trigger=trigger, output_path=f"{runs_dir / flow.name}{os.sep}{run_id}.ipynb", result={}, **fields,
    )


@dataclass
class _Target:
    """What ``_look_up`` found for a run request, before its parameters: the notebook that will run
    (``from_file``: read from its file, else the stored snapshot of a flow whose file is gone), its
    kernel, its parameter spec, and the flow and version to run when the flow's newest version is exactly
    that notebook (else ``version`` is None: the flow must be registered or versioned first).
    ``by_path``: the request named a notebook file (allowed by its caller), not a flow."""

    source: NotebookSource
    from_file: bool
    kernel_name: str
    spec: dict[str, Any]
    has_parameters_cell: bool
    flow: Flow | None
    version: FlowVersion | None
    by_path: bool = False


def _look_up(store: Store, target: str, kernel: str | None, *, allow_path: bool = False) -> _Target:
    """Every check ``create_run`` needs on what would run, before anything is written.

    A flow by name unless the caller allows a path (see ``create_run``); the decision is made here,
    once, and ``_registered`` follows it.

    The common case (a registered flow whose notebook has not changed) costs one read transaction and a
    ``stat`` of the notebook (``read_notebook_cached``): the parameter spec is the one stored with the
    version, not inspected again.
    """
    from_file = True
    version: FlowVersion | None = None
    by_path = allow_path and looks_like_path(target)
    if by_path:
        source = read_notebook_cached(target)
        with store.read() as session:
            flow = flow_by_path(session, source.path)
            version = latest_version(session, flow.id) if flow is not None else None
    else:
        check_flow_reference(target)
        with store.read() as session:
            flow = get_flow(session, target)
            path = Path(flow.source_path) if flow.source_path else None
            version = latest_version(session, flow.id)
        if path is not None and path.is_file():
            source = read_notebook_cached(path)
        elif version is not None:
            source, from_file = parse_notebook(version.source, path or Path(flow.name)), False
        else:
            raise NbflowError(f"flow {target!r} has no stored version and its notebook {path} is missing")
    kernel_name = resolve_kernel(source, kernel or (flow.kernel_name if flow else None))
    if version is not None and kernel is None and version.content_hash == source.content_hash:
        spec, has_cell = version.parameters, version.has_parameters_cell
    else:  # a new or changed notebook (or another kernel's language): inspect it
        spec, has_cell, version = *inspect_parameters(source, kernel_name), None
    return _Target(source, from_file, kernel_name, spec, has_cell, flow if version is not None else None, version,
                   by_path)


def _checked_values(store: Store, found: _Target, parameters: dict[str, Any]) -> dict[str, Any]:
    """A request's parameters converted to the spec's types; refused if invalid or if one holds a secret."""
    values = validate(found.spec, parameters, has_parameters_cell=found.has_parameters_cell)
    from nbflow.core.secrets import check_parameters  # parameters are stored in clear: never a secret's value

    check_parameters(store, values)
    return values


def _registered(store: Store, target: str, found: _Target, kernel: str | None) -> tuple[Flow, FlowVersion]:
    """The flow and version a checked request runs: registered, or versioned, first if it must be."""
    if found.flow is not None and found.version is not None:
        return found.flow, found.version
    if found.by_path:  # a new flow, or its notebook changed: register or version it first
        return flow_for_path(store, found.source, kernel)
    return sync_version(store, target, found.source if found.from_file else None, kernel_override=kernel)


@dataclass
class RunRequest:
    """One request to run a flow by name, as ``create_runs_once`` takes it."""

    flow: str
    parameters: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    trigger: str = "api"


@dataclass
class Triggered:
    """A request's answer from ``create_runs_once``: its run, and whether it was created now (else an
    earlier request with its idempotency key created it). A created run is its columns as attributes (what
    ``new_run_document`` reads), with its flow and version (the document needs no query); a found one is
    the stored ``Run``."""

    run: Any
    created: bool
    flow: Flow | None = None
    version: FlowVersion | None = None


_KEY_TAKEN = object()  # an insert refused by a UNIQUE key (the idempotency key): resolved after the commit
# The columns of a run document that a new run's values leave out (``_document`` reads them).
_UNSET = {"state_message": None, "parent_run_id": None, "started_at": None, "ended_at": None, "error": None}


def create_runs_once(store: Store, requests: Sequence[RunRequest]) -> list[Triggered | Exception]:
    """``create_run`` of flows by name for callers that may send the same request twice (API clients
    retrying after a timeout), many requests at once, committed as ONE write transaction (group commit):
    the API server queues concurrent triggers and creates them here, so N requests cost one commit (and
    one look-up of each flow) instead of N serialised on the database's write lock.

    Each request gets its own answer, in order: a ``Triggered``, or the exception that request alone
    met (a bad parameter, an unknown flow, an idempotency conflict); one request's failure never fails
    another's. The runs have ``new_run``'s columns and ``states.initial_values``' first state, as
    ``create_run`` gives them. A request carrying an idempotency key already used returns that key's run
    and creates nothing. The UNIQUE column decides, not a prior read, so concurrent requests with one key
    create one run on either database (a key taken meanwhile, by another process or by an earlier request
    of the same batch, is resolved after the commit); the prior read only spares the common repeat a
    notebook inspection. Reusing a key for another flow or other parameters is a client bug, refused
    (``IdempotencyConflict``) rather than answered with a run that is not what was asked for. An error
    reaching the database itself (it is down) is raised for the whole batch.
    """
    from sqlalchemy.exc import DataError, IntegrityError

    results: list[Any] = [None] * len(requests)
    keys = {r.idempotency_key for r in requests if r.idempotency_key is not None}
    if keys:  # one query for every key of the batch; only a repeated key costs a look at its run
        with store.read() as session:
            taken = set(session.execute(select(Run.idempotency_key).where(Run.idempotency_key.in_(keys))).scalars())
        for i, request in enumerate(requests):
            if request.idempotency_key in taken:
                results[i] = _existing_run(store, request)
    # Each flow is looked up (its notebook stat-ed) once per batch, and versioned at most once, only if
    # one of its requests is valid: a rejected request writes nothing, as with create_run. By name only:
    # this is the API's door, and a name never means a file here (no ``allow_path``).
    targets: dict[str, _Target | Exception] = {}
    checked: list[tuple[int, dict[str, Any]]] = []
    for i, request in enumerate(requests):
        if results[i] is not None:
            continue
        if request.flow not in targets:
            targets[request.flow] = _attempt(_look_up, store, request.flow, None)
        found = targets[request.flow]
        results[i] = found if isinstance(found, Exception) else _attempt(
            _checked_values, store, found, request.parameters)
        if not isinstance(results[i], Exception):
            checked.append((i, results[i]))
            results[i] = None
    ready: dict[str, tuple[Flow, FlowVersion] | Exception] = {}
    for i, _values in checked:
        name = requests[i].flow
        if name not in ready:
            found = targets[name]
            assert isinstance(found, _Target)
            ready[name] = _attempt(_registered, store, name, found, None)
        if isinstance(ready[name], Exception):
            results[i] = ready[name]

    runs_dir = get_settings().runs_dir

    def build(i: int, values: dict[str, Any]) -> dict[str, Any]:
        flow, version = ready[requests[i].flow]  # type: ignore[misc]
        found = targets[requests[i].flow]
        assert isinstance(found, _Target)
        return new_run_values(flow, version, values, found.kernel_name, trigger=requests[i].trigger,
                              runs_dir=runs_dir, idempotency_key=requests[i].idempotency_key)

    todo = [(i, values) for i, values in checked if results[i] is None]
    built: list[tuple[int, Any]] = []
    try:  # the common case: Core statements for the whole batch, not an ORM flush of each run
        stamp, initial = utcnow(), states.initial_values()
        rows = [(i, {**build(i, values), "created_at": stamp, **initial}) for i, values in todo]
        with store.write() as session:
            created: set[uuid.UUID] = set()
            if rows:
                conn = session.connection()
                # A key taken (by another process, or earlier in this batch) inserts nothing: resolved below.
                conn.execute(insert_runs_skipping_conflicts(store.dialect), [row for _i, row in rows])
                created = set(conn.execute(states.insert_initial_events([row["id"] for _i, row in rows])).scalars())
            if created:
                wake_runners(session)
        for i, row in rows:
            if row["id"] in created:
                built.append((i, SimpleNamespace(**{**_UNSET, **row})))
            else:
                results[i] = _KEY_TAKEN
    except (IntegrityError, DataError):  # a row it refers to is gone, or a value the database refuses: again,
        built = []                        # each run in a SAVEPOINT, so that only its own request fails
        with store.write() as session:
            for i, values in todo:
                run = Run(**build(i, values))
                try:
                    if insert_unique_run(session, run):
                        built.append((i, run))
                    else:
                        results[i] = _KEY_TAKEN
                except DataError as exc:
                    results[i] = exc
    for i, run in built:
        flow, version = ready[requests[i].flow]  # type: ignore[misc]
        results[i] = Triggered(run, True, flow, version)
    for i, request in enumerate(requests):
        if results[i] is _KEY_TAKEN:  # the key's run, now committed by whoever won (None: a key-less clash)
            existing = _existing_run(store, request) if request.idempotency_key else None
            results[i] = existing or NbflowError(f"the run of flow {request.flow!r} could not be stored: "
                                                 "a row it refers to changed meanwhile; try again")
    return results


def insert_runs_skipping_conflicts(dialect: str, *unique: str) -> Any:
    """``INSERT INTO run ... ON CONFLICT [(unique)] DO NOTHING``: a run whose unique key (an idempotency
    key, a schedule slot) is taken already inserts nothing, and the rest of the transaction goes on. Give
    its first state event with ``states.insert_initial_events``, which also tells which runs were inserted."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(Run.__table__).on_conflict_do_nothing(index_elements=list(unique) or None)


def _attempt(call: Any, *args: Any) -> Any:
    """``call(*args)``, or the exception it raised: one request's failure is its answer, not the batch's."""
    try:
        return call(*args)
    except Exception as exc:
        return exc


def _existing_run(store: Store, request: RunRequest) -> Triggered | Exception | None:
    """The run an earlier request with this key created (None if there is none), or the conflict if
    this request differs from that one."""
    assert request.idempotency_key is not None
    found = _attempt(_run_by_key, store, request.idempotency_key, request.flow, request.parameters)
    return Triggered(found, False) if isinstance(found, Run) else found


def request_cancel(store: Store, run_id: str | uuid.UUID) -> Run:
    """Cancel a run. One nobody holds yet ends CANCELLED at once; one a process holds turns CANCELLING,
    and the process supervising it stops it (interrupt, then kill) and ends it CANCELLED."""
    with store.write() as session:
        run = states.lock_run(session, find_run(session, run_id).id)
        state = states.StateType(run.state)
        if state in states.TERMINAL:
            raise IllegalTransition(f"run {run.id} has already ended ({state}); there is nothing to cancel")
        if state is states.S.SCHEDULED or (state is states.S.PENDING and run.worker_id is None):
            states.transition(session, run, states.S.CANCELLED, message="cancelled before it started")
        elif state is not states.S.CANCELLING:
            states.transition(session, run, states.S.CANCELLING, message="cancel requested")
        return run


def find_run(session: Session, run_id: str | uuid.UUID) -> Run:
    """A run by id, or by a unique prefix of its id (as ``git`` accepts short hashes)."""
    text = str(run_id).strip().lower()
    try:
        full = uuid.UUID(text)
    except ValueError:
        full = None
    if full is not None:
        run = session.get(Run, full)
        if run is None:
            raise RunNotFound(f"no run with id {text}")
        return run
    if len(text) < 4 or any(c not in "0123456789abcdef-" for c in text):
        raise RunNotFound(f"{run_id!r} is not a run id (give the full UUID or at least 4 of its first characters)")
    # UUIDs are stored as 32 hex digits on SQLite and natively on PostgreSQL: compare their text forms.
    col = cast(Run.id, String)
    prefix = text.replace("-", "") if store_dialect(session) == "sqlite" else text
    matches = session.execute(select(Run).where(col.like(f"{prefix}%")).limit(2)).scalars().all()
    if not matches:
        raise RunNotFound(f"no run with id starting {text!r}")
    if len(matches) > 1:
        raise RunNotFound(f"run id prefix {text!r} is ambiguous; give more characters")
    return matches[0]


def store_dialect(session: Session) -> str:
    bind = session.get_bind()
    return bind.dialect.name


def cells_of(session: Session, run: Run) -> list[CellRun]:
    return list(session.execute(
        select(CellRun).where(CellRun.run_id == run.id, CellRun.attempt == run.attempt)
        .order_by(CellRun.cell_index)
    ).scalars())


def cell_document(cell: Any) -> dict[str, Any]:
    """A cell's part of a run document; ``cell`` is a ``CellRun`` or a row with its columns."""
    return {
        "index": cell.cell_index, "cell_id": cell.cell_id, "state": cell.state,
        "started_at": _iso(cell.started_at), "ended_at": _iso(cell.ended_at),
        "duration": _duration(cell.started_at, cell.ended_at), "execution_count": cell.execution_count,
    }


def run_document(session: Session, run: Run, *, cells: bool = True) -> dict[str, Any]:
    flow, version = _flow_and_version(session, run)
    return _document(run, flow.name if flow else None, version.version if version else None,
                     [cell_document(c) for c in cells_of(session, run)] if cells else None)


def _flow_and_version(session: Session, run: Run) -> tuple[Flow | None, FlowVersion | None]:
    """A run's flow and version: from the session's identity map when a page of runs has loaded them
    already, else both in one query (a single run's read is the API's most frequent request)."""
    from sqlalchemy.orm.util import identity_key

    flow = session.identity_map.get(identity_key(Flow, run.flow_id))
    version = session.identity_map.get(identity_key(FlowVersion, run.flow_version_id))
    if flow is None or version is None:
        row = session.execute(select(Flow, FlowVersion).join(FlowVersion, FlowVersion.flow_id == Flow.id).where(
            Flow.id == run.flow_id, FlowVersion.id == run.flow_version_id
        ).options(defer(FlowVersion.source))).first()  # the notebook itself: not in a run's document
        if row is not None:
            flow, version = row
        else:  # a run always has both; stay correct if a row is gone
            flow, version = session.get(Flow, run.flow_id), session.get(FlowVersion, run.flow_version_id)
    return flow, version  # type: ignore[return-value]


def new_run_document(run: Run, flow: Flow, version: FlowVersion) -> dict[str, Any]:
    """``run_document`` of a run just created (``create_runs_once``), without a query: it has no cells yet,
    and its flow and version are at hand."""
    return _document(run, flow.name, version.version, [])


def _document(run: Any, flow_name: str | None, version: int | None,
              cells: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The run document; ``run`` is a ``Run`` or a row with the columns of ``_DETAIL``."""
    error = None
    if run.error:
        error = {k: run.error.get(k) for k in ("ename", "evalue", "cell_index", "cell_id", "traceback")}
    doc: dict[str, Any] = {
        "id": str(run.id),
        "flow": flow_name,
        "flow_version": version,
        "state": run.state,
        "state_name": run.state_name,
        "state_message": run.state_message,
        "parameters": run.parameters,
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "trigger": run.trigger,
        "parent_run_id": str(run.parent_run_id) if run.parent_run_id else None,
        "kernel_name": run.kernel_name,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "ended_at": _iso(run.ended_at),
        "duration": _duration(run.started_at, run.ended_at),
        "output_path": run.output_path,
        "error": error,
        "result": run.result or {},
    }
    if cells is not None:
        doc["cells"] = cells
    # A row stored before text was checked at the edge (a lone surrogate in a parameter, or in what a kernel
    # reported) must not break every listing that includes it: such text is shown escaped.
    return checks.printable(doc)


def history(session: Session, run: Run) -> list[dict[str, Any]]:
    return [_event_document(e) for e in session.execute(_HISTORY, {"run_id": run.id})]


def _event_document(event: Any) -> dict[str, Any]:
    return {"from": event.from_state, "to": event.to_state, "name": event.to_name, "attempt": event.attempt,
            "at": _iso(event.at), "message": event.message}


_HISTORY = (select(RunStateEvent.from_state, RunStateEvent.to_state, RunStateEvent.to_name, RunStateEvent.attempt,
                   RunStateEvent.at, RunStateEvent.message)
            .where(RunStateEvent.run_id == bindparam("run_id")).order_by(RunStateEvent.id))
_DETAIL = (select(Run.id, Run.state, Run.state_name, Run.state_message, Run.parameters, Run.attempt,
                  Run.max_attempts, Run.trigger, Run.parent_run_id, Run.kernel_name, Run.created_at, Run.started_at,
                  Run.ended_at, Run.output_path, Run.error, Run.result,
                  Flow.name.label("flow_name"), FlowVersion.version.label("version_number"))
           .outerjoin(Flow, Flow.id == Run.flow_id).outerjoin(FlowVersion, FlowVersion.id == Run.flow_version_id)
           .where(Run.id == bindparam("run_id")))
_CELLS = (select(CellRun.cell_index, CellRun.cell_id, CellRun.state, CellRun.started_at, CellRun.ended_at,
                 CellRun.execution_count)
          .where(CellRun.run_id == bindparam("run_id"), CellRun.attempt == bindparam("attempt"))
          .order_by(CellRun.cell_index))


def run_detail(store: Store, run_id: str | uuid.UUID) -> dict[str, Any]:
    """``run_document`` with its ``history``: what ``GET /api/runs/{id}`` answers.

    It is the API's most frequent read (clients poll a run until it ends), so it is three Core statements
    in one read transaction, rows instead of ORM objects: ~0.15 ms where ``run_document`` and ``history``
    on a session took ~0.6.
    """
    try:
        full = uuid.UUID(str(run_id).strip())
    except ValueError:  # a prefix of an id: resolved as everywhere else
        with store.read() as session:
            full = find_run(session, run_id).id
    with store.engine.connect() as conn:
        row = conn.execute(_DETAIL, {"run_id": full}).first()
        if row is None:
            raise RunNotFound(f"no run with id {full}")
        cells = [cell_document(c) for c in conn.execute(_CELLS, {"run_id": full, "attempt": row.attempt})]
        events = [_event_document(e) for e in conn.execute(_HISTORY, {"run_id": full})]
    return {**_document(row, row.flow_name, row.version_number, cells), "history": checks.printable(events)}


def logs(session: Session, run: Run, *, limit: int | None = None,
         after: int | datetime | None = None) -> list[dict[str, Any]]:
    """The run's log lines, oldest first: the last ``limit`` of them, or (tailing) the first ``limit``
    after ``after``, a line's ``id`` (ids only grow) or a time. Both are bounded (``nbflow.checks``):
    an id past a 64-bit column would fail in the database, not answer "no lines"."""
    if limit is not None:
        checks.number(limit, field="limit", error=InvalidQuery, minimum=1, maximum=checks.MAX_LIMIT, integer=True)
    if isinstance(after, int | float) and not isinstance(after, bool):
        after = checks.number(after, field="after", error=InvalidQuery, minimum=0, maximum=checks.MAX_OFFSET,
                              integer=True)
        if after >= 2**31 - 1 and store_dialect(session) == "postgresql":
            return []  # past what the log's 32-bit id column can hold there: no line is later
    query = select(Log).where(Log.run_id == run.id)
    if after is not None:
        query = query.where(Log.id > after if isinstance(after, int) else Log.at > after)
    tail = bool(limit) and after is None
    query = query.order_by(Log.id.desc() if tail else Log.id)
    if limit:
        query = query.limit(limit)
    rows = list(session.execute(query).scalars())
    if tail:
        rows.reverse()
    return checks.printable([{"id": r.id, "at": _iso(r.at), "stream": r.stream, "attempt": r.attempt,
                              "cell_index": r.cell_index, "text": r.text} for r in rows])


def list_runs(session: Session, *, flow: str | None = None, state: str | None = None,
              limit: int = 20, cursor: str | None = None, created_after: datetime | None = None,
              created_before: datetime | None = None) -> list[Run]:
    """Runs newest first, in the total order (created_at, id): a page starting after ``cursor`` (see
    ``run_cursor``) neither repeats nor skips a run, however many runs are created meanwhile (they are
    newer than any cursor, so they land before the first page)."""
    checks.number(limit, field="limit", error=InvalidQuery, minimum=1, maximum=checks.MAX_LIMIT + 1, integer=True)
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    if flow:
        query = query.where(Run.flow_id == get_flow(session, flow).id)
    if state:
        name = state.upper()
        if name not in states.StateType.__members__:
            raise InvalidQuery(f"unknown state {state!r}; states: {', '.join(states.StateType)}")
        query = query.where(Run.state == name)
    if created_after is not None:
        query = query.where(Run.created_at >= created_after)
    if created_before is not None:
        query = query.where(Run.created_at < created_before)
    if cursor is not None:
        at, run_id = _decode_cursor(cursor)
        query = query.where(or_(Run.created_at < at, and_(Run.created_at == at, Run.id < run_id)))
    return list(session.execute(query).scalars())


def run_cursor(run: Run) -> str:
    """The opaque cursor of the page after ``run``: its place in the order, not an offset."""
    raw = f"{run.created_at.isoformat()}|{run.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, run_id = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, uuid.UUID(run_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidQuery(f"invalid cursor {cursor!r}: pass the next_cursor of a previous page unchanged") from None


def parse_cli_parameters(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in pairs:
        if name in values:
            raise ParameterError(f"parameter {name!r} given twice")
        values[name] = value
    return values


def create_schedule_run(
    session: Session, flow: Flow, version: FlowVersion, *, schedule_id: int, scheduled_for: datetime,
    parameters: dict[str, Any], late: bool, now: datetime,
) -> Run | None:
    """Insert the run of one schedule slot, in the caller's transaction; None if that slot has a run.

    The run is built as ``create_run`` builds one (the flow's retries and timeouts, its kernel, the output
    path). The insert happens in a SAVEPOINT: the UNIQUE (schedule_id, scheduled_for) slot key makes a
    second insert for the same slot, by whichever scheduler, fail there and be dropped, leaving the
    caller's transaction usable. An on-time run is queued PENDING; a late one (a catch-up after downtime)
    is SCHEDULED/Late, due now, and the runner's claim makes it PENDING.
    """
    run = new_run(flow, version, parameters, stored_kernel(flow, version), trigger="schedule",
                  schedule_id=schedule_id, scheduled_for=scheduled_for,
                  expected_start_at=now if late else scheduled_for)
    message = f"scheduled for {scheduled_for.isoformat()}"
    state, name = (states.S.SCHEDULED, "Late") if late else (states.S.PENDING, None)
    # None: the slot already has its run (another scheduler fired it).
    return run if insert_unique_run(session, run, state, name=name, message=message) else None


def stored_kernel(flow: Flow, version: FlowVersion) -> str:
    """The kernel of a run nobody asked for by hand (a schedule slot, an event): the flow's, else the
    stored notebook's kernelspec, else ``python3``. Not checked against the installed kernels here: the
    process creating the run may not be the one executing it, and a missing kernel fails the run clearly."""
    kernel_name = flow.kernel_name
    if not kernel_name:
        try:
            kernel_name = parse_notebook(version.source, Path(flow.source_path or flow.name)).kernel_name
        except NbflowError:
            kernel_name = None
    return kernel_name or "python3"


def insert_unique_run(
    session: Session, run: Run, state: states.StateType = states.S.PENDING, *, name: str | None = None,
    message: str | None = None, rows: tuple[Any, ...] = (),
) -> bool:
    """Insert a new ``run`` (and ``rows`` that belong with it, added after it) in a SAVEPOINT of the
    caller's transaction; False, with nothing inserted, if a UNIQUE key says it exists already.

    This is how every automatic run stays exactly-once whoever races to create it: the key (a schedule
    slot, an idempotency key, a file already seen) is checked by the database, not by a prior read, and
    the loser's failed insert is dropped without spoiling the rest of its transaction.
    """
    from sqlalchemy.exc import IntegrityError

    try:
        with session.begin_nested():
            states.initial_state(session, run, state, name=name, message=message)
            if rows:
                session.add_all(rows)
                session.flush()
    except IntegrityError:
        return False
    return True
