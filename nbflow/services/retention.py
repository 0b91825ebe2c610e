"""Retention: delete ended runs older than an age, with every row and file that belongs to them.

``prune`` is what ``nbflow db prune --older-than 90d`` and the automatic retention
(``NBFLOW_RETENTION_DAYS``, applied hourly by the scheduler's leader) run. What it deletes and keeps:

- Only runs in a terminal state (COMPLETED, FAILED, CANCELLED, CRASHED) that ended before the cutoff
  (``ended_at``, or ``created_at`` for a run that never recorded an end). A queued, running or retrying
  run is never touched, however old. ``keep_failed`` also keeps FAILED and CRASHED runs.
- With a run go the rows of every table holding a foreign key to it, found from the models so that a
  table added later is covered without editing this module: its cell runs, logs, state events and
  notification deliveries are deleted; a ``SET NULL`` reference (``file_seen.run_id``) is cleared
  instead, because a file trigger must keep remembering the files it has acted on or it would run them
  again. Its output notebook is removed after the batch commits (a crash in between leaves an orphan
  file, never a run whose notebook is gone).
- Lineage (``parent_run_id``, set by retries and pipelines): a run that a live run points to as parent is
  kept until that run ends, so a run in flight can always show what it is a retry of. A run is never
  pruned while its parent stays: a pipeline's downstream run is what tells the scheduler that its
  upstream run has been handled (``nbflow.services.events``), so deleting it alone would run the downstream flow
  again. With ``keep_failed`` a failed run therefore keeps the runs that followed it. A run kept by
  neither rule whose parent is pruned keeps its row with the link cleared.

Work goes in batches of ``batch`` runs, one short transaction each, so neither database is locked for
long: on SQLite each batch is one ``BEGIN IMMEDIATE`` transaction and other writers get in between; on
PostgreSQL the batch's runs are locked ``FOR UPDATE SKIP LOCKED`` (a run another process holds right
now is left for the next prune). Candidates are read by keyset over ``(created_at, id)`` from the index
on ``run.created_at`` (``ended_at >= created_at``, so ``created_at < cutoff`` bounds the scan).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Table, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from nbflow.core import states
from nbflow.errors import InvalidRetention
from nbflow.store import Store
from nbflow.store.models import Base, Run, utcnow
from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up

log = logging.getLogger("nbflow.retention")

DEFAULT_BATCH = 500
AUTO_INTERVAL = 3600.0
RETRY_FIRST = 60.0
MAX_AGE_DAYS = 36_500  # a century: any real retention, and far from datetime's limits
RETENTION_ENV = "NBFLOW_RETENTION_DAYS"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FAILED = (states.S.FAILED, states.S.CRASHED)


def parse_age(text: str) -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"2w"``, ``"45s"`` -> a positive age. A bare number is refused:
    a prune that meant days but read seconds would delete almost everything."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text).lower())
    if not match:
        raise InvalidRetention(f"invalid age {text!r}: give a number and a unit (s, m, h, d, w), e.g. 90d or 12h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise InvalidRetention(f"invalid age {text!r}: it must be more than zero")
    if seconds > MAX_AGE_DAYS * 86400:  # beyond that, ``now - age`` overflows a datetime
        raise InvalidRetention(f"invalid age {text!r}: at most {MAX_AGE_DAYS} days")
    return timedelta(seconds=seconds)


def configured_age() -> timedelta | None:
    """The automatic retention age from ``NBFLOW_RETENTION_DAYS`` (a positive number of days); None when
    it is unset or empty: by default nbflow keeps every run."""
    raw = os.environ.get(RETENTION_ENV, "").strip()
    if not raw:
        return None
    try:
        days = float(raw)
    except ValueError:
        days = 0.0
    if not 0 < days <= MAX_AGE_DAYS:  # also refuses NaN and infinities
        raise InvalidRetention(f"{RETENTION_ENV}={raw!r}: give a positive number of days up to {MAX_AGE_DAYS}, "
                               "e.g. 90")
    return timedelta(days=days)


@dataclass
class PruneSummary:
    """What a prune deleted (or, dry, would delete)."""

    cutoff: datetime
    dry_run: bool
    keep_failed: bool
    runs: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows deleted ("table.column": links cleared)
    files: int = 0
    kept: int = 0  # old ended runs kept for their lineage (a live child, or a parent that stays)
    batches: int = 0

    def document(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff.isoformat(), "dry_run": self.dry_run, "keep_failed": self.keep_failed,
                "runs": self.runs, "rows": dict(sorted(self.rows.items())), "files": self.files,
                "kept": self.kept, "batches": self.batches}

    def add(self, key: str, count: int) -> None:
        if count:
            self.rows[key] = self.rows.get(key, 0) + count


def _references() -> list[tuple[Table, Column[Any], bool]]:
    """Every (table, column, clear-instead-of-delete) pointing at ``run.id``, from the models, except
    ``run.parent_run_id`` (handled on its own)."""
    found = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            if fk.column.table.name == Run.__tablename__ and table.name != Run.__tablename__:
                found.append((table, fk.parent, (fk.ondelete or "").upper() == "SET NULL"))
    return found


@dataclass(frozen=True)
class _Candidate:
    id: uuid.UUID
    created_at: datetime
    parent: uuid.UUID | None
    output_path: str | None


def prune(store: Store, older_than: timedelta, *, keep_failed: bool = False, dry_run: bool = False,
          batch: int = DEFAULT_BATCH, now: datetime | None = None) -> PruneSummary:
    """Delete the ended runs that ended more than ``older_than`` ago (see the module docstring)."""
    if older_than <= timedelta(0):
        raise InvalidRetention(f"the age must be more than zero, got {older_than}")
    if batch < 1:
        raise InvalidRetention(f"the batch size must be at least 1, got {batch}")
    cutoff = (now or utcnow()) - older_than
    summary = PruneSummary(cutoff=cutoff, dry_run=dry_run, keep_failed=keep_failed)
    ended = [s.value for s in states.TERMINAL if not (keep_failed and s in _FAILED)]
    references = _references()
    simulated: set[uuid.UUID] = set()  # dry run: the runs earlier batches would have deleted
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        files: list[tuple[uuid.UUID, str]] = []
        with (store.read() if dry_run else store.write()) as session:
            # ``|| ''`` keeps SQLite off the (state, created_at) index, which would make it sort every
            # candidate for each batch; the ``>=`` bound lets each batch start where the last one ended.
            query = (select(Run.id, Run.created_at, Run.parent_run_id, Run.output_path)
                     .where(Run.state.concat("").in_(ended), Run.created_at < cutoff,
                            func.coalesce(Run.ended_at, Run.created_at) < cutoff)
                     .order_by(Run.created_at, Run.id).limit(batch))
            if after is not None:
                query = query.where(Run.created_at >= after[0], or_(
                    Run.created_at > after[0], and_(Run.created_at == after[0], Run.id > after[1])))
            if not dry_run:
                query = query.with_for_update(skip_locked=True)
            rows = [_Candidate(*row) for row in session.execute(query)]
            if not rows:
                break
            after = (rows[-1].created_at, rows[-1].id)
            summary.batches += 1
            chosen = _choose(session, rows, simulated if dry_run else None)
            summary.kept += len(rows) - len(chosen)
            if chosen:
                ids = [c.id for c in chosen]
                summary.runs += len(ids)
                if dry_run:
                    simulated.update(ids)
                    _count(session, ids, references, summary)
                else:
                    _delete(session, ids, references, summary)
                files = [(c.id, c.output_path) for c in chosen if c.output_path]
        summary.files += sum(_remove_output(run_id, path, dry_run) for run_id, path in files)
        if len(rows) < batch:
            break
    return summary


def _choose(session: Session, rows: list[_Candidate], simulated: set[uuid.UUID] | None) -> list[_Candidate]:
    """The candidates the lineage rules let go: none with a live child, none whose parent stays."""
    ids = {c.id for c in rows}
    live = Run.state.not_in([s.value for s in states.TERMINAL])
    live_parents = set(session.execute(select(Run.parent_run_id).where(Run.parent_run_id.in_(ids), live)).scalars())
    parents = {c.parent for c in rows if c.parent is not None and c.parent not in ids}
    existing = set(session.execute(select(Run.id).where(Run.id.in_(parents))).scalars()) if parents else set()
    if simulated is not None:
        existing -= simulated
    chosen = {c.id for c in rows if c.id not in live_parents}
    changed = True
    while changed:  # a kept parent keeps its children in this batch, and theirs
        changed = False
        for c in rows:
            if c.id in chosen and c.parent is not None and (c.parent in existing or
                                                             (c.parent in ids and c.parent not in chosen)):
                chosen.discard(c.id)
                changed = True
    return [c for c in rows if c.id in chosen]


def _count(session: Session, ids: list[uuid.UUID], references: list[tuple[Table, Column[Any], bool]],
           summary: PruneSummary) -> None:
    for table, column, clear in references:
        n = session.execute(select(func.count()).select_from(table).where(column.in_(ids))).scalar_one()
        summary.add(f"{table.name}.{column.name}" if clear else table.name, int(n))
    n = session.execute(select(func.count()).select_from(Run).where(Run.parent_run_id.in_(ids))).scalar_one()
    summary.add("run.parent_run_id", int(n) - _children_in(session, ids))


def _children_in(session: Session, ids: list[uuid.UUID]) -> int:
    return int(session.execute(select(func.count()).select_from(Run)
                               .where(Run.parent_run_id.in_(ids), Run.id.in_(ids))).scalar_one())


def _delete(session: Session, ids: list[uuid.UUID], references: list[tuple[Table, Column[Any], bool]],
            summary: PruneSummary) -> None:
    for table, column, clear in references:
        if clear:
            result = session.execute(update(table).where(column.in_(ids)).values({column.name: None}))
            summary.add(f"{table.name}.{column.name}", result.rowcount)
        else:
            summary.add(table.name, session.execute(delete(table).where(column.in_(ids))).rowcount)
    # Children that stay (ended, not pruned) lose the link; those pruned with it go in the same statement.
    unlinked = session.execute(update(Run).where(Run.parent_run_id.in_(ids), Run.id.not_in(ids))
                               .values(parent_run_id=None)).rowcount
    summary.add("run.parent_run_id", unlinked)
    session.execute(update(Run).where(Run.parent_run_id.in_(ids)).values(parent_run_id=None))
    session.execute(delete(Run).where(Run.id.in_(ids)))


def _remove_output(run_id: uuid.UUID, path: str, dry_run: bool) -> bool:
    """Remove a pruned run's output notebook: only a local file named after the run (nbflow names it
    ``<run id>.ipynb``), so a path edited to point elsewhere can never make a prune delete a user's file."""
    if "://" in path:
        return False
    file = Path(path)
    if not file.name.startswith(str(run_id)) or not file.is_file():
        return False
    if not dry_run:
        try:
            file.unlink()
        except OSError as exc:
            log.warning("could not remove the output notebook %s of pruned run %s: %s", file, run_id, exc)
            return False
    return True


