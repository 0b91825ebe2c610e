"""Schedules: rows in the store fired into runs, one run per (schedule, slot time), whatever happens.

The store is the source of truth. Each schedule keeps its ``next_fire_at``; a scheduler pass
(``fire_due``) reads only the schedules that are due (an indexed query), so adding, pausing or resuming
a schedule takes effect at the next pass of every scheduler, with no restart and no per-schedule job
rebuilt at start-up. APScheduler 3's triggers do the calendar math (cron with time zones and DST,
intervals, one-off dates) through ``get_next_fire_time``; nbflow does not run one APScheduler job per
schedule (adding 10,000 of them one by one takes ~10 s, see DESIGN.md).

Exactly one run per slot: each fired slot inserts a run keyed by ``(schedule_id, scheduled_for)`` under
the UNIQUE constraint ``uq_run_schedule_slot`` with ``INSERT ... ON CONFLICT DO NOTHING``, so a second
scheduler racing for the same slot creates nothing. A pass decides its slots without a lock, then writes
them in chunks (``CHUNK_SLOTS``), earliest first, each chunk one transaction that also advances its
schedules' ``next_fire_at``: the runs of a burst become claimable a few hundred at a time. A chunk
re-reads its schedules (on PostgreSQL ``FOR UPDATE SKIP LOCKED``: schedulers do not wait on each other;
on SQLite the write transaction, ``BEGIN IMMEDIATE``, serialises them) and leaves alone any that another
scheduler fired or a user changed since the pass read it.

Catch-up (slots that came due while no scheduler ran), per schedule:

- ``skip`` (default): fire only the most recent due slot, and only if it is at most
  ``SKIP_TOLERANCE`` seconds (60) old, i.e. the normal "fire on time" case; older missed slots are dropped.
- ``latest``: fire the most recent due slot, however old (a single catch-up run).
- ``all``: fire every missed slot, oldest first, up to ``MAX_CATCH_UP`` (1000, the most recent ones).

``max_lateness`` (seconds), when set, applies to every policy: a slot older than that is never fired.
A run whose slot is more than ``LATE_AFTER`` seconds (10) old when it is created is created
SCHEDULED with the name ``Late`` and ``expected_start_at`` = now (the runner's claim makes it PENDING);
an on-time run is created PENDING. Resuming a paused schedule continues from now: slots that passed
while it was paused are not fired.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import bindparam, func, select, update

from nbflow import states
from nbflow.errors import FlowNotFound, NbflowError, ParameterError, ScheduleError
from nbflow.flows import get_flow, latest_version, sync_version
from nbflow.parameters import validate
from nbflow.store import Store, wake_runners
from nbflow.store.models import Flow, FlowVersion, Schedule, utcnow

log = logging.getLogger("nbflow.scheduler")

CATCH_UP_POLICIES = ("skip", "latest", "all")
SKIP_TOLERANCE = 60.0
LATE_AFTER = 10.0
MAX_CATCH_UP = 1000
# Slots per write transaction of a pass: small enough that the first runs of a burst are claimable within
# tens of milliseconds and SQLite's write lock is released often, large enough that a commit is rare.
CHUNK_SLOTS = 250
# Seconds a scheduler wakes after a slot's time, so that the pass finds it due (timers may fire early).
WAKE_MARGIN = 0.002
AFTER_TIMEOUT = 10.0
_WINDOWS = (60.0, 3600.0, 86400.0, 7 * 86400.0, 31 * 86400.0, 366 * 86400.0, None)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TICK = timedelta(microseconds=1)


# -- triggers ---------------------------------------------------------------------------------------


def parse_interval(text: str | int | float) -> float:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1w"`` or a number of seconds -> seconds (> 0)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
        if not match:
            raise ScheduleError(
                f"invalid interval {text!r}: give a number and a unit, e.g. 30s, 5m, 2h, 1d"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 1:
        raise ScheduleError(f"invalid interval {text!r}: it must be at least 1 second")
    return seconds


def parse_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ScheduleError(f"unknown time zone {name!r} (use an IANA name such as UTC or Europe/Berlin)") from None


def parse_at(text: str, tz: ZoneInfo) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ScheduleError(f"invalid date {text!r}: give an ISO 8601 date and time, e.g. 2026-12-01T09:00") from None
    return when if when.tzinfo else when.replace(tzinfo=tz)


def make_trigger(kind: str, spec: dict[str, Any], timezone: str = "UTC") -> Any:
    """The APScheduler 3 trigger of a schedule: ``cron`` {expr}, ``interval`` {seconds, start},
    ``date`` {at}. Raises ``ScheduleError`` with a clear message."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.date import DateTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    tz = parse_timezone(timezone)
    if kind == "cron":
        expr = str(spec.get("expr", ""))
        try:
            return CronTrigger.from_crontab(crontab_days_as_names(expr), timezone=tz)
        except (ValueError, TypeError, KeyError) as exc:
            raise ScheduleError(f"invalid cron expression {expr!r}: {exc}") from None
    if kind == "interval":
        seconds = parse_interval(spec.get("seconds", 0))
        start = spec.get("start")
        start_date = datetime.fromisoformat(start) if start else None
        return IntervalTrigger(seconds=seconds, start_date=start_date, timezone=tz)
    if kind == "date":
        return DateTrigger(parse_at(str(spec.get("at")), tz), timezone=tz)
    raise ScheduleError(f"unknown schedule kind {kind!r}; kinds: cron, interval, date")


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_days_as_names(expr: str) -> str:
    """Rewrite the day-of-week field of a 5-field crontab with day names.

    In cron, day 0 (and 7) is Sunday; APScheduler 3's ``CronTrigger`` counts 0 as Monday
    (agronholm/apscheduler#286), so ``0 9 * * 1-5`` would fire Tuesday to Saturday. Names mean the
    same to both. Steps are expanded with cron's numbering (``*/2``: sun,tue,thu,sat). Anything this
    does not recognise is left for APScheduler to accept or reject."""
    fields = expr.split()
    if len(fields) != 5:
        return expr
    parts = []
    for part in fields[4].split(","):
        match = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if not match:
            parts.append(part)  # names (MON-FRI) or something APScheduler will reject
            continue
        base, step = match.group(1), int(match.group(2) or 1)
        if base == "*":
            if step == 1:
                parts.append(part)
                continue
            first, last = 0, 6
        else:
            first, _, end = base.partition("-")
            first, last = int(first), int(end or (6 if match.group(2) else first))
        if not (0 <= first <= last <= 7) or step < 1:
            raise ScheduleError(f"invalid cron expression {expr!r}: day of week {part!r} is not within 0-7")
        parts.extend(_DAY_NAMES[day] for day in range(first, last + 1, step))
    fields[4] = ",".join(dict.fromkeys(parts))
    return " ".join(fields)


