"""Live run events: what the event streams (``GET /api/events``, ``GET /api/runs/{id}/events``,
``nbflow watch``) show, read from the store, and the one watcher per process that fans them out.

Not to be confused with ``nbflow.services.events``, the event *triggers* (pipelines, file arrivals).

Events
------
``state`` (a ``run_state_event`` row), ``cell_start`` and ``cell_end`` (a ``cell_run`` row starting and
ending), ``log`` (a ``log`` row) and ``result`` (the run's recorded values changed: the event carries them
all, as the store keeps only the latest value of each name). Nothing new is written for them: they are
read from the rows the run already writes, so following a run costs its hot path nothing (on PostgreSQL
one ``NOTIFY`` per recorder transaction).

Resuming exactly: the cursor
----------------------------
Every event's id is a ``Cursor``: everything delivered so far, as positions in monotonic store ids. The
state history and the log are append-only with growing ids: one high-water mark each. Cells are rows
updated in place, but a run's ``cell_run`` rows are inserted in cell order when its notebook starts (an
attempt's later than the one before), and cells run one after the other, so a run's cell events, in
order, are start then end of each row by id: position ``2 * id`` (start) and ``2 * id + 1`` (end), one
number per run in flight. Results are a digest of the run's result document. A client that sends the last
id it got back as ``Last-Event-ID`` gets exactly what came after it: nothing twice, nothing lost. An entry
for a run leaves the cursor with the run's final state event, so ids stay short: a run stream's id holds
one run, a global stream's the runs in flight (none if it leaves out cells and results).

Each read sees one snapshot (``snapshot``): a transaction's events (a cell's end and its log lines) are
all in one read or all in the next, and within a read they are interleaved in the order they happened,
each kind in its own id order. A run's final state event comes after everything else of the run.

On PostgreSQL, ids are taken when a row is inserted but become visible when its transaction commits, so a
lower id can appear after a higher one. The watcher never passes such a gap until the transactions that
were in flight when it saw the gap have ended (``pg_current_snapshot``); what happened after the held
event waits with it. A rolled-back insert (``execute.prepare`` makes some) holds the stream for a poll or
two, a slow commit until it commits. SQLite writes one transaction at a time: no gaps.

One watcher per process
-----------------------
``feed(store)`` is the process's ``Feed``: one thread reads what is new for everybody (``read_events``
from its own cursor) and pushes each subscriber the events of its filter. N subscribers cost one poll, not
N. It waits for PostgreSQL's ``NOTIFY`` (``nbflow_runs`` for states, ``nbflow_events`` for the recorder's
writes; a slow poll as the fallback) or, on SQLite, polls every ``POLL_SQLITE`` seconds. It runs while
somebody listens. A database outage is waited out (``nbflow.store.retry``): subscribers get nothing but
heartbeats meanwhile, then everything from their cursors.

A subscriber that starts behind (a ``Last-Event-ID``, a run's stream from its beginning) first reads from
the store up to the watcher's cursor, then takes its queue, skipping what its cursor already has: the
same events in the same order as if it had been there all along.

Slow consumers: each subscriber has a bounded queue (``QUEUE_EVENTS``). The watcher never waits for one:
a queue that would overflow is emptied and its subscriber catches up from its own cursor through the
store (``Feed.follow``), so it loses nothing and blocks nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from nbflow import checks
from nbflow.core.states import TERMINAL, StateType
from nbflow.store import Store
from nbflow.store.database import EVENTS_CHANNEL, WAKE_CHANNEL
from nbflow.store.models import CellRun, Flow, Log, Run, RunStateEvent
from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up, retrying

log = logging.getLogger("nbflow.events")

KINDS = ("state", "cell_start", "cell_end", "log", "result")
PAGE = 1000  # rows of each table in one read
QUEUE_EVENTS = 10_000  # a subscriber's queue; past it, it resynchronises from the store
POLL_SQLITE = 0.25  # seconds between the watcher's polls on SQLite
POLL_POSTGRESQL = 1.0  # the fallback on PostgreSQL, for writes that send no NOTIFY
HOLD_POLL = 0.05  # seconds to the next poll while a gap holds events back
GAP_HOLD_MAX = 30.0  # seconds a PostgreSQL id gap is waited for at most (a transaction open that long)
CATCH_UP_PATIENCE = 60.0  # seconds a subscriber catching up waits out an outage
_CELL_ENDED = ("COMPLETED", "FAILED", "SKIPPED")
_IN_FLIGHT = (StateType.RUNNING.value, StateType.CANCELLING.value)
_PER_RUN = ("cell_start", "cell_end", "result")  # the kinds whose positions the cursor keeps per run


# -- the cursor -------------------------------------------------------------------------------------

@dataclass
class Position:
    """How far one run's cells and results have been delivered."""

    cell: int = 0  # 2 * cell_run.id (+1 once it ended) of the last cell event
    result: str = ""  # digest of the result document last delivered ("": none)
    flow_id: int = -1  # not part of the id: lets a flow's subscriber take only its runs


