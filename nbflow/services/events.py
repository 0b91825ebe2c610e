"""Event triggers: runs created because something happened, not because a clock said so.

Two kinds of event, both fired by ``fire_events``, one pass that every scheduler (``nbflow scheduler``,
``nbflow serve``) calls at each tick next to ``fire_due``. No scheduler running, no events fired; when one
starts again it fires what it finds (nothing is kept in memory, so a restart loses nothing).

**Pipelines** (``nbflow register B.ipynb --after A``, a ``flow_dependency`` row): each run of the
upstream flow A that *ends* makes one run of B.

- ``on="completed"`` (default) fires on COMPLETED only; ``on="any"`` on every end: COMPLETED, FAILED,
  CANCELLED or CRASHED. A FAILED or CRASHED attempt with retries left moves on to SCHEDULED in the same
  transaction that failed it, so a run seen in a terminal state is final: B runs once, after the last
  attempt of A.
- Only runs that end after the dependency was made (``ended_at >= created_at``) fire: adding ``--after``
  never starts B for A's history. Changing ``on`` counts as making the dependency anew.
- The upstream run's recorded results (``nbflow.record(name, value)``) become B's parameters when B's
  latest version declares a parameter of the same name. Each value goes through ``parameters.validate``;
  one that does not fit (``"abc"`` for an ``int``) is left out with a warning in the scheduler's log and B
  runs with its default for it: a type mismatch should not silently stop a pipeline. A notebook without
  a ``parameters`` cell declares nothing, so it receives nothing.
- Several upstreams (``--after A --after B``) mean "after each": every ending run of A and every ending
  run of B makes a run of the downstream flow. There is no join ("after both") yet.
- Exactly once: the downstream run carries ``idempotency_key = "after:<upstream run id>:<flow id>"``
  (UNIQUE) and ``parent_run_id`` = the upstream run; it is inserted in a SAVEPOINT, so schedulers racing
  for the same upstream run create one run between them. A chain A -> B -> C triggered once runs each
  flow once. A flow cannot run after itself, and a dependency that would close a cycle is refused
  (a cycle would run forever).
- The pass finds its work with one indexed query: ended runs of upstream flows (index on
  ``run(flow_id, created_at)``) with ``NOT EXISTS`` a downstream run (index on ``run.parent_run_id``), at
  most ``PIPELINE_BATCH`` per pass, oldest end first. So that an idle tick does not grow with the history,
  a tick looks only at upstream runs created in the last ``RECENT_WINDOW`` (a day); the whole history is
  swept on a process's first pass and every ``FULL_SWEEP_EVERY`` seconds (5 min). An upstream run that
  ends more than a day after it was created (a long queue, retries days apart) therefore fires at the
  next sweep rather than the next tick: later, never lost. (Measured with 50,000 upstream runs: a tick
  ~2 ms of query on PostgreSQL, a sweep ~250 ms.)

**File arrival** (``nbflow register F.ipynb --on-file 'data/incoming/*.csv'``, a ``file_trigger`` row):
the scheduler globs each active pattern (absolute; ``**`` recurses; like the shell, ``*`` skips dot
files) at every tick.

- Each regular file that matches and that the trigger has not seen makes one run, with its absolute path
  as the parameter ``parameter`` (default ``path``). The file is recorded in ``file_seen`` (UNIQUE
  ``(trigger_id, path)``) in the same transaction as its run: exactly once, across any number of
  schedulers and restarts. A file that is deleted and written again under the same name is not new.
- A file modified in the last ``SETTLE_SECONDS`` (1 s) is taken to be still being written and waits for
  a later tick. Writers that want no doubt write elsewhere (or to a dot file) and rename into place.
- Files already matching when the trigger is created are recorded as seen then, without runs: a trigger
  reacts to arrivals, it does not process a backlog. (To process existing files, add the trigger first,
  or move the files in after.) Re-registering the same pattern keeps its history.
- A trigger whose flow no longer declares the parameter (the notebook changed) is paused with an error
  in the log rather than dropping files; registering with a fitting ``--file-param`` resumes it and the
  waiting files then fire.
- Polling cost grows with the files that match, so move processed files out of the watched directory.

**Bad rows.** An event that cannot be turned into a run for a reason other than a database outage (an
upstream result that is not an object, a stored notebook that does not read) is rolled back alone (a
SAVEPOINT), said once in the log and in the upstream run's own log, and skipped by this process from then
on; the pass goes on with the others. A trigger whose stored pattern cannot be walked is paused. An outage
is raised to the scheduler's loop, which waits it out: nothing was marked done, so the next pass finds the
same events.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, exists, insert, or_, select, text, true, update
from sqlalchemy.orm import Session, aliased

from nbflow.core import states
from nbflow.core.flows import (
    check_name,
    default_flow_name,
    get_flow,
    inspect_parameters,
    latest_version,
    read_notebook,
    resolve_kernel,
    sync_versions,
)
from nbflow.core.parameters import validate
from nbflow.errors import FlowNotFound, NbflowError, ParameterError, TriggerError
from nbflow.store import Store
from nbflow.store.models import FileSeen, FileTrigger, Flow, FlowDependency, FlowVersion, Run, utcnow
from nbflow.store.retry import is_unavailable

log = logging.getLogger("nbflow.events")

ON_CHOICES = ("completed", "any")
SETTLE_SECONDS = 1.0
PIPELINE_BATCH = 500
FILES_PER_PASS = 1000
RECENT_WINDOW = timedelta(days=1)
FULL_SWEEP_EVERY = 300.0
_IN_CHUNK = 500
_ANY_END = (states.S.FAILED.value, states.S.CANCELLED.value, states.S.CRASHED.value)
# Serialises dependency changes on PostgreSQL, so two registrations cannot each close half a cycle.
_DEPENDENCY_LOCK = 727002
# When this process last swept the whole pipeline history, per database URL. Only a cost saving: a new
# process (a restart) sweeps everything on its first pass, so nothing that matters lives here.
_last_full_sweep: dict[str, float] = {}


# -- pipelines: definitions -------------------------------------------------------------------------


def _check_on(on: str) -> None:
    if on not in ON_CHOICES:
        raise TriggerError(f"unknown --after-on {on!r}; choose one of: {', '.join(ON_CHOICES)}")


def _path_up(session: Session, start: int, target: int) -> list[int] | None:
    """The flows from ``start`` up its dependencies (each one an upstream of the one before) to
    ``target``, both included, or None if ``target`` is not upstream of ``start``. ``target``'s own
    edges are not followed: they are the ones being replaced."""
    came_from: dict[int, int | None] = {start: None}
    frontier = [start]
    while frontier and target not in came_from:
        rows = session.execute(
            select(FlowDependency.flow_id, FlowDependency.upstream_flow_id).where(
                FlowDependency.flow_id.in_(frontier))
        ).all()
        frontier = []
        for flow_id, upstream in rows:
            if upstream not in came_from:
                came_from[upstream] = flow_id
                frontier.append(upstream)
    if target not in came_from:
        return None
    path: list[int] = []
    node: int | None = target
    while node is not None:
        path.append(node)
        node = came_from[node]
    return path[::-1]


def check_dependencies(session: Session, flow_name: str, upstreams: Sequence[str], on: str) -> list[Flow]:
    """The upstream flows of ``flow_name`` (which need not be registered yet), or an error: an unknown
    flow, the flow itself, or an edge that would close a cycle. Reads only."""
    _check_on(on)
    found: list[Flow] = []
    for name in dict.fromkeys(upstreams):  # once each, in the order given
        if name == flow_name:
            raise TriggerError(f"flow {flow_name!r} cannot run after itself")
        found.append(get_flow(session, name))
    me = session.execute(select(Flow).where(Flow.name == flow_name)).scalar_one_or_none()
    if me is None:
        return found  # a flow nobody can depend on yet cannot close a cycle
    for upstream in found:
        path = _path_up(session, upstream.id, me.id)
        if path is not None:  # me would run after upstream, which already runs (indirectly) after me
            names = dict(session.execute(select(Flow.id, Flow.name).where(Flow.id.in_(path))).all())
            chain = " -> ".join(names[i] for i in reversed(path))
            raise TriggerError(f"--after {upstream.name} would make a cycle ({chain} -> {flow_name}): "
                               "a pipeline cannot loop")
    return found


def set_dependencies(store: Store, flow_name: str, upstreams: Sequence[str], on: str = "completed"
                     ) -> list[FlowDependency]:
    """Make ``flow_name`` run after each of ``upstreams`` (replacing its upstream set; ``[]`` clears it).

    Checked first, in the same transaction: unknown flows, the flow itself, cycles. A dependency that is
    kept with the same ``on`` keeps its creation time, so ends it has not fired yet still fire; a new one,
    or one whose ``on`` changes, starts now (earlier ends never fire).
    """
    with store.write() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DEPENDENCY_LOCK})
        wanted = {f.id: f for f in check_dependencies(session, flow_name, upstreams, on)}
        flow = get_flow(session, flow_name)
        existing = {d.upstream_flow_id: d for d in session.execute(
            select(FlowDependency).where(FlowDependency.flow_id == flow.id)).scalars()}
        now = utcnow()
        for upstream_id, dep in existing.items():
            if upstream_id not in wanted:
                session.delete(dep)
            elif dep.on != on:
                dep.on, dep.created_at = on, now
        for upstream_id in wanted:
            if upstream_id not in existing:
                session.add(FlowDependency(flow_id=flow.id, upstream_flow_id=upstream_id, on=on, created_at=now))
        session.flush()
        return list(session.execute(
            select(FlowDependency).where(FlowDependency.flow_id == flow.id).order_by(FlowDependency.id)).scalars())


# -- file triggers: definitions ---------------------------------------------------------------------


def normalize_pattern(pattern: str, cwd: str | Path | None = None) -> str:
    """An absolute glob: ``~`` expanded, a relative pattern resolved against ``cwd`` (default: the
    current directory), ``.``/``..`` folded. Raises ``TriggerError`` for a pattern that cannot work."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise TriggerError("--on-file needs a glob, e.g. 'data/incoming/*.csv'; got an empty one")
    if "\0" in pattern or "\n" in pattern:
        raise TriggerError(f"invalid --on-file glob {pattern!r}: it contains a NUL or newline character")
    if pattern.endswith(("/", os.sep)):
        raise TriggerError(f"invalid --on-file glob {pattern!r}: it names directories; "
                           f"match the files in them, e.g. '{pattern.rstrip('/' + os.sep)}/*'")
    path = os.path.expanduser(pattern)
    absolute = os.path.normpath(os.path.join(os.fspath(cwd) if cwd is not None else os.getcwd(), path))
    if not glob.has_magic(absolute) and os.path.isdir(absolute):
        raise TriggerError(f"invalid --on-file glob {pattern!r}: it is a directory; "
                           f"match the files in it, e.g. '{pattern.rstrip('/' + os.sep)}/*'")
    return absolute


