"""The run state machine: the whole transition table, retries, names and timestamps.

The expected table below is written out by hand from DESIGN.md ("Run states") and compared with the
module's, so a change to either is a deliberate, reviewed change. The 64 (from, to) cases run on one
SQLite store per test module for speed; the lifecycle tests run on both backends through ``store``.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from nbflow.core.states import (
    NAMES,
    TERMINAL,
    TRANSITIONS,
    StateType,
    fail,
    finish,
    initial_state,
    lock_run,
    retry_delay,
    transition,
)
from nbflow.errors import IllegalTransition, RunNotFound
from nbflow.store import Store
from nbflow.store.models import Flow, FlowVersion, Run, RunStateEvent, utcnow

S = StateType
ALL = list(StateType)

# Written out from the design, not derived from nbflow.core.states.
EXPECTED_TRANSITIONS: dict[str, set[str]] = {
    "SCHEDULED": {"PENDING", "CANCELLING", "CANCELLED"},
    "PENDING": {"RUNNING", "FAILED", "CANCELLING", "CANCELLED"},
    "RUNNING": {"COMPLETED", "FAILED", "CRASHED", "CANCELLING"},
    "CANCELLING": {"CANCELLED"},
    "FAILED": {"SCHEDULED"},  # retry, while attempts are left
    "CRASHED": {"SCHEDULED"},  # retry, while attempts are left
    "COMPLETED": set(),
    "CANCELLED": set(),
}
EXPECTED_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
EXPECTED_NAMES = {
    "Late": "SCHEDULED",
    "AwaitingRetry": "SCHEDULED",
    "AwaitingConcurrencySlot": "SCHEDULED",
    "TimedOut": "FAILED",
    "OutOfMemory": "FAILED",
}

# How to reach each state from a new run: (initial state, then legal steps).
PATHS: dict[StateType, tuple[StateType, list[StateType]]] = {
    S.SCHEDULED: (S.SCHEDULED, []),
    S.PENDING: (S.PENDING, []),
    S.RUNNING: (S.PENDING, [S.RUNNING]),
    S.COMPLETED: (S.PENDING, [S.RUNNING, S.COMPLETED]),
    S.FAILED: (S.PENDING, [S.RUNNING, S.FAILED]),
    S.CRASHED: (S.PENDING, [S.RUNNING, S.CRASHED]),
    S.CANCELLING: (S.PENDING, [S.CANCELLING]),
    S.CANCELLED: (S.PENDING, [S.CANCELLING, S.CANCELLED]),
}


# -- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One migrated SQLite store for the table-driven tests of this module (each makes its own run)."""
    path: Path = tmp_path_factory.mktemp("states") / "nbflow.db"
    s = Store(f"sqlite:///{path}")
    s.ensure_schema()
    yield s
    s.dispose()


def new_run(
    store: Store,
    start: StateType = S.PENDING,
    *,
    max_attempts: int = 1,
    retry_delay_s: float = 0.0,
    retry_backoff: float = 2.0,
    name: str | None = None,
) -> uuid.UUID:
    """A flow, a version and a run in its first state; returns the run's id."""
    with store.write() as session:
        flow = Flow(name=f"f-{uuid.uuid4().hex[:12]}")
        session.add(flow)
        session.flush()
        version = FlowVersion(flow_id=flow.id, version=1, content_hash=uuid.uuid4().hex, source="{}")
        session.add(version)
        session.flush()
        run = Run(
            flow_id=flow.id,
            flow_version_id=version.id,
            kernel_name="python3",
            max_attempts=max_attempts,
            retry_delay=retry_delay_s,
            retry_backoff=retry_backoff,
        )
        initial_state(session, run, start, name=name)
        return run.id


def move(store: Store, run_id: uuid.UUID, to: StateType, **kwargs: object) -> None:
    with store.write() as session:
        transition(session, lock_run(session, run_id), to, **kwargs)  # type: ignore[arg-type]


def run_in(store: Store, state: StateType, **kwargs: object) -> uuid.UUID:
    """A new run driven to ``state`` through legal transitions only."""
    start, steps = PATHS[state]
    run_id = new_run(store, start, **kwargs)  # type: ignore[arg-type]
    for step in steps:
        move(store, run_id, step)
    return run_id