@dataclass
class Cursor:
    state: int = 0
    log: int = 0
    runs: dict[uuid.UUID, Position] = field(default_factory=dict)

    def copy(self, flow_id: int | None = None, run_id: uuid.UUID | None = None) -> Cursor:
        runs = {r: Position(p.cell, p.result, p.flow_id) for r, p in self.runs.items()
                if (flow_id is None or p.flow_id == flow_id) and (run_id is None or r == run_id)}
        return Cursor(self.state, self.log, runs)

    def advance(self, event: Event) -> bool:
        """Take ``event`` into the cursor; False when the cursor already had it (a duplicate)."""
        if event.kind == "state":
            if event.position <= self.state:
                return False
            self.state = event.position
            if event.final:
                self.runs.pop(event.run_id, None)
            return True
        if event.kind == "log":
            if event.position <= self.log:
                return False
            self.log = event.position
            return True
        pos = self.runs.get(event.run_id)
        if pos is None:
            pos = self.runs[event.run_id] = Position(flow_id=event.flow_id)
        if event.kind == "result":
            if event.digest == pos.result:
                return False
            pos.result = event.digest
            return True
        if event.position <= pos.cell:
            return False
        pos.cell = event.position
        return True

    def encode(self) -> str:
        """``STATE.LOG`` then ``_RUNHEX.CELL.RESULT`` for each run in flight: text an SSE id can carry."""
        return f"{self.state}.{self.log}" + "".join(
            f"_{run.hex}.{pos.cell}.{pos.result}" for run, pos in self.runs.items())

    @classmethod
    def decode(cls, text_: str) -> Cursor:
        """The cursor of an id ``encode`` wrote (the route checks its form first: ``EVENT_ID_PATTERN``)."""
        head, *entries = text_.split("_")
        state, log_id = head.split(".")
        cursor = cls(int(state), int(log_id))
        for entry in entries:
            run, cell, result = entry.split(".")
            cursor.runs[uuid.UUID(run)] = Position(int(cell), result)
        return cursor


# -- events -----------------------------------------------------------------------------------------

@dataclass
class Event:
    kind: str
    run_id: uuid.UUID
    flow_id: int
    position: int  # in its table (state, log) or its run (cell); 0 for a result
    data: dict[str, Any]
    key: tuple[float, int]  # when it happened, to interleave the kinds
    final: bool = False  # the run's last state: its stream ends with it
    digest: str = ""  # a result's
    _json: str | None = None

    def json(self) -> str:
        """The event as JSON, encoded once however many subscribers send it."""
        if self._json is None:
            self._json = json.dumps(checks.printable(self.data), separators=(",", ":"), default=str)
        return self._json


