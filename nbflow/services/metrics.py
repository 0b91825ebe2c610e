"""What ``/metrics`` says of the store: a Prometheus collector that reads the database at scrape time.

Why read the store instead of counting in the process: runs are created, claimed and ended by many
processes (``nbflow serve`` and its ``--api-workers``, ``nbflow worker`` on other machines, ``nbflow run``),
and a scrape reaches one API process. What the database says is the same whichever process answers and
survives a restart, so every process that answers a scrape gives the same numbers. Each read is a few
indexed rows (the counts the database keeps, ``nbflow.core.counts``; the registry of runners; the head of
two indexes), never a scan of the history, and is cached for ``CACHE_SECONDS``, so that several scrapers
or a dashboard refreshing cost one read.

The metrics (docs/observability.md has the table):

* ``nbflow_runs{state}``: runs in each state now (the kept counts).
* ``nbflow_runs_finished_total{flow, state}``: runs ended in each terminal state, per flow, from the kept
  counts. Counter semantics: retention (``nbflow db prune``) and deleting a flow remove ended runs, which
  would make the count fall, and Prometheus reads any fall as a restart of the counter and adds the whole
  count again to ``rate``/``increase``. So this process reports only the rises it sees: a fall is absorbed
  (the counter holds, then rises with the next runs). A restarted server reports the counts as they then
  are, which Prometheus handles as it handles any counter after a restart. Flows beyond the first
  ``MAX_FLOWS`` (by id, so a flow keeps its label) are summed under ``flow="other"``.
* ``nbflow_run_duration_seconds{state}`` and ``nbflow_run_queue_wait_seconds`` (histograms): each
  attempt's time from RUNNING to its end, by the state it ended in (FAILED also for an attempt that is
  then retried), and each attempt's wait from the moment it could start (created, or its
  retry or late slot due) to RUNNING; ``nbflow_schedule_start_delay_seconds``: a scheduled run's wait
  from its slot to RUNNING. They are fed by the state events written since this process started (read
  forward by id: an index range, never the whole table), so they start at zero with the process, as
  any Prometheus histogram does, and their buckets only grow. On PostgreSQL the read stays
  ``PG_LAG_SECONDS`` behind (ids are handed out before commit, so a newer id can commit first). On
  SQLite, if retention deletes the newest events (every run pruned), their ids are handed out again:
  the read follows the table back, and an attempt that ended between the prune and the next scrape
  may go uncounted.
  No flow label: buckets times flows is the cardinality this module is careful about.
* ``nbflow_schedule_lateness_seconds``: how far past due the most overdue active schedule is: 0 while
  the scheduler keeps up; growing when no scheduler runs or it falls behind.
* ``nbflow_oldest_queued_run_age_seconds``: how long the oldest run waiting for a runner has waited
  (PENDING and unclaimed, or SCHEDULED, due and unclaimed).
* ``nbflow_runners``, ``nbflow_runner_slots``, ``nbflow_runner_runs_held``, ``nbflow_runner_free_slots``:
  the live runners (seen within a lease), their slots (``--slots``), the runs they hold, and what is left.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from nbflow.core import counts, states
from nbflow.core.concurrency import occupies_slot
from nbflow.store import Store
from nbflow.store.models import Flow, Run, RunStateEvent, Schedule, Worker, utcnow

CACHE_SECONDS = 5.0
MAX_FLOWS = 1000
OTHER = "other"
PG_LAG_SECONDS = 5.0
EVENTS_PER_READ = 20_000  # a scrape after a long pause reads the backlog over several scrapes
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21_600, 86_400, math.inf)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, math.inf)
_TERMINAL = sorted(states.TERMINAL)


@dataclass
class _Snapshot:
    by_state: dict[str, int]
    finished: dict[tuple[str, str], int]
    runners: int
    slots: int
    held: int
    lateness: float
    oldest_queued: float
    at: float = field(default_factory=time.monotonic)


class StoreCollector(Collector):
    """The store's metrics (see the module docstring). One per API process: it keeps what makes the
    counters and histograms monotonic (the finished counts seen, the event cursor)."""

    def __init__(self, store: Store, lease_seconds: float, *, max_flows: int = MAX_FLOWS,
                 cache_seconds: float = CACHE_SECONDS) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.max_flows = max_flows
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._finished: dict[tuple[str, str], tuple[int, int]] = {}  # series -> (count read, count reported)
        self._cursor: int | None = None  # the last state event read
        self.duration = Histogram("nbflow_run_duration_seconds", "Time from RUNNING to the end of each run "
                                  "that ended since this process started, by end state", ["state"],
                                  buckets=DURATION_BUCKETS, registry=None)
        self.queue_wait = Histogram("nbflow_run_queue_wait_seconds", "Time each attempt waited from when "
                                    "it could start to RUNNING", buckets=WAIT_BUCKETS, registry=None)
        self.start_delay = Histogram("nbflow_schedule_start_delay_seconds", "Time from a scheduled run's "
                                     "slot to RUNNING", buckets=WAIT_BUCKETS, registry=None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # concurrent scrapes: one reads, the others use what it read
            snap = self._snapshot
            if snap is None or time.monotonic() - snap.at >= self.cache_seconds:
                snap = self._snapshot = self._read()
            finished = {key: reported for key, (_, reported) in self._finished.items()}
        runs = GaugeMetricFamily("nbflow_runs", "Runs in each state now (the counts the database keeps)",
                                 labels=["state"])
        for state in states.StateType:
            runs.add_metric([state.value], snap.by_state.get(state.value, 0))
        yield runs
        total = CounterMetricFamily("nbflow_runs_finished", "Runs that ended, by flow and end state "
                                    f"(flows beyond the first {self.max_flows} as flow=\"{OTHER}\")",
                                    labels=["flow", "state"])
        for (flow, state), n in sorted(finished.items()):
            total.add_metric([flow, state], n)
        yield total
        yield from self.duration.collect()
        yield from self.queue_wait.collect()
        yield from self.start_delay.collect()
        yield GaugeMetricFamily("nbflow_schedule_lateness_seconds", "How far past due the most overdue "
                                "active schedule is (0: the scheduler keeps up)", value=snap.lateness)
        yield GaugeMetricFamily("nbflow_oldest_queued_run_age_seconds", "Age of the oldest run waiting for a "
                                "runner (0: none waits)", value=snap.oldest_queued)
        yield GaugeMetricFamily("nbflow_runners", "Live runners (seen within a lease)", value=snap.runners)
        yield GaugeMetricFamily("nbflow_runner_slots", "Slots of the live runners (runs they execute at once)",
                                value=snap.slots)
        yield GaugeMetricFamily("nbflow_runner_runs_held", "Runs the live runners hold (claimed, running, "
                                "or waiting out a retry)", value=snap.held)
        yield GaugeMetricFamily("nbflow_runner_free_slots", "Slots of the live runners not holding a run",
                                value=max(snap.slots - snap.held, 0))

    # -- reading the store ----------------------------------------------------------------------------

    def _read(self) -> _Snapshot:
        now = utcnow()
        with self.store.read() as session:
            by_state = counts.by_state(session)
            per_flow = counts.by_flow_and_state(session, _TERMINAL)
            names = dict(session.execute(select(Flow.id, Flow.name).order_by(Flow.id).limit(self.max_flows)).all())
            cutoff = now - timedelta(seconds=self.lease_seconds)
            runners, slots = session.execute(
                select(func.count(), func.coalesce(func.sum(Worker.slots), 0)).where(Worker.last_seen_at >= cutoff)
            ).one()
            live = select(Worker.id).where(Worker.last_seen_at >= cutoff).scalar_subquery()
            held = session.execute(select(func.count()).select_from(Run)
                                   .where(Run.worker_id.in_(live), occupies_slot())).scalar_one()
            due = session.execute(select(func.min(Schedule.next_fire_at)).where(Schedule.active.is_(True))
                                  ).scalar()
            unclaimed = Run.worker_id.is_(None)
            oldest = min(filter(None, (
                session.execute(select(func.min(Run.created_at)).where(Run.state == states.S.PENDING, unclaimed))
                .scalar(),
                session.execute(select(func.min(Run.expected_start_at))
                                .where(Run.state == states.S.SCHEDULED, unclaimed, Run.expected_start_at <= now))
                .scalar())), default=None)
            self._read_events(session, now)
        finished: dict[tuple[str, str], int] = {}
        for (flow_id, state), n in per_flow.items():
            key = (names.get(flow_id, OTHER), state)
            finished[key] = finished.get(key, 0) + n
        for key in finished.keys() | self._finished.keys():
            count = finished.get(key, 0)
            seen, reported = self._finished.get(key, (count, count))
            self._finished[key] = (count, reported + max(count - seen, 0))
        return _Snapshot(by_state=by_state, finished=finished, runners=int(runners), slots=int(slots),
                         held=int(held), lateness=_seconds(now, due), oldest_queued=_seconds(now, oldest))

    def _read_events(self, session: Any, now: datetime) -> None:
        """Feed the histograms with the RUNNING and end events written since the last read."""
        top = session.execute(select(func.coalesce(func.max(RunStateEvent.id), 0))).scalar_one()
        if self._cursor is None or top < self._cursor:
            # The first scrape: from now on. Or retention deleted the newest events and SQLite hands their
            # ids out again: follow the table back (an attempt that ended since the prune may be missed).
            self._cursor = top
            return
        began = aliased(RunStateEvent)  # the attempt's RUNNING event: through the index on (run_id, id)
        started = (select(func.max(began.at))
                   .where(began.run_id == RunStateEvent.run_id, began.id < RunStateEvent.id,
                          began.to_state == states.S.RUNNING).scalar_subquery())
        query = (select(RunStateEvent.id, RunStateEvent.to_state, RunStateEvent.at, RunStateEvent.attempt,
                        started.label("started"), Run.created_at, Run.expected_start_at, Run.scheduled_for,
                        Run.schedule_id)
                 .join(Run, Run.id == RunStateEvent.run_id)
                 .where(RunStateEvent.id > self._cursor,
                        RunStateEvent.to_state.in_([states.S.RUNNING, *_TERMINAL]))
                 .order_by(RunStateEvent.id).limit(EVENTS_PER_READ))
        if self.store.dialect == "postgresql":
            query = query.where(RunStateEvent.at < now - timedelta(seconds=PG_LAG_SECONDS))
        rows = session.execute(query).all()
        for row in rows:
            if row.to_state == states.S.RUNNING:
                ready = row.expected_start_at if row.attempt > 1 or row.expected_start_at else row.created_at
                if ready is not None and ready <= row.at:  # a later retry's time is not this attempt's
                    self.queue_wait.observe((row.at - ready).total_seconds())
                if row.attempt == 1 and row.scheduled_for is not None and row.schedule_id is not None:
                    self.start_delay.observe(max((row.at - row.scheduled_for).total_seconds(), 0.0))
            elif row.started is not None:
                self.duration.labels(row.to_state).observe(max((row.at - row.started).total_seconds(), 0.0))
        if rows:
            self._cursor = rows[-1].id


def _seconds(now: datetime, since: datetime | None) -> float:
    return max((now - since).total_seconds(), 0.0) if since is not None else 0.0