def load(store: Store, run_id: uuid.UUID) -> tuple[Run, list[RunStateEvent]]:
    """The run and its history, read in a fresh session."""
    with store.read() as session:
        run = session.get(Run, run_id)
        assert run is not None
        events = list(
            session.scalars(
                select(RunStateEvent).where(RunStateEvent.run_id == run_id).order_by(RunStateEvent.id)
            )
        )
        return run, events


def history(events: list[RunStateEvent]) -> list[tuple[str | None, str, str]]:
    return [(e.from_state, e.to_state, e.to_name) for e in events]


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is UTC


# -- the table ----------------------------------------------------------------------------------------


def test_transition_table_matches_design() -> None:
    assert {k.value: {v.value for v in vs} for k, vs in TRANSITIONS.items()} == EXPECTED_TRANSITIONS
    assert {s.value for s in TERMINAL} == EXPECTED_TERMINAL
    assert {k: v.value for k, v in NAMES.items()} == EXPECTED_NAMES
    assert len(ALL) == 8


@pytest.mark.parametrize(("from_state", "to_state"), list(itertools.product(ALL, ALL)), ids=lambda s: s.value)
def test_every_transition(sqlite_store: Store, from_state: StateType, to_state: StateType) -> None:
    store = sqlite_store
    run_id = run_in(store, from_state, max_attempts=2)
    before, before_events = load(store, run_id)
    assert before.state == from_state
    legal = to_state.value in EXPECTED_TRANSITIONS[from_state.value]

    if not legal:
        with pytest.raises(IllegalTransition, match=f"from {from_state.value} to {to_state.value}"):
            move(store, run_id, to_state)
        after, after_events = load(store, run_id)
        assert after.state == from_state.value
        assert after.state_name == before.state_name
        assert after.attempt == before.attempt
        assert after.ended_at == before.ended_at
        assert len(after_events) == len(before_events)
        return

    t0 = utcnow()
    move(store, run_id, to_state, message="moved by the test")
    t1 = utcnow()
    after, after_events = load(store, run_id)
    assert after.state == to_state.value
    assert after.state_name == to_state.value.title()
    assert after.state_message == "moved by the test"
    assert len(after_events) == len(before_events) + 1
    last = after_events[-1]
    assert (last.from_state, last.to_state, last.message) == (
        from_state.value,
        to_state.value,
        "moved by the test",
    )
    assert t0 <= last.at <= t1
    assert_utc(last.at)
    if to_state is S.RUNNING:
        assert after.started_at == last.at
        assert after.ended_at is None
    if to_state.value in EXPECTED_TERMINAL:
        assert after.ended_at == last.at
    else:
        assert after.ended_at is None
    if from_state in (S.FAILED, S.CRASHED):  # a retry is the next attempt
        assert (before.attempt, after.attempt, last.attempt) == (1, 2, 2)
    else:
        assert after.attempt == before.attempt == last.attempt == 1


@pytest.mark.parametrize("state", ALL, ids=lambda s: s.value)
def test_initial_state(sqlite_store: Store, state: StateType) -> None:
    if state in (S.SCHEDULED, S.PENDING):
        run_id = new_run(sqlite_store, state)
        run, events = load(sqlite_store, run_id)
        assert run.state == state.value
        assert history(events) == [(None, state.value, state.value.title())]
        assert run.started_at is None and run.ended_at is None
    else:
        counts = select(select(func.count()).select_from(Run).scalar_subquery(), func.count(Flow.id))
        with sqlite_store.read() as session:
            before = tuple(session.execute(counts).one())
        with pytest.raises(IllegalTransition, match=f"cannot start in state {state.value}"):
            new_run(sqlite_store, state)
        with sqlite_store.read() as session:  # the whole transaction rolled back: no orphan flow or run
            assert tuple(session.execute(counts).one()) == before


def test_lock_run_unknown_id(sqlite_store: Store) -> None:
    missing = uuid.uuid4()
    with sqlite_store.write() as session, pytest.raises(RunNotFound, match=str(missing)):
        lock_run(session, missing)


@pytest.mark.parametrize("terminal", [S.COMPLETED, S.CANCELLED], ids=lambda s: s.value)
def test_leaving_a_final_state_says_it_has_ended(sqlite_store: Store, terminal: StateType) -> None:
    run_id = run_in(sqlite_store, terminal)
    with pytest.raises(IllegalTransition, match="it has ended"):
        move(sqlite_store, run_id, S.RUNNING)