class AutoPrune:
    """The automatic retention of the scheduler loop: at most once per ``interval`` seconds, and only
    where ``is_leader()`` says so, prune runs older than ``NBFLOW_RETENTION_DAYS`` in a thread of its own,
    so a first prune of a long history never delays a schedule's slot."""

    def __init__(self, store: Store, *, is_leader: Callable[[], bool] = lambda: True,
                 interval: float = AUTO_INTERVAL) -> None:
        self.store = store
        self.is_leader = is_leader
        self.interval = interval
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self._retry = Backoff(first=min(RETRY_FIRST, interval), cap=interval)
        self.last: PruneSummary | None = None

    def tick(self) -> bool:
        """Start a prune if one is due; True if it did."""
        if time.monotonic() < self._next or (self._thread is not None and self._thread.is_alive()):
            return False
        self._next = time.monotonic() + self.interval
        try:
            age = configured_age()
        except InvalidRetention as exc:
            log.error("automatic retention is off: %s", exc)
            return False
        if age is None or not self.is_leader():
            return False
        self._thread = threading.Thread(target=self._prune, args=(age,), name="nbflow-retention", daemon=True)
        self._thread.start()
        return True

    def _prune(self, age: timedelta) -> None:
        """One prune. A failure is retried sooner than the next hour (``RETRY_FIRST`` seconds, doubling up to
        ``interval``): an outage is said once per outage (``nbflow.store.retry``), any other error once
        with its traceback. Each batch commits on its own, so a retry starts where the last one stopped."""
        try:
            self.last = prune(self.store, age)
        except Exception as exc:
            self._next = time.monotonic() + self._retry.next()
            if is_unavailable(exc):
                report_down(self.store, exc, "automatic retention")
            else:
                log.exception("automatic retention failed; retrying in %.0f s", self._next - time.monotonic())
            return
        self._retry.reset()
        report_up(self.store)
        if self.last.runs:
            log.info("retention: pruned %d runs that ended before %s", self.last.runs, self.last.cutoff.isoformat())

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