def _first_at_or_after(trigger: Any, when: datetime) -> datetime | None:
    nxt = trigger.get_next_fire_time(None, when)
    return nxt.astimezone(UTC) if nxt is not None else None


def _next_after(trigger: Any, slot: datetime) -> datetime | None:
    from apscheduler.triggers.date import DateTrigger

    if isinstance(trigger, DateTrigger):
        return None  # a one-off date fires once
    return _first_at_or_after(trigger, slot + _TICK)


def due_slots(trigger: Any, start: datetime, now: datetime, limit: int) -> list[datetime]:
    """The last ``limit`` slots in [start, now], oldest first. The search starts in a small window
    before ``now`` and widens only while it finds fewer than ``limit`` slots, so a long downtime with a
    frequent trigger never walks every missed slot."""
    from apscheduler.triggers.date import DateTrigger

    if isinstance(trigger, DateTrigger):
        at = trigger.run_date.astimezone(UTC)
        return [at] if start <= at <= now else []
    found: deque[datetime] = deque(maxlen=limit)
    for window in _WINDOWS:
        lo = start if window is None else max(start, now - timedelta(seconds=window))
        found.clear()
        slot = _first_at_or_after(trigger, lo)
        while slot is not None and slot <= now:
            found.append(slot)
            slot = _next_after(trigger, slot)
        if len(found) >= limit or lo == start:
            break
    return list(found)


# -- schedule rows ----------------------------------------------------------------------------------


