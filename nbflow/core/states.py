"""The run state machine: the only place that writes a run's state.

A run has a state *type* (the eight below, which drive all logic) and a human *name* on top of it
(``Late``, ``AwaitingRetry``, ``AwaitingConcurrencySlot``, ``TimedOut``...). Every change goes through
``transition``: it checks the move against ``TRANSITIONS`` on a row it has locked, updates the run and
appends a ``run_state_event`` in the caller's transaction, so history and state can never disagree.

::

    SCHEDULED --> PENDING --> RUNNING --> COMPLETED
         |           |           |------> FAILED  --(retries left)--> SCHEDULED "AwaitingRetry"
         |           |           |------> CRASHED --(retries left)--^
         +-----------+-----------+------> CANCELLING --> CANCELLED

Terminal states are final, with one exception the design names: a FAILED or CRASHED run with attempts
left moves on to SCHEDULED/AwaitingRetry, and only inside the same transaction that failed it
(``fail``), so no reader ever sees a FAILED run that is later revived.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, null, select
from sqlalchemy.orm import Session

from nbflow.checks import MAX_SECONDS
from nbflow.errors import IllegalTransition, RunNotFound
from nbflow.store import wake_runners
from nbflow.store.models import Run, RunStateEvent, utcnow


class StateType(StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"


S = StateType
TERMINAL: frozenset[StateType] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED})
ACTIVE: frozenset[StateType] = frozenset({S.PENDING, S.RUNNING, S.CANCELLING})

TRANSITIONS: dict[StateType, frozenset[StateType]] = {
    S.SCHEDULED: frozenset({S.PENDING, S.CANCELLING, S.CANCELLED}),
    S.PENDING: frozenset({S.RUNNING, S.FAILED, S.CANCELLING, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CRASHED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    # Only while attempts are left, and only inside ``fail`` (see the module docstring).
    S.FAILED: frozenset({S.SCHEDULED}),
    S.CRASHED: frozenset({S.SCHEDULED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
}

# Names that refine a type. The default name of a type is its title-cased type ("Running").
NAMES: dict[str, StateType] = {
    "Late": S.SCHEDULED,
    "AwaitingRetry": S.SCHEDULED,
    "AwaitingConcurrencySlot": S.SCHEDULED,
    "TimedOut": S.FAILED,
    "OutOfMemory": S.FAILED,  # over the flow's memory limit (nbflow.execution.containment)
}


def default_name(state: StateType) -> str:
    return state.value.title()


def is_legal(from_state: StateType | None, to_state: StateType) -> bool:
    if from_state is None:  # a new run starts SCHEDULED or PENDING
        return to_state in (S.SCHEDULED, S.PENDING)
    return to_state in TRANSITIONS[from_state]


def lock_run(session: Session, run_id: uuid.UUID) -> Run:
    """Load a run for update: a row lock on PostgreSQL; SQLite's write session already holds the lock."""
    run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
    if run is None:
        raise RunNotFound(f"no run with id {run_id}")
    return run


def _record(
    session: Session, run: Run, from_state: StateType | None, to: StateType, name: str,
    message: str | None, now: datetime,
) -> RunStateEvent:
    event = RunStateEvent(
        run_id=run.id, from_state=from_state.value if from_state else None, to_state=to.value,
        to_name=name, attempt=run.attempt, at=now, message=message,
    )
    session.add(event)
    return event


def initial_state(
    session: Session, run: Run, to: StateType = S.PENDING, *, name: str | None = None,
    message: str | None = None, flush: bool = True,
) -> RunStateEvent:
    """Give a new run its first state and history entry (the caller adds the run to the session).

    ``flush=False`` leaves the INSERTs to the next flush: a caller creating many runs in one transaction
    (the API's group commit) sends them all in one batch instead of one round of statements per run."""
    name = _check_name(to, name)
    if not is_legal(None, to):
        raise IllegalTransition(f"a new run cannot start in state {to}")
    now = utcnow()
    run.state, run.state_name, run.state_message = to.value, name, message
    session.add(run)
    if flush:
        session.flush()
    wake_runners(session)
    return _record(session, run, None, to, name, message, now)


def initial_values(
    to: StateType = S.PENDING, *, name: str | None = None, message: str | None = None,
) -> dict[str, Any]:
    """``initial_state`` for runs inserted with Core, many per statement (the scheduler's bursts), where
    an ORM object and a flush per run cost more than the insert: the same checks, and the run's state
    columns. The runs' history entries come from ``insert_initial_events``, in the same transaction;
    the caller calls ``wake_runners``."""
    name = _check_name(to, name)
    if not is_legal(None, to):
        raise IllegalTransition(f"a new run cannot start in state {to}")
    return {"state": to.value, "state_name": name, "state_message": message}