def check_file_parameter(parameter: str, spec: dict[str, Any], has_parameters_cell: bool) -> None:
    """The parameter a file path is passed in must be one the notebook declares, and take a string."""
    if not parameter.isidentifier():
        raise ParameterError(f"--file-param {parameter!r} is not a valid parameter name")
    if has_parameters_cell and parameter not in spec:
        valid = ", ".join(sorted(spec)) or "none: the notebook declares no parameters"
        raise ParameterError(f"--file-param {parameter!r}: the notebook declares no parameter {parameter!r} "
                             f"to receive the file's path; valid parameters: {valid}")
    try:
        validate(spec, {parameter: "/a/file"}, has_parameters_cell=has_parameters_cell)
    except ParameterError as exc:
        raise ParameterError(f"--file-param {parameter!r} cannot receive a file path: {exc}") from None


def _matching_files(pattern: str) -> list[tuple[float, str]]:
    """(modification time, path) of the regular files matching ``pattern``, oldest first."""
    found = []
    for path in glob.iglob(pattern, recursive=True):
        try:
            st = os.stat(path)
        except OSError:  # gone between the listing and the stat
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((st.st_mtime, path))
    found.sort()
    return found


def _upsert_triggers(session: Session, flow: Flow, patterns: Sequence[str], parameter: str,
                     present: dict[str, list[str]], *, replace: bool) -> list[FileTrigger]:
    version = latest_version(session, flow.id)
    if version is None:
        raise FlowNotFound(f"flow {flow.name!r} has no version to trigger")
    check_file_parameter(parameter, version.parameters, version.has_parameters_cell)
    existing = {t.pattern: t for t in session.execute(
        select(FileTrigger).where(FileTrigger.flow_id == flow.id)).scalars()}
    if replace:
        for pattern, trigger in existing.items():
            if pattern not in patterns:
                session.delete(trigger)
    now = utcnow()
    kept = []
    for pattern in dict.fromkeys(patterns):
        trigger = existing.get(pattern)
        if trigger is None:
            trigger = FileTrigger(flow_id=flow.id, pattern=pattern, parameter=parameter, active=True, created_at=now)
            session.add(trigger)
            session.flush()
            paths = present.get(pattern, [])
            for start in range(0, len(paths), _IN_CHUNK):  # what is there now is not an arrival
                session.execute(insert(FileSeen), [
                    {"trigger_id": trigger.id, "path": p, "seen_at": now} for p in paths[start:start + _IN_CHUNK]])
        else:
            trigger.parameter, trigger.active = parameter, True
        kept.append(trigger)
    session.flush()
    return kept


