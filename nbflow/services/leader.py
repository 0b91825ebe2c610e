"""One leader per housekeeping role, chosen through the database, failing over when it dies.

Why
---
Any number of ``serve``, ``scheduler`` and ``worker`` processes may share one database. Correctness
never depends on a leader: a schedule slot is UNIQUE, a run is claimed under ``SKIP LOCKED``, a
notification delivery is leased. But every process scanning for due schedules, events, expired leases
and old runs would do N times the same work and take N times the same row locks. So each housekeeping
loop runs only in the current holder of its *role*:

* ``SCHEDULER`` (``"scheduler"``): competed for by ``nbflow serve`` and ``nbflow scheduler`` (the
  processes that run ``nbflow.services.scheduler.Scheduler``). Its holder fires due schedules and catch-up
  (``fire_due``), events (``fire_events``), delivers notifications, and runs retention.
* ``REAPER`` (``"reaper"``): competed for by every runner (``nbflow worker`` and the runner inside
  ``nbflow serve``). Its holder reaps runs whose lease ran out (``runner.reap``) and forgets workers that
  stopped beating (``workers.prune``).

Two roles, not one: a deployment may be workers plus a single ``nbflow scheduler``, or ``serve``
processes only; each loop must be led by a process that runs it. A role held by a process that does not
run its loop would stall it.

How: a lease row, not an advisory lock
--------------------------------------
The ``leader`` table holds one row per role: ``holder`` and ``expires_at``. Taking or renewing the
role is one atomic statement, ``INSERT ... ON CONFLICT (role) DO UPDATE ... WHERE holder = me OR
expires_at < now``, which returns a row only when we hold the role. A PostgreSQL advisory lock would
need a session (a connection) pinned for the whole life of the process, breaks behind a transaction
pooler, and does not exist on SQLite; the lease row works on both, survives a database restart, and
shows who leads (``nbflow workers``).

Contract (``Leadership``)
-------------------------
* ``check()`` says whether this process leads the role *now*; call it before each pass of the loop.
  It talks to the database at most every ``lease/4`` seconds (taking or renewing the lease for
  ``lease`` seconds) and otherwise answers from memory, so calling it every tick is cheap.
* A holder believes it leads only until ``3/4`` of a lease after its last successful renewal, while
  others may take over only after a whole lease: a leader that cannot reach the database stops
  working before anyone else starts (with clocks in sync, as leases of runs already require).
* Failover: a holder that dies (SIGKILL, machine gone) is replaced at most ``lease + lease/4`` after its
  last renewal, i.e. within ~1.25 leases of ``NBFLOW_LEASE_SECONDS`` (default 30 s). A holder that stops
  cleanly calls ``resign()`` and another process takes over at its next attempt, within ``lease/4``.
* Work done inside a ``Scheduler.run`` pass (``fire_due``, ``fire_events``, notifications, retention's
  ``AutoPrune.tick``) or a ``Runner.step`` reap is already led: nothing more to do. Code elsewhere may
  hold a ``Leadership`` of its own, or ask ``is_leader(store, role, holder)``, a read that takes nothing.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import Leader, utcnow
from nbflow.store.retry import is_unavailable, report_down, report_up

log = logging.getLogger("nbflow.leader")

SCHEDULER = "scheduler"
REAPER = "reaper"


def try_lead(store: Store, role: str, holder: str, lease_seconds: float, now: datetime | None = None) -> bool:
    """Take ``role`` for ``holder`` if nobody holds it or its lease expired, or renew it if ``holder``
    has it: one atomic statement. True if ``holder`` leads until ``now + lease_seconds``."""
    now = now or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    insert = postgresql.insert if store.dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(Leader).values(role=role, holder=holder, expires_at=expires)
        .on_conflict_do_update(index_elements=[Leader.role], set_={"holder": holder, "expires_at": expires},
                               where=(Leader.holder == holder) | (Leader.expires_at < now))
        .returning(Leader.holder)
    )
    with store.write() as session:
        return session.execute(stmt).scalar_one_or_none() == holder


def is_leader(store: Store, role: str, holder: str) -> bool:
    """Whether ``holder`` holds an unexpired lease on ``role`` right now (a read; takes nothing)."""
    with store.read() as session:
        row = session.get(Leader, role)
        return row is not None and row.holder == holder and row.expires_at > utcnow()


def resign(store: Store, role: str, holder: str) -> None:
    """Give ``role`` up if ``holder`` has it, so that another process takes over without waiting out the lease."""
    with store.write() as session:
        session.execute(delete(Leader).where(Leader.role == role, Leader.holder == holder))


class Leadership:
    """This process's claim on one role; see the module docstring for the contract."""

    def __init__(self, store: Store, role: str, holder: str, lease_seconds: float | None = None) -> None:
        self.store = store
        self.role = role
        self.holder = holder
        self.lease_seconds = lease_seconds if lease_seconds is not None else get_settings().lease_seconds
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._next_try = 0.0  # monotonic: first check() asks the database
        self._leads_until = 0.0  # monotonic

    def check(self) -> bool:
        """Whether to do the role's work now (taking or renewing the lease when due)."""
        started = time.monotonic()
        if started >= self._next_try:
            self._next_try = started + self.lease_seconds / 4
            try:
                won = try_lead(self.store, self.role, self.holder, self.lease_seconds)
            except Exception as exc:  # keep what we believed, which runs out on its own
                if is_unavailable(exc):  # an outage: said once per process (nbflow.store.retry)
                    report_down(self.store, exc, f"the {self.role} lease")
                else:
                    log.exception("could not take or renew the %s lease", self.role)
            else:
                report_up(self.store)
                if won and started >= self._leads_until:
                    log.info("%s now leads %s", self.holder, self.role)
                self._leads_until = started + self.lease_seconds * 3 / 4 if won else 0.0
        return time.monotonic() < self._leads_until

    def resign(self) -> None:
        """Hand the role over now (on a clean stop). Never raises: a failure only delays the failover."""
        self._leads_until = 0.0
        try:
            resign(self.store, self.role, self.holder)
        except Exception as exc:
            if is_unavailable(exc):
                report_down(self.store, exc, f"resigning the {self.role} lease")
            else:
                log.exception("could not resign the %s lease", self.role)