def insert_initial_events(run_ids: list[uuid.UUID]) -> Any:
    """The first ``run_state_event`` of each run of ``run_ids`` that exists, built by the database from
    the run's own row (state, name, message, attempt; ``at`` = its ``created_at``), so that history and
    state cannot disagree; ``RETURNING run_id``. For runs inserted with Core and ``initial_values``: an
    id whose insert was a no-op (``ON CONFLICT DO NOTHING``) has no row, hence no event, and is not
    returned, so the result is also the list of runs the caller created."""
    run, event = Run.__table__, RunStateEvent.__table__
    return insert(event).from_select(
        ["run_id", "from_state", "to_state", "to_name", "attempt", "at", "message"],
        select(run.c.id, null(), run.c.state, run.c.state_name, run.c.attempt, run.c.created_at,
               run.c.state_message).where(run.c.id.in_(run_ids)),
    ).returning(event.c.run_id)


def _check_name(to: StateType, name: str | None) -> str:
    if name is None:
        return default_name(to)
    if name != default_name(to) and NAMES.get(name) != to:
        raise IllegalTransition(f"state name {name!r} does not belong to state {to}")
    return name


def transition(
    session: Session, run: Run, to: StateType, *, name: str | None = None,
    message: str | None = None, now: datetime | None = None,
) -> RunStateEvent:
    """Move ``run`` (loaded with ``lock_run``) to ``to``, or raise ``IllegalTransition``."""
    current = StateType(run.state)
    name = _check_name(to, name)
    if not is_legal(current, to):
        raise IllegalTransition(
            f"run {run.id} cannot go from {current} to {to}"
            + (" (it has ended)" if current in TERMINAL else "")
        )
    if current in (S.FAILED, S.CRASHED) and run.attempt >= run.max_attempts:
        raise IllegalTransition(f"run {run.id} cannot be retried: attempt {run.attempt} of {run.max_attempts}")
    now = now or utcnow()
    if to is S.RUNNING:
        run.started_at = now
        run.ended_at = None
    if to in TERMINAL:
        run.ended_at = now
    if current in (S.FAILED, S.CRASHED) and to is S.SCHEDULED:
        run.attempt += 1
        run.ended_at = None
    run.state, run.state_name, run.state_message = to.value, name, message
    if to is not S.RUNNING:  # queued work, a freed slot, or an end that may trigger other flows
        wake_runners(session)
    return _record(session, run, current, to, name, message, now)


def retry_delay(run: Run) -> float:
    """Seconds before the next attempt: ``retry_delay * backoff ** (attempt - 1)``, within
    ``[0, checks.MAX_SECONDS]``.

    The cap is for rows stored before the doors checked these numbers (``inf``, ``1e12``, a backoff
    that overflows): uncapped, ``now + delay`` raised ``OverflowError`` in the reaper and every runner
    exited at start-up, a crash loop. NaN counts as the longest delay; a negative one as none."""
    try:
        delay = float(run.retry_delay) * float(run.retry_backoff) ** max(run.attempt - 1, 0)
    except (OverflowError, TypeError, ValueError):
        return MAX_SECONDS
    if math.isnan(delay):
        return MAX_SECONDS
    return min(max(delay, 0.0), MAX_SECONDS)


def fail(
    session: Session, run: Run, *, error: dict[str, Any] | None, crashed: bool = False,
    name: str | None = None, message: str | None = None,
) -> bool:
    """End an attempt in failure; schedule the next attempt if one is left. Returns True if retrying.

    A run that is being cancelled ends CANCELLED instead: a cancel always wins over a failure.
    """
    now = utcnow()
    run.error = error
    if run.state == S.CANCELLING:
        transition(session, run, S.CANCELLED, message=message, now=now)
        return False
    to = S.CRASHED if crashed else S.FAILED
    transition(session, run, to, name=name, message=message, now=now)
    if run.attempt >= run.max_attempts:
        return False
    delay = retry_delay(run)
    run.expected_start_at = now + timedelta(seconds=delay)
    transition(
        session, run, S.SCHEDULED, name="AwaitingRetry",
        message=f"attempt {run.attempt + 1} of {run.max_attempts} in {delay:g}s", now=now,
    )
    return True


def finish(session: Session, run: Run, *, message: str | None = None) -> None:
    """End an attempt successfully (or CANCELLED if a cancel arrived while it ran)."""
    if run.state == S.CANCELLING:
        transition(session, run, S.CANCELLED, message=message or "cancelled while finishing")
    else:
        run.error = None
        transition(session, run, S.COMPLETED, message=message)