def set_file_triggers(store: Store, flow_name: str, patterns: Sequence[str], parameter: str = "path", *,
                      cwd: str | Path | None = None) -> list[FileTrigger]:
    """Make ``flow_name`` run for each new file matching any of ``patterns`` (replacing its triggers;
    ``[]`` removes them). A pattern it already had keeps its history of seen files; a new one records
    the files present now as seen, so they do not run."""
    absolute = [normalize_pattern(p, cwd) for p in patterns]
    present = {p: [path for _, path in _matching_files(p)] for p in absolute}
    with store.write() as session:
        return _upsert_triggers(session, get_flow(session, flow_name), absolute, parameter, present, replace=True)


def add_file_trigger(store: Store, flow_name: str, pattern: str, parameter: str = "path", *,
                     cwd: str | Path | None = None) -> FileTrigger:
    """Add one file trigger to ``flow_name`` (or update the parameter of the one it has for ``pattern``,
    and resume it if it was paused), leaving its other triggers alone."""
    absolute = normalize_pattern(pattern, cwd)
    present = {absolute: [path for _, path in _matching_files(absolute)]}
    with store.write() as session:
        return _upsert_triggers(session, get_flow(session, flow_name), [absolute], parameter, present,
                                replace=False)[0]


def remove_file_trigger(store: Store, flow_name: str, pattern: str, *, cwd: str | Path | None = None) -> None:
    """Delete a flow's trigger for ``pattern`` and its record of seen files; its runs stay."""
    absolute = normalize_pattern(pattern, cwd)
    with store.write() as session:
        flow = get_flow(session, flow_name)
        deleted = session.execute(delete(FileTrigger).where(
            FileTrigger.flow_id == flow.id, FileTrigger.pattern == absolute)).rowcount
        if not deleted:
            raise TriggerError(f"flow {flow_name!r} has no file trigger {absolute!r}")