# -- retries ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failed", [S.FAILED, S.CRASHED], ids=lambda s: s.value)
def test_retry_only_while_attempts_are_left(sqlite_store: Store, failed: StateType) -> None:
    store = sqlite_store
    run_id = run_in(store, failed, max_attempts=1)
    with pytest.raises(IllegalTransition, match="attempt 1 of 1"):
        move(store, run_id, S.SCHEDULED, name="AwaitingRetry")
    run, events = load(store, run_id)
    assert (run.state, run.attempt, len(events)) == (failed.value, 1, 3)

    run_id = run_in(store, failed, max_attempts=2)
    move(store, run_id, S.SCHEDULED, name="AwaitingRetry")  # attempt 2 of 2
    for step in (S.PENDING, S.RUNNING, failed):
        move(store, run_id, step)
    with pytest.raises(IllegalTransition, match="attempt 2 of 2"):
        move(store, run_id, S.SCHEDULED, name="AwaitingRetry")
    run, _ = load(store, run_id)
    assert (run.state, run.attempt) == (failed.value, 2)


def test_retry_delay_is_exponential() -> None:
    run = Run(retry_delay=10.0, retry_backoff=3.0, attempt=1)
    delays = []
    for attempt in (1, 2, 3):
        run.attempt = attempt
        delays.append(retry_delay(run))
    assert delays == [10.0, 30.0, 90.0]
    assert retry_delay(Run(retry_delay=5.0, retry_backoff=1.0, attempt=4)) == 5.0


def test_fail_with_retries_schedules_next_attempts_with_backoff(store: Store) -> None:
    """Both backends: FAILED then SCHEDULED/AwaitingRetry in one go, delays 10s, 30s, 90s, then final."""
    run_id = new_run(store, S.PENDING, max_attempts=4, retry_delay_s=10.0, retry_backoff=3.0)
    expected_history: list[tuple[str | None, str, str]] = [(None, "PENDING", "Pending")]
    for attempt, delay in ((1, 10.0), (2, 30.0), (3, 90.0)):
        if attempt > 1:
            move(store, run_id, S.PENDING)
            expected_history.append(("SCHEDULED", "PENDING", "Pending"))
        move(store, run_id, S.RUNNING)
        expected_history.append(("PENDING", "RUNNING", "Running"))
        with store.write() as session:
            retrying = fail(session, lock_run(session, run_id), error={"ename": "ValueError", "n": attempt})
        assert retrying is True
        expected_history += [("RUNNING", "FAILED", "Failed"), ("FAILED", "SCHEDULED", "AwaitingRetry")]

        run, events = load(store, run_id)
        assert (run.state, run.state_name, run.attempt) == ("SCHEDULED", "AwaitingRetry", attempt + 1)
        assert run.error == {"ename": "ValueError", "n": attempt}
        assert run.ended_at is None
        assert history(events) == expected_history
        failed_event, retry_event = events[-2], events[-1]
        assert (failed_event.attempt, retry_event.attempt) == (attempt, attempt + 1)
        assert failed_event.at == retry_event.at
        assert run.expected_start_at == retry_event.at + timedelta(seconds=delay)
        assert_utc(run.expected_start_at)
        assert retry_event.message == f"attempt {attempt + 1} of 4 in {delay:g}s"

    move(store, run_id, S.PENDING)
    move(store, run_id, S.RUNNING)
    with store.write() as session:
        assert fail(session, lock_run(session, run_id), error={"ename": "KeyError"}) is False
    run, events = load(store, run_id)
    assert (run.state, run.state_name, run.attempt) == ("FAILED", "Failed", 4)
    assert run.ended_at == events[-1].at
    assert_utc(run.ended_at)
    assert history(events)[-3:] == [
        ("SCHEDULED", "PENDING", "Pending"),
        ("PENDING", "RUNNING", "Running"),
        ("RUNNING", "FAILED", "Failed"),
    ]


def test_fail_and_retry_are_one_transaction(sqlite_store: Store) -> None:
    store = sqlite_store
    run_id = run_in(store, S.RUNNING, max_attempts=3)
    _, before = load(store, run_id)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.write() as session:
        run = lock_run(session, run_id)
        assert fail(session, run, error={"ename": "X"}) is True
        assert run.state == "SCHEDULED"
        raise Boom
    run, after = load(store, run_id)
    assert (run.state, run.attempt, run.error, run.expected_start_at) == ("RUNNING", 1, None, None)
    assert len(after) == len(before)