def _spec(cron: str | None, interval: str | float | None, at: str | None, tz: ZoneInfo,
          now: datetime) -> tuple[str, dict[str, Any]]:
    given = [name for name, value in (("cron", cron), ("interval", interval), ("at", at)) if value is not None]
    if len(given) != 1:
        raise ScheduleError(
            "give exactly one of cron, interval or at" + (f" (got {', '.join(given)})" if given else "")
        )
    if cron is not None:
        return "cron", {"expr": " ".join(cron.split())}
    if interval is not None:
        # The anchor of the slots: start + k * interval, stable across restarts and schedulers.
        start = now.replace(microsecond=0) + timedelta(seconds=1)
        return "interval", {"seconds": parse_interval(interval), "start": start.astimezone(tz).isoformat()}
    when = parse_at(str(at), tz)
    if when <= now:
        raise ScheduleError(f"date {at!r} is in the past")
    return "date", {"at": when.isoformat()}


def _check_policy(catch_up: str, max_lateness: float | None) -> None:
    if catch_up not in CATCH_UP_POLICIES:
        raise ScheduleError(f"unknown catch-up policy {catch_up!r}; policies: {', '.join(CATCH_UP_POLICIES)}")
    if max_lateness is not None and max_lateness <= 0:
        raise ScheduleError(f"max lateness must be a positive number of seconds, got {max_lateness}")


def add_schedule(
    store: Store, flow_name: str, *, name: str | None = None, cron: str | None = None,
    interval: str | float | None = None, at: str | None = None, timezone: str = "UTC",
    parameters: dict[str, Any] | None = None, catch_up: str = "skip", max_lateness: float | None = None,
    now: datetime | None = None,
) -> Schedule:
    """Create the schedule ``name`` (default ``default``) of a flow, or replace its definition.

    Everything is checked before anything is written: the trigger, the time zone, the catch-up policy
    and the parameters (against the flow's latest version, as a run request is).
    """
    now = now or utcnow()
    tz = parse_timezone(timezone)
    kind, spec = _spec(cron, interval, at, tz, now)
    trigger = make_trigger(kind, spec, timezone)
    _check_policy(catch_up, max_lateness)
    sched_name = name or "default"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", sched_name):
        raise ScheduleError(f"invalid schedule name {sched_name!r}: letters, digits, '.', '_' and '-' only")
    next_fire = _first_at_or_after(trigger, now)
    with store.write() as session:
        flow = get_flow(session, flow_name)
        version = latest_version(session, flow.id)
        if version is None:
            raise FlowNotFound(f"flow {flow_name!r} has no version to schedule")
        values = validate(version.parameters, parameters or {}, has_parameters_cell=version.has_parameters_cell)
        schedule = _find(session, flow, sched_name, missing_ok=True)
        if schedule is None:
            schedule = Schedule(flow_id=flow.id, name=sched_name, active=True)
            session.add(schedule)
        schedule.trigger, schedule.spec, schedule.timezone = kind, spec, timezone
        schedule.parameters, schedule.catch_up, schedule.max_lateness = values, catch_up, max_lateness
        schedule.next_fire_at = next_fire
        session.flush()
    return schedule


def _find(session: Any, flow: Flow, name: str, *, missing_ok: bool = False) -> Schedule | None:
    schedule = session.execute(
        select(Schedule).where(Schedule.flow_id == flow.id, Schedule.name == name).with_for_update()
    ).scalar_one_or_none()
    if schedule is None and not missing_ok:
        raise ScheduleError(f"flow {flow.name!r} has no schedule named {name!r}")
    return schedule


def pause(store: Store, flow_name: str, name: str = "default") -> Schedule:
    with store.write() as session:
        schedule = _find(session, get_flow(session, flow_name), name)
        assert schedule is not None
        schedule.active = False
    return schedule


def resume(store: Store, flow_name: str, name: str = "default", *, now: datetime | None = None) -> Schedule:
    """Reactivate a schedule from now on: slots that passed while it was paused are not fired."""
    now = now or utcnow()
    with store.write() as session:
        schedule = _find(session, get_flow(session, flow_name), name)
        assert schedule is not None
        trigger = make_trigger(schedule.trigger, schedule.spec, schedule.timezone)
        schedule.active = True
        schedule.next_fire_at = _first_at_or_after(trigger, now)
    return schedule


def remove(store: Store, flow_name: str, name: str = "default") -> None:
    """Delete a schedule; its past runs stay (their ``schedule_id`` becomes NULL)."""
    with store.write() as session:
        schedule = _find(session, get_flow(session, flow_name), name)
        session.delete(schedule)