def check_register(store: Store, notebook: str | Path, *, name: str | None, kernel: str | None,
                   after: Sequence[str], on: str, patterns: Sequence[str], parameter: str,
                   cwd: str | Path | None = None) -> list[str]:
    """Every check ``nbflow register --after/--on-file`` needs, before anything is written.

    Returns the patterns made absolute. Reads the notebook (to name the flow and, for ``--on-file``, to
    see its parameters); raises the error a surface shows as one line.
    """
    _check_on(on)
    source = read_notebook(notebook)
    flow_name = check_name(name or default_flow_name(source.path))
    if after:
        with store.read() as session:
            check_dependencies(session, flow_name, after, on)
    absolute = [normalize_pattern(p, cwd) for p in patterns]
    if absolute:
        spec, has_cell = inspect_parameters(source, resolve_kernel(source, kernel))
        check_file_parameter(parameter, spec, has_cell)
    return absolute


# -- firing -----------------------------------------------------------------------------------------


def fire_events(store: Store, now: datetime | None = None, *, full: bool | None = None) -> list[uuid.UUID]:
    """One events pass: the runs of ended upstream runs, then of newly arrived files; their ids.

    Safe to call from any number of threads, processes and machines at once: each event makes one run.
    ``now`` only moves the file settling clock (tests). ``full`` forces (or skips) the sweep of the whole
    pipeline history; by default this process sweeps it on its first pass and every
    ``FULL_SWEEP_EVERY`` seconds, and otherwise looks at upstream runs created in the last
    ``RECENT_WINDOW`` only, so an idle pass stays cheap however long the history grows.
    """
    now = now or utcnow()
    last = _last_full_sweep.get(store.url)
    if full is None:
        full = last is None or time.monotonic() - last >= FULL_SWEEP_EVERY
    started = time.monotonic()
    created = _fire_pipelines(store, None if full else utcnow() - RECENT_WINDOW)
    if full:
        _last_full_sweep[store.url] = started
    return created + _fire_file_triggers(store, now)


