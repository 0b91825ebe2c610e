"""Retention (``nbflow.services.retention``, ``nbflow db prune``) on SQLite and PostgreSQL: exactly the old ended
runs go, with every row and file of theirs; live runs, recent runs and lineage that matters stay."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import make_notebook, nbflow
from sqlalchemy import func, select, update

from nbflow.core import states
from nbflow.core.flows import register
from nbflow.core.runs import new_run
from nbflow.errors import InvalidRetention
from nbflow.services.retention import AutoPrune, configured_age, parse_age, prune
from nbflow.store import Store, open_store
from nbflow.store.models import (
    CellRun,
    FileSeen,
    FileTrigger,
    Log,
    Notification,
    NotificationDelivery,
    Run,
    RunStateEvent,
    utcnow,
)

S = states.S
TABLES = (Run, CellRun, Log, RunStateEvent, NotificationDelivery, FileSeen)


class History:
    """Runs of one registered flow, put in any state and aged at will, with cells, logs, a delivery and
    an output notebook each, as a real run leaves them."""

    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.store = store
        self.flow, self.version = register(store, make_notebook(tmp_path, "job", ["y = 1"]))
        self._n = 0
        with store.write() as session:
            note = Notification(flow_id=self.flow.id, url="http://127.0.0.1:9/x", on_states=["FAILED"])
            trig = FileTrigger(flow_id=self.flow.id, pattern=str(tmp_path / "*.csv"), parameter="path")
            session.add_all([note, trig])
            session.flush()
            self.notification_id, self.trigger_id = note.id, trig.id

    def add(self, state: S, *, days_ago: float, parent: uuid.UUID | None = None) -> uuid.UUID:
        self._n += 1
        created = utcnow() - timedelta(days=days_ago, seconds=-self._n)  # distinct, in creation order
        with self.store.write() as session:
            run = new_run(self.flow, self.version, {}, "python3", trigger="retry" if parent else "manual",
                          parent_run_id=parent)
            states.initial_state(session, run, S.PENDING)
            path = Path(run.output_path)
            if state in (S.RUNNING, S.COMPLETED, S.FAILED, S.CRASHED, S.SCHEDULED):
                states.transition(session, run, S.RUNNING)
            if state is S.SCHEDULED:  # a failed attempt waiting out its retry delay
                run.max_attempts = 2
                assert states.fail(session, run, error=None)
            if state in (S.COMPLETED, S.FAILED, S.CRASHED, S.CANCELLED):
                states.transition(session, run, state)
            session.add_all([
                CellRun(run_id=run.id, attempt=1, cell_index=i, state="COMPLETED") for i in range(3)
            ] + [Log(run_id=run.id, stream="stdout", text="hello\n"),
                 NotificationDelivery(notification_id=self.notification_id, run_id=run.id, state="delivered"),
                 FileSeen(trigger_id=self.trigger_id, path=f"/data/{run.id}.csv", run_id=run.id)])
            session.flush()
            ended = created + timedelta(seconds=1) if states.StateType(run.state) in states.TERMINAL else None
            session.execute(update(Run).where(Run.id == run.id).values(created_at=created, ended_at=ended))
            run_id = run.id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return run_id

    def present(self) -> set[uuid.UUID]:
        with self.store.read() as session:
            return set(session.execute(select(Run.id)).scalars())

    def counts(self) -> dict[str, int]:
        with self.store.read() as session:
            found = {m.__tablename__: session.execute(select(func.count()).select_from(m)).scalar_one()
                     for m in TABLES}
            found["file_seen_linked"] = session.execute(
                select(func.count()).select_from(FileSeen).where(FileSeen.run_id.is_not(None))).scalar_one()
        return found

    def parent_of(self, run_id: uuid.UUID) -> uuid.UUID | None:
        with self.store.read() as session:
            return session.execute(select(Run.parent_run_id).where(Run.id == run_id)).scalar_one()

    def output(self, run_id: uuid.UUID) -> Path:
        with self.store.read() as session:
            return Path(session.execute(select(Run.output_path).where(Run.id == run_id)).scalar_one())


@pytest.fixture
def history(nbflow_env: dict[str, str], tmp_path: Path) -> History:
    return History(open_store(), tmp_path)


def test_prune_deletes_exactly_the_old_ended_runs_with_their_rows_and_files(history: History) -> None:
    old_ended = [history.add(s, days_ago=100) for s in (S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED)]
    old_live = [history.add(s, days_ago=100) for s in (S.PENDING, S.RUNNING, S.SCHEDULED)]
    recent = [history.add(s, days_ago=10) for s in (S.COMPLETED, S.FAILED)]
    before, old_files = history.counts(), [history.output(r) for r in old_ended]

    summary = prune(history.store, timedelta(days=90), batch=2)

    assert history.present() == set(old_live + recent)
    assert summary.runs == 4 and summary.files == 4 and summary.kept == 0 and summary.batches == 2
    assert summary.rows == {"cell_run": 12, "log": 4, "notification_delivery": 4, "file_seen.run_id": 4,
                            "run_state_event": 4 * 3 - 1}  # PENDING, RUNNING, end (cancelled: no RUNNING)
    after = history.counts()
    assert before["cell_run"] - after["cell_run"] == 12 and after["cell_run"] == 5 * 3
    assert before["log"] - after["log"] == 4 and before["notification_delivery"] - after["notification_delivery"] == 4
    # A file trigger keeps remembering the files it acted on, or it would run them again.
    assert after["file_seen"] == before["file_seen"] and after["file_seen_linked"] == 5
    assert not any(f.exists() for f in old_files)
    for run_id in old_live + recent:
        assert history.output(run_id).is_file()
    flow_dir = history.output(recent[0]).parent
    assert {p.stem for p in flow_dir.iterdir()} == {str(r) for r in old_live + recent}
    assert prune(history.store, timedelta(days=90)).runs == 0  # nothing left to do


def test_keep_failed_and_lineage(history: History) -> None:
    parent_of_live = history.add(S.COMPLETED, days_ago=200)
    live_child = history.add(S.PENDING, days_ago=1, parent=parent_of_live)
    failed = history.add(S.FAILED, days_ago=150)
    after_failed = history.add(S.COMPLETED, days_ago=149, parent=failed)
    grand = history.add(S.COMPLETED, days_ago=148, parent=after_failed)
    chain = [history.add(S.COMPLETED, days_ago=120)]
    chain.append(history.add(S.COMPLETED, days_ago=119, parent=chain[-1]))
    chain.append(history.add(S.CRASHED, days_ago=118, parent=chain[-1]))
    young_child = history.add(S.COMPLETED, days_ago=5, parent=chain[-1])

    summary = prune(history.store, timedelta(days=90), keep_failed=True, batch=3)

    # Kept: the parent of a live run; the failed run and what followed it (the parent stays); the
    # crashed run (keep_failed). Gone: the first two of the chain. The young child keeps its row.
    assert history.present() == {parent_of_live, live_child, failed, after_failed, grand, chain[2], young_child}
    assert summary.runs == 2 and summary.kept == 3
    assert history.parent_of(chain[2]) is None  # its parent was pruned: the link is cleared, the run stays
    assert history.parent_of(young_child) == chain[2] and history.parent_of(live_child) == parent_of_live

    # Once the live run has ended and the failed runs may go, everything old goes, lineage first to last.
    with history.store.write() as session:
        run = states.lock_run(session, live_child)
        states.transition(session, run, S.CANCELLED)
    summary = prune(history.store, timedelta(days=90), batch=2)
    assert history.present() == {live_child, young_child}
    assert summary.runs == 5 and summary.kept == 0
    assert history.parent_of(live_child) is None and history.parent_of(young_child) is None


def test_dry_run_writes_nothing_and_predicts_the_prune(history: History, nbflow_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    runs = [history.add(s, days_ago=100) for s in (S.COMPLETED, S.FAILED, S.RUNNING)]
    runs.append(history.add(S.COMPLETED, days_ago=99, parent=runs[1]))
    before, files = history.counts(), [history.output(r) for r in runs]

    dry = nbflow(nbflow_env, tmp_path, "db", "prune", "--older-than", "90d", "--keep-failed", "--dry-run", "--json")

    assert dry.returncode == 0, dry.stderr
    assert history.counts() == before and all(f.is_file() for f in files)
    predicted = json.loads(dry.stdout)
    assert predicted["dry_run"] is True and predicted["runs"] == 1 and predicted["kept"] == 1

    real = nbflow(nbflow_env, tmp_path, "db", "prune", "--older-than", "90d", "--keep-failed", "--json")
    assert real.returncode == 0, real.stderr
    done = json.loads(real.stdout)
    assert {k: v for k, v in done.items() if k not in ("dry_run", "cutoff")} == \
        {k: v for k, v in predicted.items() if k not in ("dry_run", "cutoff")}
    assert history.present() == set(runs[1:])
    assert [f.is_file() for f in files] == [False, True, True, True]

    text = nbflow(nbflow_env, tmp_path, "db", "prune", "--older-than", "1d")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("deleted 2 runs that ended before ") and "and 2 output notebooks" in text.stdout
    assert history.present() == {runs[2]}


@pytest.mark.parametrize("age, message", [
    ("90", "invalid age '90': give a number and a unit"),
    ("ninety days", "invalid age 'ninety days'"),
    ("-5d", "invalid age '-5d'"),
    ("0d", "invalid age '0d': it must be more than zero"),
])
def test_bad_older_than_is_refused_and_deletes_nothing(sqlite_env: dict[str, str], tmp_path: Path,
                                                       age: str, message: str) -> None:
    history = History(open_store(), tmp_path)
    history.add(S.COMPLETED, days_ago=1000)
    before = history.counts()
    result = nbflow(sqlite_env, tmp_path, "db", "prune", "--older-than", age)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"nbflow: error: {message}"), result.stderr
    assert history.counts() == before
    with pytest.raises(InvalidRetention):
        parse_age(age)


def test_automatic_retention_runs_hourly_on_the_leader_only(sqlite_env: dict[str, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    history = History(open_store(), tmp_path)
    old, young = history.add(S.COMPLETED, days_ago=40), history.add(S.COMPLETED, days_ago=20)

    monkeypatch.delenv("NBFLOW_RETENTION_DAYS", raising=False)
    assert configured_age() is None and not AutoPrune(history.store).tick()  # default: keep everything
    for bad in ("abc", "0", "-3", "nan", "inf", "1e300", "36501"):
        monkeypatch.setenv("NBFLOW_RETENTION_DAYS", bad)
        with pytest.raises(InvalidRetention, match="NBFLOW_RETENTION_DAYS"):
            configured_age()
        assert not AutoPrune(history.store).tick()
    monkeypatch.setenv("NBFLOW_RETENTION_DAYS", "30")
    assert configured_age() == timedelta(days=30)

    follower = AutoPrune(history.store, is_leader=lambda: False)
    assert not follower.tick()
    assert history.present() == {old, young}

    leader = AutoPrune(history.store, is_leader=lambda: True)
    assert leader.tick()
    leader.join(30)
    assert leader.last is not None and leader.last.runs == 1
    assert history.present() == {young}
    history.add(S.COMPLETED, days_ago=50)
    assert not leader.tick()  # within the hour: not again


def test_the_scheduler_loop_applies_retention(sqlite_env: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from nbflow.services.scheduler import Scheduler

    history = History(open_store(), tmp_path)
    old, young = history.add(S.COMPLETED, days_ago=40), history.add(S.FAILED, days_ago=20)
    monkeypatch.setenv("NBFLOW_RETENTION_DAYS", "30")
    Scheduler(history.store, tick=0.1).run(exit_after=0.5)
    deadline = time.monotonic() + 20
    while old in history.present() and time.monotonic() < deadline:  # the prune runs in a thread of its own
        time.sleep(0.05)
    assert history.present() == {young}


@pytest.mark.parametrize("age", ["99999999999999999999d", "36501d"])
def test_ages_beyond_a_century_are_refused(age: str) -> None:
    with pytest.raises(InvalidRetention, match="at most 36500 days"):
        parse_age(age)


def test_a_failed_automatic_prune_is_retried_soon_and_an_outage_said_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The database cannot be opened (a directory where the file should be: SQLite's "unable to open
    database file", an outage): the prune fails, is retried after 60 s then 120 s (not the next hour), and
    the outage is one warning, not a traceback per try."""
    import logging

    (tmp_path / "db").mkdir()
    store = Store(f"sqlite:///{tmp_path / 'db'}")
    monkeypatch.setenv("NBFLOW_RETENTION_DAYS", "30")
    auto = AutoPrune(store)
    delays = []
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            auto._next = 0.0  # as if the retry were due now
            assert auto.tick()
            auto.join(30)
            delays.append(auto._next - time.monotonic())
    assert 55 < delays[0] <= 60 and 115 < delays[1] <= 120, delays
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1 and "automatic retention" in unavailable[0].getMessage()
    assert "Traceback" not in caplog.text and auto.last is None
    store.dispose()