def list_schedules(store: Store, flow_name: str | None = None) -> list[dict[str, Any]]:
    with store.read() as session:
        query = select(Schedule, Flow.name).join(Flow, Flow.id == Schedule.flow_id).order_by(Flow.name, Schedule.name)
        if flow_name:
            query = query.where(Flow.id == get_flow(session, flow_name).id)
        return [schedule_document(s, f) for s, f in session.execute(query).all()]


def describe(schedule: Schedule) -> str:
    if schedule.trigger == "cron":
        return f"cron '{schedule.spec['expr']}'"
    if schedule.trigger == "interval":
        return f"every {schedule.spec['seconds']:g}s"
    return f"at {schedule.spec['at']}"


def schedule_document(schedule: Schedule, flow_name: str) -> dict[str, Any]:
    return {
        "id": schedule.id, "flow": flow_name, "name": schedule.name, "trigger": schedule.trigger,
        "spec": schedule.spec, "description": describe(schedule), "timezone": schedule.timezone,
        "parameters": schedule.parameters, "active": schedule.active, "catch_up": schedule.catch_up,
        "max_lateness": schedule.max_lateness,
        "next_fire_at": schedule.next_fire_at.isoformat() if schedule.next_fire_at else None,
    }


# -- firing -----------------------------------------------------------------------------------------


def slots_to_fire(schedule: Any, trigger: Any, now: datetime) -> list[datetime]:
    """The due slots of ``schedule`` (a ``Schedule``, or a row with its ``next_fire_at``, ``catch_up``
    and ``max_lateness``) the catch-up policy keeps, oldest first."""
    start = schedule.next_fire_at
    if start is None or start > now:
        return []
    if schedule.max_lateness is not None:
        start = max(start, now - timedelta(seconds=schedule.max_lateness))
    if schedule.catch_up == "skip":
        start = max(start, now - timedelta(seconds=SKIP_TOLERANCE))
    limit = MAX_CATCH_UP if schedule.catch_up == "all" else 1
    return due_slots(trigger, start, now, limit)


# Which notebook file (path, mtime, size, inode) each flow was last synced from, per store URL and flow id:
# an unchanged file is not read and hashed again at every pass (100 flows due each second otherwise cost
# 100 file reads and 100 write transactions a second).
_synced: dict[tuple[str, int], tuple[Any, ...]] = {}


def _file_signature(path: str | None) -> tuple[Any, ...]:
    if not path:
        return (None,)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_mtime_ns, st.st_size, st.st_ino)


def _sync_versions(store: Store, flow_names: set[str]) -> None:
    """Pick up edits of the flows' notebook files before their runs are created (as a run request does);
    a flow whose file is unreadable runs its last stored version. A file unchanged since this process
    last synced it is not read again."""
    if not flow_names:
        return
    with store.read() as session:
        flows = session.execute(select(Flow.id, Flow.name, Flow.source_path).where(Flow.name.in_(flow_names))).all()
    for flow_id, name, path in flows:
        key, signature = (store.url, flow_id), _file_signature(path)
        if _synced.get(key) == signature:
            continue
        try:
            sync_version(store, name)
        except NbflowError as exc:
            log.warning("flow %s: running its last stored version (%s)", name, exc)
            continue
        _synced[key] = signature


@functools.lru_cache(maxsize=16384)
def _trigger(kind: str, spec: str, timezone: str) -> Any:
    """``make_trigger`` of a stored definition, built once: many schedules share one (``0 * * * *``), and
    a trigger is only read (``get_next_fire_time``), never changed."""
    return make_trigger(kind, json.loads(spec), timezone)


_kernels: dict[tuple[str, int, str | None], str] = {}  # versions never change: neither does their kernel