def _sync(store: Store, flow_names: set[str]) -> None:
    sync_versions(store, flow_names)  # the scheduler's rule for "pick up notebook edits before a run"


class _Flows:
    """Per-pass cache: a flow, its latest version and kernel, looked up once per pass."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[int, tuple[Flow, FlowVersion | None, str]] = {}

    def get(self, flow_id: int) -> tuple[Flow | None, FlowVersion | None, str]:
        from nbflow.core.runs import stored_kernel

        if flow_id not in self._cache:
            flow = self.session.get(Flow, flow_id)
            if flow is None:
                return None, None, ""
            version = latest_version(self.session, flow_id)
            self._cache[flow_id] = (flow, version, stored_kernel(flow, version) if version else "")
        return self._cache[flow_id]


def _pipeline_candidates(upstream_ids: list[int], created_after: datetime | None) -> Any:
    """(upstream run, dependency) pairs whose downstream run does not exist yet, oldest end first;
    only upstream runs created after ``created_after`` if given (a range of the index on flow_id)."""
    up, down, dep = aliased(Run, name="up"), aliased(Run, name="down"), FlowDependency
    # SQLite plans without statistics and, left alone, walks every COMPLETED run (index on state) and
    # probes each downstream check through the index on flow_id: quadratic in the history. ``|| ''`` and
    # ``+ 0`` (no-ops, on PostgreSQL too) make those columns unusable as index keys, which leaves the plan
    # that stays cheap: the upstream flows' runs (index on flow_id, created_at; the explicit list of flow
    # ids steers SQLite to it) -> NOT EXISTS a run whose parent is that run (index on parent_run_id).
    state = up.state.concat("")
    ended = or_(state == states.S.COMPLETED.value, and_(dep.on == "any", state.in_(_ANY_END)))
    has_run = exists().where(down.parent_run_id == up.id, down.flow_id + 0 == dep.flow_id)
    return (select(up, dep).select_from(dep).join(up, dep.upstream_flow_id == up.flow_id)
            .where(up.flow_id.in_(upstream_ids), ended, up.ended_at.is_not(None), up.ended_at >= dep.created_at,
                   ~has_run)
            .where(up.created_at >= created_after if created_after is not None else true())
            .where(dep.flow_id.not_in(select(Flow.id).where(Flow.paused.is_(True))))  # paused: the end waits
            .order_by(up.ended_at, up.id).limit(PIPELINE_BATCH)), up


def handed_over(result: dict[str, Any] | None, version: FlowVersion, *, context: str = "") -> dict[str, Any]:
    """The recorded ``result`` values the downstream ``version`` declares as parameters, validated one by
    one; a value that does not fit is left out (logged), so the downstream flow uses its default."""
    if not version.has_parameters_cell:
        return {}
    values: dict[str, Any] = {}
    for name, value in (result or {}).items():
        if name not in version.parameters:
            continue
        try:
            values.update(validate(version.parameters, {name: value}))
        except ParameterError as exc:
            log.warning("%s: result %r not passed on: %s", context or "pipeline", name, exc)
    return values


def _fire_pipelines(store: Store, created_after: datetime | None) -> list[uuid.UUID]:
    from nbflow.core.runs import insert_unique_run, new_run

    with store.read() as session:
        upstream_ids = sorted(set(session.execute(select(FlowDependency.upstream_flow_id)).scalars()))
        if not upstream_ids:  # no pipelines: one query on a tiny table
            return []
        query, up = _pipeline_candidates(upstream_ids, created_after)
        downstream = {dep.flow_id for _, dep in session.execute(query).all()}
        if not downstream:
            return []
        names = set(session.execute(select(Flow.name).where(Flow.id.in_(downstream))).scalars())
    _sync(store, names)
    created: list[uuid.UUID] = []
    with store.write() as session:
        flows = _Flows(session)
        for upstream, dep in session.execute(query.with_for_update(of=up, skip_locked=True)).all():
            key = (store.url, "pipeline", upstream.id, dep.flow_id)
            if key in _poisoned:
                continue
            try:
                with session.begin_nested():  # a bad one rolls back alone; the pass goes on with the others
                    flow, version, kernel = flows.get(dep.flow_id)
                    up_flow = flows.get(upstream.flow_id)[0]
                    if flow is None or version is None:
                        continue
                    source = f"{up_flow.name if up_flow else upstream.flow_id} run {upstream.id}"
                    values = handed_over(upstream.result, version, context=f"pipeline {source} -> {flow.name}")
                    run = new_run(flow, version, values, kernel, trigger="event", parent_run_id=upstream.id,
                                  idempotency_key=f"after:{upstream.id}:{flow.id}")
                    if insert_unique_run(session, run, states.S.PENDING,
                                         message=f"after {source} ended {upstream.state}"):
                        created.append(run.id)
            except Exception as exc:
                reason = _poison(key, exc, f"pipeline run after run {upstream.id} (downstream flow id {dep.flow_id})")
                _note_on_run(session, upstream, f"pipeline to flow id {dep.flow_id} not started: {reason}")
    return created


def _note_on_run(session: Session, run: Run, text: str) -> None:
    """A line in the run's own log (stream ``system``), where its owner looks: ``nbflow logs``, the API."""
    from nbflow.store.models import Log

    try:
        with session.begin_nested():
            session.add(Log(run_id=run.id, attempt=run.attempt, at=utcnow(), stream="system", cell_index=None,
                            text=text[:1000]))
    except Exception as exc:  # the note is a courtesy: never a reason to lose the pass
        if is_unavailable(exc):
            raise