@dataclass(frozen=True)
class Filter:
    """What one subscriber wants: one run, one flow or all; ``kinds`` of events."""

    run_id: uuid.UUID | None = None
    flow_id: int | None = None
    kinds: frozenset[str] = frozenset(KINDS)

    def matches(self, event: Event) -> bool:
        return (self.run_id is None or event.run_id == self.run_id) and \
            (self.flow_id is None or event.flow_id == self.flow_id)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def digest(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    text_ = json.dumps(result, sort_keys=True, default=str)
    return hashlib.sha1(text_.encode(), usedforsecurity=False).hexdigest()[:12]


def _run_filter(query: Any, column: Any, flt: Filter) -> Any:
    if flt.run_id is not None:
        query = query.where(column == flt.run_id)
    if flt.flow_id is not None:
        query = query.where(Run.flow_id == flt.flow_id)
    return query


def read_events(session: Session, cursor: Cursor, flt: Filter, *, upto: Cursor | None = None,
                page: int = PAGE) -> tuple[list[Event], bool]:
    """The events after ``cursor`` that match ``flt`` (all kinds: the caller keeps the cursor with
    every one and shows those of ``flt.kinds``), in the order they happened, and whether there is more
    (read again from the advanced cursor). ``upto``: read nothing past it (the watcher's cursor: a
    subscriber catching up reads what the watcher has fanned out, the rest comes from its queue, so it
    never jumps a gap the watcher waits on). Read in one snapshot (``snapshot``). Does not move ``cursor``."""
    q = (select(RunStateEvent.id, RunStateEvent.run_id, RunStateEvent.from_state, RunStateEvent.to_state,
                RunStateEvent.to_name, RunStateEvent.attempt, RunStateEvent.at, RunStateEvent.message,
                Run.flow_id, Flow.name, Run.state, Run.attempt.label("run_attempt"))
         .join(Run, Run.id == RunStateEvent.run_id).join(Flow, Flow.id == Run.flow_id)
         .where(RunStateEvent.id > cursor.state))
    q = _run_filter(q, RunStateEvent.run_id, flt)
    if upto is not None:
        q = q.where(RunStateEvent.id <= upto.state)
    state_rows = session.execute(q.order_by(RunStateEvent.id).limit(page)).all()
    q = (select(Log.id, Log.run_id, Log.attempt, Log.at, Log.stream, Log.cell_index, Log.text, Run.flow_id, Flow.name)
         .join(Run, Run.id == Log.run_id).join(Flow, Flow.id == Run.flow_id).where(Log.id > cursor.log))
    q = _run_filter(q, Log.run_id, flt)
    if upto is not None:
        q = q.where(Log.id <= upto.log)
    log_rows = session.execute(q.order_by(Log.id).limit(page)).all()
    more = len(state_rows) == page or len(log_rows) == page
    logs_cut = len(log_rows) == page

    states: list[Event] = []
    for r in state_rows:
        final = r.to_state in TERMINAL and r.state == r.to_state and r.run_attempt == r.attempt
        if final and logs_cut:
            break  # a run's end comes after its log lines, some of which are in the next page
        states.append(Event("state", r.run_id, r.flow_id, r.id, {
            "kind": "state", "run_id": str(r.run_id), "flow": r.name, "attempt": r.attempt, "at": _iso(r.at),
            "state": r.to_state, "state_name": r.to_name, "from_state": r.from_state, "message": r.message,
            "final": final}, (_ts(r.at) or 0.0, 5 if final else 0), final=final))
    logs = [Event("log", r.run_id, r.flow_id, r.id, {
        "kind": "log", "run_id": str(r.run_id), "flow": r.name, "attempt": r.attempt, "at": _iso(r.at),
        "log_id": r.id, "stream": r.stream, "cell_index": r.cell_index, "text": r.text},
        (_ts(r.at) or 0.0, 2)) for r in log_rows]

    per_run = _cells_and_results(session, cursor, flt, {e.run_id for e in states}, upto)
    latest: dict[uuid.UUID, float] = {}
    for e in logs:
        latest[e.run_id] = max(latest.get(e.run_id, 0.0), e.key[0])
    cells: list[list[Event]] = []
    results: list[Event] = []
    for run_events, result in per_run:
        if run_events:
            cells.append(run_events)
            latest[run_events[0].run_id] = max(latest.get(run_events[0].run_id, 0.0), run_events[-1].key[0])
        if result is not None:
            result.key = (latest.get(result.run_id, 0.0), 4)
            results.append(result)
    results.sort(key=lambda e: e.key)
    # Each list keeps its own order (ids, a run's cells); heapq.merge only interleaves them by time.
    return list(heapq.merge(states, logs, *cells, results, key=lambda e: e.key)), more


def _cells_and_results(session: Session, cursor: Cursor, flt: Filter, changed: set[uuid.UUID],
                       upto: Cursor | None = None) -> list[tuple[list[Event], Event | None]]:
    """Cell and result events of the runs that may have some: those running, those whose state just
    changed (a run can start and end between two reads), those the cursor holds."""
    if flt.run_id is not None:
        ids = {flt.run_id}
    else:
        running = select(Run.id).where(Run.state.in_(_IN_FLIGHT))
        if flt.flow_id is not None:
            running = running.where(Run.flow_id == flt.flow_id)
        ids = set(session.scalars(running)) | changed | set(cursor.runs)
    if not ids:
        return []
    runs = {r.id: r for r in session.execute(
        select(Run.id, Run.flow_id, Run.result, Run.state, Flow.name).join(Flow, Flow.id == Run.flow_id)
        .where(Run.id.in_(ids))).all()}
    if flt.flow_id is not None:
        runs = {k: r for k, r in runs.items() if r.flow_id == flt.flow_id}
    for gone in set(cursor.runs) - set(runs):  # deleted (retention): nothing more will come
        cursor.runs.pop(gone, None)
    if not runs:
        return []
    limits = _limits(session, runs, upto)
    after = [and_(CellRun.run_id == r, CellRun.id >= cursor.runs[r].cell // 2) if r in cursor.runs
             else CellRun.run_id == r for r in runs]
    rows = session.execute(
        select(CellRun.id, CellRun.run_id, CellRun.attempt, CellRun.cell_index, CellRun.cell_id, CellRun.state,
               CellRun.started_at, CellRun.ended_at, CellRun.execution_count, CellRun.error)
        .where(or_(*after), CellRun.state != "PENDING").order_by(CellRun.id)).all()
    by_run: dict[uuid.UUID, list[Any]] = {}
    for c in rows:
        by_run.setdefault(c.run_id, []).append(c)
    out: list[tuple[list[Event], Event | None]] = []
    for run_id, run in runs.items():
        pos = cursor.runs.get(run_id)
        done = pos.cell if pos is not None else 0
        limit, result_upto = limits.get(run_id, (None, None))
        events: list[Event] = []
        when = 0.0
        for c in by_run.get(run_id, []):
            base = {"run_id": str(run_id), "flow": run.name, "attempt": c.attempt, "cell_index": c.cell_index,
                    "cell_id": c.cell_id}
            if limit is not None and 2 * c.id > limit:
                break
            if c.started_at is not None and 2 * c.id > done:
                when = _ts(c.started_at) or when
                events.append(Event("cell_start", run_id, run.flow_id, 2 * c.id,
                                    {"kind": "cell_start", **base, "at": _iso(c.started_at)}, (when, 1)))
            if c.state in _CELL_ENDED and 2 * c.id + 1 > done and (limit is None or 2 * c.id + 1 <= limit):
                when = _ts(c.ended_at) or when  # a cell SKIPPED has no end time: the one before's
                error = {"ename": c.error.get("ename"), "evalue": c.error.get("evalue")} \
                    if isinstance(c.error, dict) else None
                duration = (c.ended_at - c.started_at).total_seconds() \
                    if c.started_at is not None and c.ended_at is not None else None
                events.append(Event("cell_end", run_id, run.flow_id, 2 * c.id + 1, {
                    "kind": "cell_end", **base, "at": _iso(c.ended_at), "state": c.state,
                    "execution_count": c.execution_count, "duration": duration, "error": error}, (when, 3)))
        result = None
        found = digest(run.result)
        if result_upto is not None and found != result_upto:
            found = pos.result if pos is not None else ""  # not fanned out yet: it comes from the queue
        if found != (pos.result if pos is not None else ""):
            result = Event("result", run_id, run.flow_id, 0, {
                "kind": "result", "run_id": str(run_id), "flow": run.name, "results": run.result or {}},
                (0.0, 4), digest=found)
        out.append((events, result))
    return out


def _limits(session: Session, runs: dict[uuid.UUID, Any], upto: Cursor | None
            ) -> dict[uuid.UUID, tuple[int | None, str | None]]:
    """For a read ``upto`` the watcher's cursor: each run's last cell position and result digest the
    watcher has fanned out (None: no limit). A run it holds no position for has had none of its cells
    fanned out, unless the watcher is past the run's end (it forgets a run there, or started after it)."""
    if upto is None:
        return {}
    out: dict[uuid.UUID, tuple[int | None, str | None]] = {
        r: (upto.runs[r].cell, upto.runs[r].result) for r in runs if r in upto.runs}
    ended = [r for r, run in runs.items() if r not in upto.runs and run.state in TERMINAL]
    last = dict(session.execute(select(RunStateEvent.run_id, func.max(RunStateEvent.id))
                                .where(RunStateEvent.run_id.in_(ended)).group_by(RunStateEvent.run_id)).all()) \
        if ended else {}
    for r in runs:
        if r not in out and not (r in last and last[r] <= upto.state):
            out[r] = (0, "")
    return out


@contextlib.contextmanager
def snapshot(store: Store) -> Iterator[Session]:
    """A read session that sees one snapshot of the database in all its statements: the events of a
    transaction (a cell's end and its log lines) are all in one read or all in the next. SQLite's read
    transactions are that already; PostgreSQL's need REPEATABLE READ."""
    with store.read() as session:
        if store.dialect == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


def current_cursor(session: Session, flt: Filter = Filter()) -> Cursor:
    """The cursor of "now": everything already written counts as delivered."""
    state = session.scalar(select(func.max(RunStateEvent.id))) or 0
    log_id = session.scalar(select(func.max(Log.id))) or 0
    cursor = Cursor(state, log_id)
    for events, result in _cells_and_results(session, Cursor(), flt, set()):
        for event in [*events, *([result] if result is not None else [])]:
            cursor.advance(event)
    return cursor


# -- PostgreSQL: gaps in the ids ----------------------------------------------------------------------

@dataclass
class _Gap:
    first: int
    last: int
    in_flight: frozenset[int]  # transactions in progress when it was seen: one of them may fill it
    since: float
    poll: int  # the watcher's poll that saw it


def _xip(session: Session) -> frozenset[int]:
    return frozenset(int(x) for x in session.execute(text("SELECT pg_snapshot_xip(pg_current_snapshot())")).scalars())


# -- the watcher ----------------------------------------------------------------------------------------

class Subscriber:
    """One stream's end of the feed: a bounded queue the watcher fills from its thread."""

    def __init__(self, flt: Filter, loop: asyncio.AbstractEventLoop) -> None:
        self.filter = flt
        self.loop = loop
        self.queue: deque[Event] = deque()
        self.overflowed = False
        self.ready = asyncio.Event()

    def push(self, events: list[Event]) -> None:
        """From the watcher's thread, under the feed's lock: never waits."""
        if self.overflowed:
            return
        mine = [e for e in events if self.filter.matches(e)]
        if not mine:
            return
        if len(self.queue) + len(mine) > QUEUE_EVENTS:
            self.queue.clear()  # resynchronised from the store by ``follow``: nothing lost, nobody waits
            self.overflowed = True
        else:
            self.queue.extend(mine)
        with contextlib.suppress(RuntimeError):  # its loop closed: the stream is gone
            self.loop.call_soon_threadsafe(self.ready.set)


class Feed:
    """The process's event watcher for one store (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.postgresql = store.dialect == "postgresql"
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()
        self._cursor: Cursor | None = None  # the watcher's: what it has fanned out; None while idle
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.watchers_started = 0  # threads started over the feed's life (one at a time)
        self.polls = 0
        self.failed_polls = 0  # polls an outage (or a bug) stopped: retried after a backoff
        self.resyncs = 0  # subscribers that overflowed and caught up through the store
        self.holding = False  # events held behind a PostgreSQL id gap: poll again soon

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- subscribing (from a stream's thread or loop) ----------------------------------------------
    def subscribe(self, flt: Filter, loop: asyncio.AbstractEventLoop) -> tuple[Subscriber, Cursor]:
        """Register a subscriber; the watcher's cursor for its filter (its "now"). Blocking: the first
        subscriber reads the store's "now" and starts the watcher."""
        with self._lock:
            if self._cursor is None:
                with snapshot(self.store) as session:
                    self._cursor = current_cursor(session)
            sub = Subscriber(flt, loop)
            self._subscribers.add(sub)
            now = self._cursor.copy(flt.flow_id, flt.run_id)
            if self._thread is None or not self._thread.is_alive():
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="nbflow-events-watcher",
                                                daemon=True)
                self.watchers_started += 1
                self._thread.start()
        return sub, now

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)
            if not self._subscribers:  # idle: stop polling; the next subscriber starts from its "now"
                self._stop.set()
                self._wake.set()
                self._cursor = None
                self._thread = None

    def position(self) -> Cursor:
        """What the watcher has fanned out: a subscriber catching up reads up to it, its queue has the rest."""
        with self._lock:
            return self._cursor.copy() if self._cursor is not None else Cursor()

    def resync(self, sub: Subscriber) -> Cursor:
        """Empty an overflowed queue; what to catch up to through the store."""
        with self._lock:
            sub.queue.clear()
            sub.overflowed = False
            sub.ready.clear()
            return self._cursor.copy() if self._cursor is not None else Cursor()

    def take(self, sub: Subscriber) -> list[Event]:
        """What the watcher has queued for ``sub`` (under the lock it fills the queue with)."""
        with self._lock:
            batch = list(sub.queue)
            sub.queue.clear()
            return batch

    async def follow(self, flt: Filter, since: Cursor | None, *, until_final: bool = False
                     ) -> AsyncIterator[tuple[Event, str]]:
        """The events of ``flt`` after ``since`` (None: from now), each with its id, live; with
        ``until_final``, ending after the run's final state event."""
        loop = asyncio.get_running_loop()
        sub, now = await asyncio.to_thread(self.subscribe, flt, loop)
        try:
            cursor = since if since is not None else now
            catch_up: Cursor | None = self.position() if since is not None else None
            while True:
                if catch_up is not None:
                    batch = await asyncio.to_thread(self._read_until, cursor, flt, catch_up)
                    catch_up = None
                else:
                    await sub.ready.wait()
                    sub.ready.clear()
                    if sub.overflowed:
                        self.resyncs += 1
                        catch_up = self.resync(sub)
                        continue
                    batch = self.take(sub)
                ended = False
                for event in batch:
                    if event.kind not in flt.kinds and event.kind in _PER_RUN:
                        continue  # kept out of the cursor too: a stream without them keeps short ids
                    if not cursor.advance(event):
                        continue
                    final = until_final and event.final
                    ended = ended or final
                    if event.kind in flt.kinds or final:  # a run's stream always ends with its final state
                        yield event, cursor.encode()
                if ended:
                    return
        finally:
            self.unsubscribe(sub)

    def _read_until(self, cursor: Cursor, flt: Filter, upto: Cursor) -> list[Event]:
        """A subscriber catching up: everything after its cursor up to the watcher's, in pages (on a copy
        of the cursor: the caller advances its own as it sends)."""
        cursor = cursor.copy()
        out: list[Event] = []

        def read() -> tuple[list[Event], bool]:
            with snapshot(self.store) as session:
                return read_events(session, cursor, flt, upto=upto)

        while True:
            # An outage is waited out (the stream sends heartbeats meanwhile), up to a limit: past it the
            # stream ends and its client resumes later from its last id.
            events, more = retrying(read, self.store, what="catching up a run event stream",
                                    give_up_after=CATCH_UP_PATIENCE, read_only=True)
            for event in events:
                cursor.advance(event)
            out.extend(events)
            if not more:
                return out

    # -- the thread --------------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        listener = None
        if self.postgresql:
            listener = threading.Thread(target=self.store.notifications, name="nbflow-events-listen", daemon=True,
                                        args=(self._wake, stop, (WAKE_CHANNEL, EVENTS_CHANNEL)))
            listener.start()
        every = POLL_POSTGRESQL if self.postgresql else POLL_SQLITE
        gaps: dict[str, list[_Gap]] = {"state": [], "log": []}  # this thread's: a new watcher starts afresh
        backoff = Backoff()
        logged: set[str] = set()
        while not stop.is_set():
            self._wake.wait(HOLD_POLL if self.holding else every)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                more = True
                while more and not stop.is_set():
                    more = self._poll(stop, gaps)
                report_up(self.store, read_only=True)
                backoff.reset()
            except Exception as exc:
                self.failed_polls += 1
                if is_unavailable(exc):
                    report_down(self.store, exc, "watching run events")
                elif type(exc).__name__ not in logged:
                    logged.add(type(exc).__name__)
                    log.exception("watching run events failed; retrying")
                if stop.wait(backoff.next()):
                    break
        if listener is not None:
            listener.join(5)

    def _poll(self, stop: threading.Event, gaps: dict[str, list[_Gap]]) -> bool:
        with self._lock:
            cursor = self._cursor.copy() if self._cursor is not None else None
        if cursor is None:
            return False
        with snapshot(self.store) as session:
            in_flight = _xip(session) if self.postgresql else None  # first: the snapshot's own
            events, more = read_events(session, cursor, Filter())
        self.polls += 1
        if in_flight is not None:
            events = self._hold_gaps(events, cursor, gaps, in_flight)
        with self._lock:
            if stop.is_set() or self._cursor is None:
                return False
            fresh = [e for e in events if self._cursor.advance(e)]
            for gone in set(self._cursor.runs) - set(cursor.runs):  # read_events forgot deleted runs
                self._cursor.runs.pop(gone, None)
            if fresh:
                for sub in self._subscribers:
                    sub.push(fresh)
        return more

    def _hold_gaps(self, events: list[Event], cursor: Cursor, gaps: dict[str, list[_Gap]],
                   in_flight: frozenset[int]) -> list[Event]:
        """The events up to the first state or log event above an id this snapshot cannot see that a
        transaction in progress may still commit (see the module docstring); the rest are read again next
        time. A gap is given up once none of the transactions in progress when it was seen still is, and
        not in the poll that saw it (an insert takes its id a moment before its transaction's id)."""
        held: dict[str, int] = {}
        for kind, mark in (("state", cursor.state), ("log", cursor.log)):
            known = gaps[kind]
            over = [g for g in known if g.poll < self.polls and (g.in_flight.isdisjoint(in_flight)
                                                              or time.monotonic() - g.since >= GAP_HOLD_MAX)]
            known[:] = [g for g in known if g not in over]
            expected = mark + 1
            for position in sorted(e.position for e in events if e.kind == kind):
                if position > expected and not any(g.first <= expected <= g.last for g in over):
                    if not any(g.first <= expected <= g.last for g in known):
                        known.append(_Gap(expected, position - 1, in_flight, time.monotonic(), self.polls))
                    held[kind] = expected
                    break
                expected = position + 1
        self.holding = bool(held)
        for i, event in enumerate(events):  # in the order they happened: nothing after a held event goes
            if event.kind in held and event.position >= held[event.kind]:
                return events[:i]
        return events


_feeds: dict[str, Feed] = {}
_feeds_lock = threading.Lock()


def feed(store: Store) -> Feed:
    """The process's ``Feed`` for ``store`` (its watcher starts with its first subscriber)."""
    with _feeds_lock:
        found = _feeds.get(store.url)
        if found is None or found.store is not store:
            found = _feeds[store.url] = Feed(store)
        return found


def local_events(store: Store, run_id: uuid.UUID, *, poll: float = 0.25,
                 stop: threading.Event | None = None) -> Iterable[Event]:
    """Every event of one run from its beginning, live, through the store (``nbflow watch`` without a
    server): a poll of that run's rows every ``poll`` seconds, until its final state event."""
    cursor, flt = Cursor(), Filter(run_id=run_id)
    backoff = Backoff()
    stop = stop or threading.Event()
    while True:
        try:
            with snapshot(store) as session:
                events, more = read_events(session, cursor, flt)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            report_down(store, exc, f"watching run {run_id}")
            if stop.wait(backoff.next()):
                return
            continue
        backoff.reset()
        ended = False
        for event in events:
            if cursor.advance(event):
                ended = ended or event.final
                yield event
        if ended:
            return
        if not more and stop.wait(poll):
            return