@dataclass
class _Target:
    """What the scheduled runs of one flow are made of in a pass: ``template`` is ``runs.new_run_values``'
    run of the flow's latest version (its retries, timeouts, kernel, output path); each slot's row is a
    copy with its own id, output path, slot and parameters. None: its slots are skipped (flow paused, or
    no version)."""

    flow: Flow
    template: dict[str, Any] | None
    version: FlowVersion | None

    def run_row(self, run_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
        assert self.template is not None
        path = self.template["output_path"].replace(str(self.template["id"]), str(run_id))
        return {**self.template, "id": run_id, "output_path": path, **fields}


def _targets(store: Store, flow_ids: set[int]) -> dict[int, _Target]:
    """The flows of a pass, their notebook edits picked up, with their latest versions: three queries
    for any number of flows, not two per schedule."""
    from nbflow.runs import new_run_values, stored_kernel

    with store.read() as session:
        names = set(session.execute(select(Flow.name).where(Flow.id.in_(flow_ids))).scalars())
    _sync_versions(store, names)
    with store.read() as session:
        flows = {f.id: f for f in session.execute(select(Flow).where(Flow.id.in_(flow_ids))).scalars()}
        newest = (select(FlowVersion.flow_id, func.max(FlowVersion.version).label("version"))
                  .where(FlowVersion.flow_id.in_(flow_ids)).group_by(FlowVersion.flow_id).subquery())
        versions = {v.flow_id: v for v in session.execute(select(FlowVersion).join(
            newest, (FlowVersion.flow_id == newest.c.flow_id) & (FlowVersion.version == newest.c.version))).scalars()}
    targets = {}
    for flow_id, flow in flows.items():
        version = versions.get(flow_id)
        if flow.paused or version is None:  # paused: its slots are skipped
            targets[flow_id] = _Target(flow, None, version)
            continue
        kernel_key = (store.url, version.id, flow.kernel_name)
        if kernel_key not in _kernels:  # parsing the stored notebook for its kernelspec: once per version
            _kernels[kernel_key] = stored_kernel(flow, version)
        template = new_run_values(flow, version, {}, _kernels[kernel_key], trigger="schedule")
        if str(template["id"]) not in template["output_path"]:  # a path not named by the run: one per run
            raise NbflowError(f"run output path {template['output_path']!r} does not name its run")
        targets[flow_id] = _Target(flow, template, version)
    return targets


@dataclass
class _Plan:
    """One due schedule's part of a pass, decided before any write: the slots to fire and what its row
    becomes. ``seen`` is the row as read; a chunk applies the plan only if the row is still that."""

    schedule_id: int
    seen: tuple[Any, ...]
    slots: list[datetime]
    next_fire_at: datetime | None
    active: bool = True
    target: _Target | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> datetime:
        return self.slots[0] if self.slots else self.seen[0]


_DUE_COLUMNS = (Schedule.id, Schedule.flow_id, Schedule.trigger, Schedule.spec, Schedule.timezone,
                Schedule.parameters, Schedule.catch_up, Schedule.max_lateness, Schedule.next_fire_at,
                Schedule.active, Schedule.updated_at)


def _plans(rows: list[Any], targets: dict[int, _Target], now: datetime) -> list[_Plan]:
    """Decide every due schedule's slots and next fire time. Schedules sharing a definition (and, for
    slots, a ``next_fire_at``) share the calendar math: a burst of 5,000 ``0 * * * *`` schedules computes
    it once."""
    slots_memo: dict[tuple[Any, ...], list[datetime]] = {}
    next_memo: dict[tuple[str, str, str], datetime | None] = {}
    values_memo: dict[tuple[int, str], dict[str, Any] | None] = {}
    plans = []
    for row in rows:
        seen = (row.next_fire_at, row.active, row.updated_at)
        key = (row.trigger, json.dumps(row.spec, sort_keys=True), row.timezone)
        try:
            trigger = _trigger(*key)
        except ScheduleError as exc:  # a stored definition that no longer works (tz data changed)
            log.error("schedule %s: %s; paused", row.id, exc)
            plans.append(_Plan(row.id, seen, [], row.next_fire_at, active=False))
            continue
        if key not in next_memo:
            next_memo[key] = _first_at_or_after(trigger, now + _TICK) if row.trigger != "date" else None
        plan = _Plan(row.id, seen, [], next_memo[key])
        plans.append(plan)
        target = targets.get(row.flow_id)
        if target is None or target.template is None or target.version is None:
            continue  # flow gone, paused, or without a version: the slots are skipped
        slot_key = (*key, row.next_fire_at, row.catch_up, row.max_lateness)
        if slot_key not in slots_memo:
            slots_memo[slot_key] = slots_to_fire(row, trigger, now)
        if not slots_memo[slot_key]:
            continue
        params_key = (target.version.id, json.dumps(row.parameters or {}, sort_keys=True))
        if params_key not in values_memo:
            try:
                values_memo[params_key] = validate(target.version.parameters, row.parameters or {},
                                                   has_parameters_cell=target.version.has_parameters_cell)
            except ParameterError as exc:
                log.error("schedule %s of flow %s: its parameters no longer fit the notebook (%s); no run created",
                          row.id, target.flow.name, exc)
                values_memo[params_key] = None
        values = values_memo[params_key]
        if values is not None:
            plan.slots, plan.target, plan.parameters = slots_memo[slot_key], target, values
    plans.sort(key=lambda p: (p.first, p.schedule_id))  # earliest slots first
    return plans


def _chunks(plans: list[_Plan], size: int) -> Iterator[list[_Plan]]:
    chunk: list[_Plan] = []
    weight = 0
    for plan in plans:
        chunk.append(plan)
        weight += max(len(plan.slots), 1)
        if weight >= size:
            yield chunk
            chunk, weight = [], 0
    if chunk:
        yield chunk


def _commit_chunk(store: Store, chunk: list[_Plan], now: datetime) -> list[uuid.UUID]:
    """Apply the plans of ``chunk`` in one transaction: their runs, the runs' first state events, and the
    schedules' next fire times, visible together or not at all.

    Three statements whatever the chunk's size: the runs (one executemany; psycopg pipelines it, and
    ``RETURNING`` would make SQLAlchemy send one huge multi-row ``VALUES`` that psycopg re-parses, ~2x
    slower on PostgreSQL), their events (``INSERT ... SELECT`` from the runs that exist, ``RETURNING``
    the ids created: a slot that had its run already has no row with this pass's id), the schedules."""
    from nbflow.runs import insert_runs_skipping_conflicts

    with store.write() as session:
        conn = session.connection()
        current = {r.id: (r.next_fire_at, r.active, r.updated_at) for r in conn.execute(
            select(Schedule.id, Schedule.next_fire_at, Schedule.active, Schedule.updated_at)
            .where(Schedule.id.in_([p.schedule_id for p in chunk])).with_for_update(skip_locked=True))}
        # A schedule another scheduler holds (skipped lock) or changed since the pass read it (fired, edited,
        # paused) is left to the next pass, which reads it afresh.
        mine = [p for p in chunk if current.get(p.schedule_id) == p.seen]
        if not mine:
            return []
        stamp = utcnow()
        rows = []
        for plan in mine:
            for slot in plan.slots:
                assert plan.target is not None
                late = (now - slot).total_seconds() > LATE_AFTER
                state = states.initial_values(states.S.SCHEDULED if late else states.S.PENDING,
                                              name="Late" if late else None,
                                              message=f"scheduled for {slot.isoformat()}")
                rows.append(plan.target.run_row(
                    uuid.uuid4(), schedule_id=plan.schedule_id, scheduled_for=slot, parameters=plan.parameters,
                    expected_start_at=now if late else slot, created_at=stamp, **state))
        created: list[uuid.UUID] = []
        if rows:
            rows.sort(key=lambda r: (r["scheduled_for"], r["schedule_id"]))  # one lock order for every racer
            conn.execute(insert_runs_skipping_conflicts(store.dialect, "schedule_id", "scheduled_for"), rows)
            created = list(conn.execute(states.insert_initial_events([r["id"] for r in rows])).scalars())
        if created:
            wake_runners(session)
        conn.execute(
            update(Schedule.__table__).where(Schedule.__table__.c.id == bindparam("b_id"))
            .values(next_fire_at=bindparam("b_next"), active=bindparam("b_active")),
            [{"b_id": p.schedule_id, "b_next": p.next_fire_at, "b_active": p.active} for p in mine])
    return created


def fire_due(store: Store, now: datetime | None = None) -> list[Any]:
    """One scheduler pass: create the runs of every due slot of every active schedule; return their ids.

    Safe to call from any number of threads, processes and machines at once: each slot gets one run.

    The pass reads the due schedules and decides everything (slots, parameters, next fire times) without
    holding a lock, then writes in chunks of about ``CHUNK_SLOTS`` slots, earliest first, each its own
    transaction: a burst of thousands of slots on a minute boundary becomes claimable chunk by chunk
    instead of all at the end, and SQLite's write lock is never held for long. Runs and their first
    state events are inserted with Core, a few statements per chunk (``INSERT ... ON CONFLICT DO
    NOTHING`` on the slot key), not one ORM flush and SAVEPOINT per run (~12 ms per run).
    """
    now = now or utcnow()
    with store.read() as session:
        rows = session.execute(select(*_DUE_COLUMNS).where(Schedule.active.is_(True), Schedule.next_fire_at <= now)
                               .order_by(Schedule.next_fire_at, Schedule.id)).all()
    if not rows:
        return []
    targets = _targets(store, {row.flow_id for row in rows})
    created: list[Any] = []
    for chunk in _chunks(_plans(rows, targets, now), CHUNK_SLOTS):
        created.extend(_commit_chunk(store, chunk, now))
    return created


def next_due(store: Store) -> datetime | None:
    """The earliest ``next_fire_at`` of an active schedule (one index seek), so that a scheduler wakes
    when a slot comes due rather than up to a tick later."""
    with store.read() as session:
        return session.execute(
            select(Schedule.next_fire_at).where(Schedule.active.is_(True), Schedule.next_fire_at.is_not(None))
            .order_by(Schedule.next_fire_at).limit(1)).scalar_one_or_none()


class Scheduler:
    """Calls ``fire_due``, ``nbflow.events.fire_events`` (pipelines, file arrivals) and
    ``nbflow.notify.deliver_notifications`` every ``tick`` seconds, and as soon as a schedule's next slot
    comes due, in a thread of its own until ``stop`` is set.

    Any number of schedulers may run against one database; they never create a run twice. Only the one
    leading the ``scheduler`` role (``nbflow.leader``) does the passes, so N schedulers do not repeat the
    same scans; the others stand by and take over within ~1.25 leases if it dies. ``holder`` names this
    scheduler in the ``leader`` table (``nbflow serve`` passes its runner's worker id).
    """

    def __init__(self, store: Store, *, tick: float = 1.0,
                 on_fire: Callable[[list[Any]], None] | None = None, holder: str | None = None) -> None:
        from nbflow.leader import SCHEDULER, Leadership
        from nbflow.runner import new_worker_id

        if tick <= 0:
            raise ValueError("tick must be positive")
        self.store = store
        self.tick = tick
        self.on_fire = on_fire
        self.leadership = Leadership(store, SCHEDULER, holder or new_worker_id("scheduler"))
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, *, exit_after: float | None = None, after: Callable[[], bool] | None = None) -> None:
        """Loop in the calling thread until ``stop`` is set (or ``exit_after`` seconds have passed).

        ``after``: wait until it returns true (at most ``AFTER_TIMEOUT`` seconds) before the first pass.
        ``nbflow serve`` passes "the API has started": a first pass over 10,000 schedules takes the GIL for
        a while, and the API's start-up should not wait for it."""
        from nbflow.events import fire_events
        from nbflow.notify import deliver_notifications
        from nbflow.retention import AutoPrune

        if after is not None:
            waited = time.monotonic() + AFTER_TIMEOUT
            while not after() and time.monotonic() < waited and not self.stop.wait(0.01):
                pass
        deadline = time.monotonic() + exit_after if exit_after is not None else None
        retention = AutoPrune(self.store)  # NBFLOW_RETENTION_DAYS, hourly, in a thread of its own
        while not self.stop.is_set():
            wait = self.tick
            try:
                if self.leadership.check():  # else another scheduler leads: stand by
                    started = utcnow()
                    ids = fire_due(self.store, started) + fire_events(self.store)
                    if ids and self.on_fire:
                        self.on_fire(ids)
                    deliver_notifications(self.store, wait=False)  # posts in threads of its own: never blocks
                    retention.tick()
                    wait = self._until(next_due(self.store), started)
            except Exception:  # a database hiccup must not end the scheduler: log and try next tick
                log.exception("scheduler pass failed")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            self.stop.wait(wait)
        self.leadership.resign()  # a clean stop hands the role over without waiting out the lease

    def _until(self, soonest: datetime | None, started: datetime) -> float:
        """Seconds to wait before the next pass: until the earliest slot comes due (slots fall on whole
        seconds, so a pass at the tick's own rhythm would fire them up to a tick late), at most a tick (new
        schedules, events, notifications). A slot that was due at the start of the pass yet not advanced by
        it (its schedule locked by another scheduler, or changed meanwhile) waits a tick, not a busy loop."""
        if soonest is None or soonest <= started:
            return self.tick
        return min(self.tick, max((soonest - utcnow()).total_seconds(), 0.0) + WAKE_MARGIN)

    def start(self, *, after: Callable[[], bool] | None = None) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, kwargs={"after": after}, name="nbflow-scheduler",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