# Events this process could not turn into a run for a reason other than an outage (a stored result or
# notebook it cannot read): said once in the log and skipped, so one bad event never stops the others.
# Not persisted: a restart tries each again (once).
_poisoned: dict[tuple[Any, ...], str] = {}


def _poison(key: tuple[Any, ...], exc: BaseException, what: str) -> str:
    """Remember an event that cannot be fired, log it once; its reason. An outage is raised instead."""
    if is_unavailable(exc):
        raise exc
    reason = (str(exc) if isinstance(exc, NbflowError) else f"{type(exc).__name__}: {exc}")[:500]
    _poisoned[key] = reason
    log.error("%s skipped: %s", what, reason, exc_info=not isinstance(exc, NbflowError))
    return reason


def _unseen(session: Session, trigger_id: int, paths: list[str]) -> list[str]:
    seen: set[str] = set()
    for start in range(0, len(paths), _IN_CHUNK):
        chunk = paths[start:start + _IN_CHUNK]
        seen.update(session.execute(select(FileSeen.path).where(
            FileSeen.trigger_id == trigger_id, FileSeen.path.in_(chunk))).scalars())
    return [p for p in paths if p not in seen]


def _fire_file_triggers(store: Store, now: datetime) -> list[uuid.UUID]:
    from nbflow.core.runs import insert_unique_run, new_run

    settled_before = now.timestamp() - SETTLE_SECONDS
    arrivals: dict[int, list[str]] = {}
    with store.read() as session:
        triggers = list(session.execute(select(FileTrigger.id, FileTrigger.pattern, Flow.name).join(
            Flow, Flow.id == FileTrigger.flow_id).where(FileTrigger.active.is_(True), Flow.paused.is_(False))
            .order_by(FileTrigger.id)).all())  # a paused flow's files wait (unseen) until it is resumed
        names = set()
        broken: dict[int, BaseException] = {}
        for trigger_id, pattern, flow_name in triggers:
            try:
                paths = [p for mtime, p in _matching_files(pattern) if mtime <= settled_before]
            except Exception as exc:  # a stored pattern glob cannot walk (not text, NUL): pause that one
                broken[trigger_id] = exc
                continue
            fresh = _unseen(session, trigger_id, paths)[:FILES_PER_PASS] if paths else []
            if fresh:
                arrivals[trigger_id] = fresh
                names.add(flow_name)
    if broken:
        _pause_triggers(store, broken)
    if not arrivals:
        return []
    _sync(store, names)
    created: list[uuid.UUID] = []
    with store.write() as session:
        flows = _Flows(session)
        for trigger_id, paths in arrivals.items():
            trigger = session.get(FileTrigger, trigger_id)
            if trigger is None or not trigger.active:
                continue
            flow, version, kernel = flows.get(trigger.flow_id)
            if flow is None or version is None:
                continue
            for path in paths:
                try:
                    values = validate(version.parameters, {trigger.parameter: path},
                                      has_parameters_cell=version.has_parameters_cell)
                except ParameterError as exc:
                    log.error("file trigger %s of flow %s paused: its parameter no longer fits the notebook (%s); "
                              "register the flow with a fitting --file-param to resume it", trigger.pattern,
                              flow.name, exc)
                    trigger.active = False
                    break
                key = (store.url, "file", trigger.id, path)
                if key in _poisoned:
                    continue
                try:
                    run = new_run(flow, version, values, kernel, trigger="event")
                    seen = FileSeen(trigger_id=trigger.id, path=path, seen_at=now, run_id=run.id)
                    if insert_unique_run(session, run, states.S.PENDING, message=f"file {path} arrived",
                                         rows=(seen,)):
                        created.append(run.id)
                except Exception as exc:  # this file's run only (its SAVEPOINT is rolled back)
                    _poison(key, exc, f"file {path!r} of trigger {trigger.pattern!r}")
    return created


def _pause_triggers(store: Store, broken: dict[int, BaseException]) -> None:
    """Pause file triggers whose stored pattern cannot be walked, each with its reason in the log."""
    for trigger_id, exc in broken.items():
        if is_unavailable(exc):
            raise exc
        log.error("file trigger %s paused: its pattern cannot be matched (%s: %s); register the flow with a "
                  "valid --on-file to resume it", trigger_id, type(exc).__name__, str(exc)[:300])
    with store.write() as session:
        session.execute(update(FileTrigger).where(FileTrigger.id.in_(list(broken))).values(active=False))