def test_fail_without_retries_stays_failed(sqlite_store: Store) -> None:
    run_id = run_in(sqlite_store, S.RUNNING, max_attempts=1, retry_delay_s=60.0)
    with sqlite_store.write() as session:
        assert fail(session, lock_run(session, run_id), error={"ename": "E"}) is False
    run, events = load(sqlite_store, run_id)
    assert (run.state, run.attempt, run.expected_start_at) == ("FAILED", 1, None)
    assert run.error == {"ename": "E"}
    assert history(events)[-1] == ("RUNNING", "FAILED", "Failed")


def test_fail_crashed_with_retries(sqlite_store: Store) -> None:
    run_id = run_in(sqlite_store, S.RUNNING, max_attempts=2, retry_delay_s=1.5)
    with sqlite_store.write() as session:
        assert (
            fail(session, lock_run(session, run_id), error=None, crashed=True, message="lease lost") is True
        )
    run, events = load(sqlite_store, run_id)
    assert (run.state, run.state_name, run.attempt) == ("SCHEDULED", "AwaitingRetry", 2)
    assert history(events)[-2:] == [
        ("RUNNING", "CRASHED", "Crashed"),
        ("CRASHED", "SCHEDULED", "AwaitingRetry"),
    ]
    assert events[-2].message == "lease lost"
    assert run.expected_start_at == events[-1].at + timedelta(seconds=1.5)


def test_fail_timed_out_keeps_its_name(sqlite_store: Store) -> None:
    run_id = run_in(sqlite_store, S.RUNNING)
    with sqlite_store.write() as session:
        assert fail(session, lock_run(session, run_id), error=None, name="TimedOut") is False
    run, events = load(sqlite_store, run_id)
    assert (run.state, run.state_name) == ("FAILED", "TimedOut")
    assert history(events)[-1] == ("RUNNING", "FAILED", "TimedOut")


def test_fail_while_cancelling_ends_cancelled(sqlite_store: Store) -> None:
    run_id = new_run(sqlite_store, S.PENDING, max_attempts=3)
    move(sqlite_store, run_id, S.RUNNING)
    move(sqlite_store, run_id, S.CANCELLING)
    with sqlite_store.write() as session:
        assert fail(session, lock_run(session, run_id), error={"ename": "KeyboardInterrupt"}) is False
    run, events = load(sqlite_store, run_id)
    assert (run.state, run.attempt, run.expected_start_at) == ("CANCELLED", 1, None)
    assert run.ended_at == events[-1].at
    assert history(events)[-1] == ("CANCELLING", "CANCELLED", "Cancelled")


def test_finish(sqlite_store: Store) -> None:
    run_id = run_in(sqlite_store, S.RUNNING)
    with sqlite_store.write() as session:
        run = lock_run(session, run_id)
        run.error = {"ename": "stale"}
        finish(session, run, message="done")
    run, events = load(sqlite_store, run_id)
    assert (run.state, run.state_name, run.error) == ("COMPLETED", "Completed", None)
    assert run.ended_at == events[-1].at
    assert (events[-1].from_state, events[-1].to_state, events[-1].message) == (
        "RUNNING",
        "COMPLETED",
        "done",
    )


def test_finish_while_cancelling_ends_cancelled(sqlite_store: Store) -> None:
    run_id = run_in(sqlite_store, S.RUNNING)
    move(sqlite_store, run_id, S.CANCELLING)
    with sqlite_store.write() as session:
        finish(session, lock_run(session, run_id))
    run, events = load(sqlite_store, run_id)
    assert run.state == "CANCELLED"
    assert (events[-1].from_state, events[-1].to_state, events[-1].message) == (
        "CANCELLING",
        "CANCELLED",
        "cancelled while finishing",
    )


def test_finish_before_running_is_illegal(sqlite_store: Store) -> None:
    run_id = new_run(sqlite_store, S.PENDING)
    with pytest.raises(IllegalTransition, match="from PENDING to COMPLETED"), sqlite_store.write() as session:
        finish(session, lock_run(session, run_id))
    assert load(sqlite_store, run_id)[0].state == "PENDING"


# -- names --------------------------------------------------------------------------------------------

# For each target state, a state it can legally be reached from (FAILED/CRASHED with an attempt left).
REACH_FROM = {
    S.SCHEDULED: S.FAILED,
    S.PENDING: S.SCHEDULED,
    S.RUNNING: S.PENDING,
    S.COMPLETED: S.RUNNING,
    S.FAILED: S.RUNNING,
    S.CRASHED: S.RUNNING,
    S.CANCELLING: S.RUNNING,
    S.CANCELLED: S.CANCELLING,
}


@pytest.mark.parametrize(
    ("name", "to_state"),
    list(itertools.product(["Late", "AwaitingRetry", "AwaitingConcurrencySlot", "TimedOut", "Bogus"], ALL)),
    ids=str,
)
def test_state_names(sqlite_store: Store, name: str, to_state: StateType) -> None:
    run_id = run_in(sqlite_store, REACH_FROM[to_state], max_attempts=2)
    before, before_events = load(sqlite_store, run_id)
    if EXPECTED_NAMES.get(name) == to_state.value:
        move(sqlite_store, run_id, to_state, name=name)
        run, events = load(sqlite_store, run_id)
        assert (run.state, run.state_name) == (to_state.value, name)
        assert events[-1].to_name == name
    else:
        with pytest.raises(IllegalTransition, match=f"{name!r} does not belong to state {to_state.value}"):
            move(sqlite_store, run_id, to_state, name=name)
        run, events = load(sqlite_store, run_id)
        assert (run.state, run.state_name) == (before.state, before.state_name)
        assert len(events) == len(before_events)


def test_initial_state_names(sqlite_store: Store) -> None:
    run, _ = load(sqlite_store, new_run(sqlite_store, S.SCHEDULED, name="Late"))
    assert (run.state, run.state_name) == ("SCHEDULED", "Late")
    with pytest.raises(IllegalTransition, match="does not belong"):
        new_run(sqlite_store, S.PENDING, name="Late")
    # The default name of its own type is always accepted when given explicitly.
    run, _ = load(sqlite_store, new_run(sqlite_store, S.PENDING, name="Pending"))
    assert run.state_name == "Pending"


# -- both backends ------------------------------------------------------------------------------------


def test_lifecycle_and_history_on_both_backends(store: Store) -> None:
    run_id = new_run(store, S.SCHEDULED, name="Late")
    t0 = utcnow()
    move(store, run_id, S.PENDING)
    move(store, run_id, S.RUNNING)
    with pytest.raises(IllegalTransition, match="from RUNNING to SCHEDULED"):
        move(store, run_id, S.SCHEDULED)
    move(store, run_id, S.CANCELLING, message="user asked")
    with store.write() as session:
        finish(session, lock_run(session, run_id))
    t1 = utcnow()

    run, events = load(store, run_id)
    assert run.state == "CANCELLED"
    assert history(events) == [
        (None, "SCHEDULED", "Late"),
        ("SCHEDULED", "PENDING", "Pending"),
        ("PENDING", "RUNNING", "Running"),
        ("RUNNING", "CANCELLING", "Cancelling"),
        ("CANCELLING", "CANCELLED", "Cancelled"),
    ]
    assert events[3].message == "user asked"
    for value in (run.created_at, run.started_at, run.ended_at, *(e.at for e in events)):
        assert_utc(value)
    assert t0 <= run.started_at <= run.ended_at <= t1  # type: ignore[operator]
    assert run.started_at == events[2].at
    assert run.ended_at == events[4].at
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_timestamps_are_utc_whatever_the_session_time_zone(store: Store) -> None:
    run_id = new_run(store)
    instant = datetime(2030, 1, 2, 12, 0, 0, 123456, tzinfo=UTC)
    with store.write() as session:
        lock_run(session, run_id).expected_start_at = instant.astimezone(
            timezone(timedelta(hours=5, minutes=30))
        )
    with store.read() as session:
        if store.dialect == "postgresql":
            session.execute(text("SET TIME ZONE 'America/St_Johns'"))
        value = session.scalar(select(Run.expected_start_at).where(Run.id == run_id))
    assert value == instant
    assert_utc(value)
    assert value.hour == 12  # type: ignore[union-attr]


def test_lock_run_blocks_a_concurrent_writer(store: Store) -> None:
    """The row (PostgreSQL) or the database (SQLite) is held by the transaction that locked the run."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    run_id = new_run(store)
    with store.write() as session:
        lock_run(session, run_id)
        if store.dialect == "postgresql":
            with pytest.raises(OperationalError, match="lock timeout"), store.write() as other:
                other.execute(text("SET LOCAL lock_timeout = '100ms'"))
                lock_run(other, run_id)
        else:
            conn = sqlite3.connect(store.engine.url.database, timeout=0.1, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                    conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.close()
