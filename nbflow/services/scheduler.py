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

- ``skip`` (default): fire every due slot at most ``skip_tolerance()`` old (60 s, or 1.5 leases if
  longer), i.e. the normal "fire on time" case, and every slot of a failover, restart or outage shorter
  than that; older missed slots are dropped (scheduling was down: Airflow's ``catchup=False``).
- ``latest``: fire the most recent due slot, however old (a single catch-up run).
- ``all``: fire every missed slot, oldest first, up to ``MAX_CATCH_UP`` (1000, the most recent ones).

``max_lateness`` (seconds), when set, applies to every policy: a slot older than that is never fired.
A run whose slot is more than ``LATE_AFTER`` seconds (10) old when it is created is created
SCHEDULED with the name ``Late`` and ``expected_start_at`` = now (the runner's claim makes it PENDING);
an on-time run is created PENDING. Resuming a paused schedule continues from now: slots that passed
while it was paused are not fired. Adding a schedule again with the same slots keeps its next slot (its
backlog) and, unless a new one is given, its catch-up policy (``add_schedule``).

Nothing stops the loop: a database outage is waited out (``nbflow.store.retry``: one line when it goes,
one when it is back), and a row that cannot be fired is paused with its reason in ``schedule.error``
while the pass goes on with the others (``_plans``, ``_commit_or_isolate``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
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

from sqlalchemy import Text, bindparam, cast, delete, func, select, update

from nbflow import checks
from nbflow.checks import number
from nbflow.core import states
from nbflow.core.flows import get_flow, latest_version, sync_versions
from nbflow.core.parameters import validate
from nbflow.errors import FlowNotFound, NbflowError, ParameterError, ScheduleError, one_line
from nbflow.store import Store, wake_runners
from nbflow.store.models import Flow, FlowVersion, Schedule, utcnow
from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up

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
# Lengths of what a user types (the API schema states the same): a cron expression, a time zone name
# (the longest IANA name has 32 characters), an ISO date, an interval such as "90m".
MAX_CRON_LENGTH = 200
MAX_TIMEZONE_LENGTH = 64
MAX_AT_LENGTH = 100
MAX_INTERVAL_TEXT = 40
_TICK = timedelta(microseconds=1)


# -- triggers ---------------------------------------------------------------------------------------


def parse_interval(text: str | int | float) -> float:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1w"`` or a number of seconds -> seconds, from 1 s to a
    year (``checks.MAX_SECONDS``): ``1e300``, NaN or infinity would overflow the trigger's date math in
    every scheduler pass, so they are refused here, at every door."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(number(text, field="interval (seconds)", error=ScheduleError, minimum=1))
    if not isinstance(text, str) or len(text) > MAX_INTERVAL_TEXT:
        shown = text if not isinstance(text, str) else text[:MAX_INTERVAL_TEXT] + "..."
        raise ScheduleError(f"invalid interval {shown!r}: give a number and a unit, e.g. 30s, 5m, 2h, 1d")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ScheduleError(f"invalid interval {text!r}: give a number and a unit, e.g. 30s, 5m, 2h, 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return float(number(seconds, field=f"interval {text.strip()!r} in seconds", error=ScheduleError, minimum=1))


def parse_timezone(name: str) -> ZoneInfo:
    checks.text(name, field="time zone", error=ScheduleError, max_length=MAX_TIMEZONE_LENGTH)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ScheduleError(f"unknown time zone {name!r} (use an IANA name such as UTC or Europe/Berlin)") from None


def parse_at(text: str, tz: ZoneInfo) -> datetime:
    checks.text(text, field="date", error=ScheduleError, max_length=MAX_AT_LENGTH)
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ScheduleError(f"invalid date {text!r}: give an ISO 8601 date and time, e.g. 2026-12-01T09:00") from None
    when = when if when.tzinfo else when.replace(tzinfo=tz)
    try:  # 9999-12-31T23:00-05:00 is a valid ISO date that no UTC clock can hold
        when.astimezone(UTC) + timedelta(days=1)
    except OverflowError:
        raise ScheduleError(f"invalid date {text!r}: out of range") from None
    return when


def make_trigger(kind: str, spec: dict[str, Any], timezone: str = "UTC") -> Any:
    """The APScheduler 3 trigger of a schedule: ``cron`` {expr}, ``interval`` {seconds, start},
    ``date`` {at}. Raises ``ScheduleError`` with a clear message, also for a stored definition that an
    old version wrote or someone edited (not a dict, a bad anchor, a value out of bounds)."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.date import DateTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    tz = parse_timezone(timezone)
    if not isinstance(spec, dict):
        raise ScheduleError(f"invalid {kind} schedule definition {spec!r}: not an object")
    if kind == "cron":
        expr = checks.text(spec.get("expr", ""), field="cron expression", error=ScheduleError,
                           max_length=MAX_CRON_LENGTH)
        try:
            return CronTrigger.from_crontab(crontab_days_as_names(expr), timezone=tz)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise ScheduleError(f"invalid cron expression {expr!r}: {exc}") from None
    if kind == "interval":
        seconds = parse_interval(spec.get("seconds", 0))
        start = spec.get("start")
        try:
            start_date = datetime.fromisoformat(start) if start else None
            return IntervalTrigger(seconds=seconds, start_date=start_date, timezone=tz)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ScheduleError(f"invalid interval anchor {start!r}: {exc}") from None
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
        checks.text(cron, field="cron expression", error=ScheduleError, max_length=MAX_CRON_LENGTH)
        return "cron", {"expr": " ".join(cron.split())}
    if interval is not None:
        # The anchor of the slots: start + k * interval, stable across restarts and schedulers.
        start = now.replace(microsecond=0) + timedelta(seconds=1)
        return "interval", {"seconds": parse_interval(interval), "start": start.astimezone(tz).isoformat()}
    return "date", {"at": parse_at(at if isinstance(at, str) else str(at), tz).isoformat()}


def _check_policy(catch_up: Any, max_lateness: Any) -> None:
    if not isinstance(catch_up, str) or catch_up not in CATCH_UP_POLICIES:
        raise ScheduleError(f"unknown catch-up policy {str(catch_up)[:40]!r}; "
                            f"policies: {', '.join(CATCH_UP_POLICIES)}")
    if max_lateness is not None:
        number(max_lateness, field="max lateness (seconds)", error=ScheduleError)
        if max_lateness <= 0:
            raise ScheduleError(f"max lateness must be a positive number of seconds, got {max_lateness}")


@dataclass
class _Stored:
    """A schedule row as stored, read column by column so that a definition an old version wrote (not
    JSON, not an object) still reads: ``spec`` is None when it does not decode."""

    id: int
    trigger: str
    spec: dict[str, Any] | None
    timezone: str
    catch_up: str
    max_lateness: float | None
    next_fire_at: datetime | None
    active: bool
    error: str | None


def _decode(raw: Any) -> Any:
    """A JSON column read as text (``cast(..., Text)``) -> its value; ``ValueError`` when it is not JSON."""
    if raw is None or not isinstance(raw, str):
        return raw
    return json.loads(raw)


def _decoded_object(raw: Any) -> dict[str, Any] | None:
    try:
        value = _decode(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _stored(session: Any, flow: Flow, name: str, *, missing_ok: bool = False) -> _Stored | None:
    row = session.execute(
        select(Schedule.id, Schedule.trigger, cast(Schedule.spec, Text), Schedule.timezone, Schedule.catch_up,
               Schedule.max_lateness, Schedule.next_fire_at, Schedule.active, Schedule.error)
        .where(Schedule.flow_id == flow.id, Schedule.name == name).with_for_update()
    ).one_or_none()
    if row is None:
        if missing_ok:
            return None
        raise ScheduleError(f"flow {flow.name!r} has no schedule named {name!r}")
    return _Stored(row[0], row[1], _decoded_object(row[2]), *row[3:])


def _same_timing(stored: _Stored, kind: str, spec: dict[str, Any], timezone: str) -> bool:
    """Whether a new definition has the same slots as the stored one: same kind, zone and spec (for an
    interval, the same length: its anchor is kept), and the stored one still works."""
    if stored.spec is None or stored.trigger != kind or stored.timezone != timezone:
        return False
    if kind == "interval":
        if stored.spec.get("seconds") != spec["seconds"] or not stored.spec.get("start"):
            return False
    elif stored.spec != spec:
        return False
    try:
        make_trigger(stored.trigger, stored.spec, stored.timezone)
    except ScheduleError:
        return False
    return True


def add_schedule(
    store: Store, flow_name: str, *, name: str | None = None, cron: str | None = None,
    interval: str | float | None = None, at: str | None = None, timezone: str = "UTC",
    parameters: dict[str, Any] | None = None, catch_up: str | None = None, max_lateness: float | None = None,
    now: datetime | None = None,
) -> Schedule:
    """Create the schedule ``name`` (default ``default``) of a flow, or replace its definition.

    Everything is checked before anything is written: the trigger, the time zone, the catch-up policy
    and the parameters (against the flow's latest version, as a run request is).

    Adding a schedule again (a deploy re-running ``nbflow register --schedule``) must not lose work:

    - Same slots (same cron expression and zone, same interval length, same date): the schedule keeps
      its next slot, so slots missed meanwhile still fire under its catch-up policy, and an interval
      keeps its anchor. A one-off date that already fired does not fire again.
    - The catch-up policy (``catch_up`` with ``max_lateness``) is kept unless one is given: ``catch_up``
      sets both (``max_lateness`` None clears it), ``max_lateness`` alone changes only the bound. A new
      schedule defaults to ``skip``.
    - Parameters are what is given (none: the notebook's defaults).
    - A schedule the scheduler paused for an error (``error``) is active again, its error cleared.
    """
    now = now or utcnow()
    tz = parse_timezone(timezone)
    kind, spec = _spec(cron, interval, at, tz, now)
    trigger = make_trigger(kind, spec, timezone)
    if catch_up is not None or max_lateness is not None:
        _check_policy(catch_up or "skip", max_lateness)
    sched_name = name or "default"
    if not isinstance(sched_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", sched_name):
        raise ScheduleError(f"invalid schedule name {str(sched_name)[:200]!r}: "
                            "letters, digits, '.', '_' and '-' only")
    with store.write() as session:
        flow = get_flow(session, flow_name)
        version = latest_version(session, flow.id)
        if version is None:
            raise FlowNotFound(f"flow {flow_name!r} has no version to schedule")
        values = validate(version.parameters, parameters or {}, has_parameters_cell=version.has_parameters_cell)
        stored = _stored(session, flow, sched_name, missing_ok=True)
        same = stored is not None and _same_timing(stored, kind, spec, timezone)
        if same and kind == "interval":
            assert stored is not None and stored.spec is not None
            spec = {**spec, "start": stored.spec["start"]}
        if not same and kind == "date" and trigger.run_date <= now:
            raise ScheduleError(f"date {at!r} is in the past")
        kept_policy = (stored.catch_up, stored.max_lateness) if stored is not None else ("skip", None)
        try:
            _check_policy(*kept_policy)
        except ScheduleError:  # an old row's policy that no longer reads: the default
            kept_policy = ("skip", None)
        if catch_up is not None:
            policy = (catch_up, max_lateness)
        elif max_lateness is not None:
            policy = (kept_policy[0], max_lateness)
        else:
            policy = kept_policy
        fields = {"trigger": kind, "spec": spec, "timezone": timezone, "parameters": values,
                  "catch_up": policy[0], "max_lateness": policy[1], "error": None,
                  "next_fire_at": stored.next_fire_at if same and stored is not None
                  and (stored.next_fire_at is not None or kind == "date") else _first_at_or_after(trigger, now)}
        if stored is None:
            schedule = Schedule(flow_id=flow.id, name=sched_name, active=True, **fields)
            session.add(schedule)
            session.flush()
            return schedule
        if stored.error is not None and not stored.active:
            fields["active"] = True  # paused by the scheduler for its error: adding it again is the fix
        session.execute(update(Schedule).where(Schedule.id == stored.id).values(**fields))
        found = session.get(Schedule, stored.id)
        assert found is not None
        return found


def pause(store: Store, flow_name: str, name: str = "default") -> None:
    with store.write() as session:
        stored = _stored(session, get_flow(session, flow_name), name)
        assert stored is not None
        session.execute(update(Schedule).where(Schedule.id == stored.id).values(active=False))


def resume(store: Store, flow_name: str, name: str = "default", *, now: datetime | None = None) -> Schedule:
    """Reactivate a schedule from now on: slots that passed while it was paused are not fired. A schedule
    whose stored definition no longer works stays paused, with a message saying to add it again."""
    now = now or utcnow()
    with store.write() as session:
        stored = _stored(session, get_flow(session, flow_name), name)
        assert stored is not None
        if stored.spec is None:
            raise ScheduleError(f"schedule {flow_name}/{name} cannot be resumed: its stored definition is not "
                                "valid; add it again (`nbflow schedule add`)")
        try:
            trigger = make_trigger(stored.trigger, stored.spec, stored.timezone)
        except ScheduleError as exc:
            raise ScheduleError(f"schedule {flow_name}/{name} cannot be resumed: {exc}; add it again "
                                "(`nbflow schedule add`)") from None
        session.execute(update(Schedule).where(Schedule.id == stored.id)
                        .values(active=True, next_fire_at=_first_at_or_after(trigger, now), error=None))
        found = session.get(Schedule, stored.id)
        assert found is not None
        return found


def remove(store: Store, flow_name: str, name: str = "default") -> None:
    """Delete a schedule; its past runs stay (their ``schedule_id`` becomes NULL)."""
    with store.write() as session:
        stored = _stored(session, get_flow(session, flow_name), name)
        assert stored is not None
        session.execute(delete(Schedule).where(Schedule.id == stored.id))


_LIST_COLUMNS = (Schedule.id, Flow.name, Schedule.name, Schedule.trigger, cast(Schedule.spec, Text),
                 Schedule.timezone, cast(Schedule.parameters, Text), Schedule.active, Schedule.catch_up,
                 Schedule.max_lateness, Schedule.next_fire_at, Schedule.error)


def list_schedules(store: Store, flow_name: str | None = None) -> list[dict[str, Any]]:
    """Every schedule (of one flow), as documents. Read column by column: a row whose stored JSON does not
    decode is listed with its error, never breaks the listing."""
    with store.read() as session:
        return schedule_documents(session, [get_flow(session, flow_name).id] if flow_name else None)


def schedule_documents(session: Any, flow_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The documents of the schedules of ``flow_ids`` (all if None), by flow and schedule name, in the
    caller's session; as robust as ``list_schedules``."""
    query = select(*_LIST_COLUMNS).join(Flow, Flow.id == Schedule.flow_id).order_by(Flow.name, Schedule.name)
    if flow_ids is not None:
        query = query.where(Schedule.flow_id.in_(flow_ids))
    return [_row_document(row) for row in session.execute(query).all()]


def _row_document(row: Any) -> dict[str, Any]:
    (id_, flow_name, name, kind, spec_text, timezone, params_text, active, catch_up, max_lateness, next_fire_at,
     error) = row
    spec, parameters = _decoded_object(spec_text), _decoded_object(params_text)
    if spec is None and error is None:
        error = "its stored definition is not a valid JSON object; add the schedule again"
    if isinstance(max_lateness, float) and not math.isfinite(max_lateness):  # JSON has no NaN: never 5xx
        max_lateness = None
    return {
        "id": id_, "flow": flow_name, "name": name, "trigger": kind, "spec": spec or {},
        "description": _describe(kind, spec), "timezone": timezone, "parameters": parameters or {},
        "active": active, "catch_up": catch_up, "max_lateness": max_lateness,
        "next_fire_at": next_fire_at.isoformat() if next_fire_at else None, "error": error,
    }


def _describe(kind: str, spec: dict[str, Any] | None) -> str:
    try:
        if kind == "cron":
            return f"cron '{spec['expr']}'"  # type: ignore[index]
        if kind == "interval":
            return f"every {float(spec['seconds']):g}s"  # type: ignore[index]
        if kind == "date":
            return f"at {spec['at']}"  # type: ignore[index]
    except (KeyError, TypeError, ValueError, OverflowError):
        pass
    return f"{kind} (invalid definition)"


def describe(schedule: Schedule) -> str:
    return _describe(schedule.trigger, schedule.spec)


def schedule_document(schedule: Schedule, flow_name: str) -> dict[str, Any]:
    return {
        "id": schedule.id, "flow": flow_name, "name": schedule.name, "trigger": schedule.trigger,
        "spec": schedule.spec, "description": describe(schedule), "timezone": schedule.timezone,
        "parameters": schedule.parameters, "active": schedule.active, "catch_up": schedule.catch_up,
        "max_lateness": schedule.max_lateness,
        "next_fire_at": schedule.next_fire_at.isoformat() if schedule.next_fire_at else None,
        "error": schedule.error,
    }


# -- firing -----------------------------------------------------------------------------------------


def slots_to_fire(schedule: Any, trigger: Any, now: datetime, tolerance: float | None = None) -> list[datetime]:
    """The due slots of ``schedule`` (a ``Schedule``, or a row with its ``next_fire_at``, ``catch_up``
    and ``max_lateness``) the catch-up policy keeps, oldest first. ``tolerance``: ``skip_tolerance()``."""
    start = schedule.next_fire_at
    if start is None or start > now:
        return []
    if schedule.max_lateness is not None:
        start = max(start, now - timedelta(seconds=schedule.max_lateness))
    if schedule.catch_up == "skip":
        start = max(start, now - timedelta(seconds=skip_tolerance() if tolerance is None else tolerance))
    limit = 1 if schedule.catch_up == "latest" else MAX_CATCH_UP
    return due_slots(trigger, start, now, limit)


def skip_tolerance() -> float:
    """How old a missed slot may be and still fire under ``skip``: ``SKIP_TOLERANCE`` (60 s), or 1.5 leases
    (``NBFLOW_LEASE_SECONDS``) if that is longer. A failover between schedulers leaves a gap of at most
    1.25 leases plus a tick (``nbflow.services.leader``), so every slot of that gap is still fired by the new
    leader: a failover, a quick restart or a short database outage is not downtime of scheduling."""
    from nbflow.settings import get_settings

    return max(SKIP_TOLERANCE, 1.5 * get_settings().lease_seconds)


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
    error: str | None = None

    def run_row(self, run_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
        assert self.template is not None
        path = self.template["output_path"].replace(str(self.template["id"]), str(run_id))
        return {**self.template, "id": run_id, "output_path": path, **fields}


def _targets(store: Store, flow_ids: set[int]) -> dict[int, _Target]:
    """The flows of a pass, their notebook edits picked up, with their latest versions: three queries
    for any number of flows, not two per schedule. A flow whose runs cannot be made (its stored notebook
    no longer parses, say) gets a target with its ``error``: its schedules record it, the others fire."""
    from nbflow.core.runs import new_run_values, stored_kernel

    with store.read() as session:
        names = set(session.execute(select(Flow.name).where(Flow.id.in_(flow_ids))).scalars())
    sync_versions(store, names)
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
        try:
            kernel_key = (store.url, version.id, flow.kernel_name)
            if kernel_key not in _kernels:  # parsing the stored notebook for its kernelspec: once per version
                _kernels[kernel_key] = stored_kernel(flow, version)
            template = new_run_values(flow, version, {}, _kernels[kernel_key], trigger="schedule")
            if str(template["id"]) not in template["output_path"]:  # a path not named by the run: one per run
                raise NbflowError(f"run output path {template['output_path']!r} does not name its run")
        except Exception as exc:
            if is_unavailable(exc):
                raise
            reason = f"flow {flow.name!r} cannot make a run: {one_line(exc)}"
            log.error("%s; its schedules create no run until that is fixed", reason)
            targets[flow_id] = _Target(flow, None, version, error=reason)
            continue
        targets[flow_id] = _Target(flow, template, version)
    return targets


@dataclass
class _Plan:
    """One due schedule's part of a pass, decided before any write: the slots to fire and what its row
    becomes. ``seen`` is the row as read; a chunk applies the plan only if the row is still that.
    ``error``: what the row records (None clears it); ``active`` False pauses it."""

    schedule_id: int
    seen: tuple[Any, ...]
    slots: list[datetime]
    next_fire_at: datetime | None
    active: bool = True
    target: _Target | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def first(self) -> datetime:
        return self.slots[0] if self.slots else self.seen[0]


_DUE_COLUMNS = (Schedule.id, Schedule.flow_id, Schedule.trigger, cast(Schedule.spec, Text).label("spec"),
                Schedule.timezone, cast(Schedule.parameters, Text).label("parameters"), Schedule.catch_up,
                Schedule.max_lateness, Schedule.next_fire_at, Schedule.active, Schedule.updated_at)


def _definition(row: Any) -> tuple[tuple[str, str, str], Any]:
    """A due row's (memo key, trigger), or ``ScheduleError`` saying what is wrong with what is stored:
    a definition or policy an old version wrote, or someone edited, that no longer works."""
    _check_policy(row.catch_up, row.max_lateness)
    # The stored text is the memo key as it is: the definitions a burst shares read back identically.
    key = (row.trigger, row.spec if isinstance(row.spec, str) else json.dumps(row.spec), row.timezone)
    try:
        return key, _trigger(*key)
    except ValueError:  # json.loads (make_trigger's own errors are ScheduleError)
        raise ScheduleError(f"its stored definition is not valid JSON: {str(row.spec)[:100]!r}") from None


def _plans(rows: list[Any], targets: dict[int, _Target], now: datetime) -> list[_Plan]:
    """Decide every due schedule's slots and next fire time. Schedules sharing a definition (and, for
    slots, a ``next_fire_at``) share the calendar math: a burst of 5,000 ``0 * * * *`` schedules computes
    it once.

    A row that cannot be planned (see ``_definition``; a trigger whose next slot cannot be computed) is
    paused with its reason in ``error`` (``nbflow schedule list``), and the pass goes on with the others."""
    slots_memo: dict[tuple[Any, ...], list[datetime]] = {}
    next_memo: dict[tuple[str, str, str], datetime | None] = {}
    values_memo: dict[tuple[int, str], dict[str, Any] | str] = {}
    tolerance = skip_tolerance()
    plans = []
    for row in rows:
        seen = (row.next_fire_at, row.active, row.updated_at)
        try:
            key, trigger = _definition(row)
            if key not in next_memo:
                next_memo[key] = _first_at_or_after(trigger, now + _TICK) if row.trigger != "date" else None
            slot_key = (*key, row.next_fire_at, row.catch_up, row.max_lateness)
            if slot_key not in slots_memo:
                slots_memo[slot_key] = slots_to_fire(row, trigger, now, tolerance)
        except Exception as exc:
            if is_unavailable(exc):
                raise
            reason = one_line(exc)
            log.error("schedule %s: %s; paused (add it again to fix it)", row.id, reason)
            plans.append(_Plan(row.id, seen, [], row.next_fire_at, active=False, error=f"paused: {reason}"))
            continue
        plan = _Plan(row.id, seen, [], next_memo[key])
        plans.append(plan)
        target = targets.get(row.flow_id)
        if target is not None and target.error is not None:
            plan.error = target.error
            continue
        if target is None or target.template is None or target.version is None:
            continue  # flow gone, paused, or without a version: the slots are skipped
        if not slots_memo[slot_key]:
            continue
        params_key = (target.version.id, str(row.parameters))
        if params_key not in values_memo:
            try:
                values_memo[params_key] = validate(target.version.parameters, _decode(row.parameters) or {},
                                                   has_parameters_cell=target.version.has_parameters_cell)
            except (ParameterError, ValueError, TypeError, AttributeError) as exc:
                reason = (f"its parameters no longer fit the notebook ({one_line(exc)}); no run was created "
                          "for its last slot: add the schedule again with valid parameters")
                log.error("schedule %s of flow %s: %s", row.id, target.flow.name, reason)
                values_memo[params_key] = reason
        values = values_memo[params_key]
        if isinstance(values, str):
            plan.error = values
        else:
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
    from nbflow.core.runs import insert_runs_skipping_conflicts

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
            .values(next_fire_at=bindparam("b_next"), active=bindparam("b_active"), error=bindparam("b_error")),
            [{"b_id": p.schedule_id, "b_next": p.next_fire_at, "b_active": p.active, "b_error": p.error}
             for p in mine])
    return created


def _commit_or_isolate(store: Store, chunk: list[_Plan], now: datetime) -> list[uuid.UUID]:
    """``_commit_chunk``, and if the chunk fails for something other than an outage (a row the database
    refuses), each plan alone: the one that still fails is paused with the database's reason, and the
    others' runs are created. An outage is raised, for the scheduler's loop to wait out."""
    try:
        return _commit_chunk(store, chunk, now)
    except Exception as exc:
        if is_unavailable(exc):
            raise
        if len(chunk) == 1:
            _pause_for(store, chunk[0], exc)
            return []
    created: list[uuid.UUID] = []
    for plan in chunk:
        created.extend(_commit_or_isolate(store, [plan], now))
    return created


def _pause_for(store: Store, plan: _Plan, exc: BaseException) -> None:
    reason = f"paused: its slot could not be written ({one_line(exc)})"
    log.error("schedule %s: %s", plan.schedule_id, reason)
    with store.write() as session:
        session.execute(update(Schedule).where(Schedule.id == plan.schedule_id).values(active=False, error=reason))


def fire_due(store: Store, now: datetime | None = None) -> list[Any]:
    """One scheduler pass: create the runs of every due slot of every active schedule; return their ids.

    Safe to call from any number of threads, processes and machines at once: each slot gets one run.

    The pass reads the due schedules and decides everything (slots, parameters, next fire times) without
    holding a lock, then writes in chunks of about ``CHUNK_SLOTS`` slots, earliest first, each its own
    transaction: a burst of thousands of slots on a minute boundary becomes claimable chunk by chunk
    instead of all at the end, and SQLite's write lock is never held for long. Runs and their first
    state events are inserted with Core, a few statements per chunk (``INSERT ... ON CONFLICT DO
    NOTHING`` on the slot key), not one ORM flush and SAVEPOINT per run (~12 ms per run).

    A bad row never stops a pass: it is paused with its reason (see ``_plans``) and the others fire. A
    database outage is raised (``nbflow.store.retry.is_unavailable``): the loop waits it out, and as a
    slot is advanced only in the transaction that creates its run, no slot is lost or fired twice.
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
        created.extend(_commit_or_isolate(store, chunk, now))
    return created


def next_due(store: Store) -> datetime | None:
    """The earliest ``next_fire_at`` of an active schedule (one index seek), so that a scheduler wakes
    when a slot comes due rather than up to a tick later."""
    with store.read() as session:
        return session.execute(
            select(Schedule.next_fire_at).where(Schedule.active.is_(True), Schedule.next_fire_at.is_not(None))
            .order_by(Schedule.next_fire_at).limit(1)).scalar_one_or_none()


class Scheduler:
    """Calls ``fire_due``, ``nbflow.services.events.fire_events`` (pipelines, file arrivals) and
    ``nbflow.services.notify.deliver_notifications`` every ``tick`` seconds, and as soon as a schedule's next slot
    comes due, in a thread of its own until ``stop`` is set.

    Any number of schedulers may run against one database; they never create a run twice. Only the one
    leading the ``scheduler`` role (``nbflow.services.leader``) does the passes, so N schedulers do not repeat the
    same scans; the others stand by and take over within ~1.25 leases if it dies. ``holder`` names this
    scheduler in the ``leader`` table (``nbflow serve`` passes its runner's worker id).
    """

    def __init__(self, store: Store, *, tick: float = 1.0,
                 on_fire: Callable[[list[Any]], None] | None = None, holder: str | None = None) -> None:
        from nbflow.services.leader import SCHEDULER, Leadership
        from nbflow.services.runner import new_worker_id

        if tick <= 0:
            raise ValueError("tick must be positive")
        self.store = store
        self.tick = tick
        self.on_fire = on_fire
        self.leadership = Leadership(store, SCHEDULER, holder or new_worker_id("scheduler"))
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[str, str] = {}  # step -> the error it last logged

    def run(self, *, exit_after: float | None = None, after: Callable[[], bool] | None = None) -> None:
        """Loop in the calling thread until ``stop`` is set (or ``exit_after`` seconds have passed).

        ``after``: wait until it returns true (at most ``AFTER_TIMEOUT`` seconds) before the first pass.
        ``nbflow serve`` passes "the API has started": a first pass over 10,000 schedules takes the GIL for
        a while, and the API's start-up should not wait for it."""
        from nbflow.services.events import fire_events
        from nbflow.services.notify import deliver_notifications
        from nbflow.services.retention import AutoPrune

        if after is not None:
            waited = time.monotonic() + AFTER_TIMEOUT
            while not after() and time.monotonic() < waited and not self.stop.wait(0.01):
                pass
        deadline = time.monotonic() + exit_after if exit_after is not None else None
        retention = AutoPrune(self.store)  # NBFLOW_RETENTION_DAYS, hourly, in a thread of its own
        steps: tuple[tuple[str, Callable[[datetime], Any]], ...] = (
            ("schedules", lambda started: fire_due(self.store, started)),
            ("events", lambda started: fire_events(self.store)),
            ("notifications", lambda started: deliver_notifications(self.store, wait=False)),  # never blocks
            ("retention", lambda started: retention.tick()),
        )
        backoff = Backoff()
        while not self.stop.is_set():
            wait = self.tick
            try:
                if self.leadership.check():  # else another scheduler leads: stand by
                    wait = self._pass(steps)
                    backoff.reset()
            except Exception as exc:  # never the end of the scheduler: an outage is waited out, a bug logged
                if is_unavailable(exc):
                    report_down(self.store, exc, "scheduler pass")  # one line per outage, not per try
                    wait = backoff.next()
                else:
                    self._failed("pass", exc)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            self.stop.wait(wait)
        self.leadership.resign()  # a clean stop hands the role over without waiting out the lease

    def _pass(self, steps: tuple[tuple[str, Callable[[datetime], Any]], ...]) -> float:
        """One pass: each step on its own, so a bug in one (events, say) does not stop the others. An
        outage is raised to ``run``, which waits it out; the next pass starts over from the database,
        which holds every slot not yet fired."""
        started = utcnow()
        wrote = False
        for what, step in steps:
            try:
                result = step(started)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                self._failed(what, exc)
                continue
            self._failures.pop(what, None)
            if what in ("schedules", "events") and result:
                wrote = True
                if self.on_fire:
                    self.on_fire(result)
        wait = self._until(next_due(self.store), started)
        # On SQLite a pass that only read proves nothing: reads go on while another process holds the
        # write lock (WAL), so "back" waits for a pass that wrote.
        report_up(self.store, read_only=not wrote)
        return wait

    def _failed(self, what: str, exc: BaseException) -> None:
        """Log a step's unexpected error with its traceback once, not at every tick while it repeats."""
        reason = one_line(exc)
        if self._failures.get(what) != reason:
            self._failures[what] = reason
            log.error("scheduler %s failed (the other steps go on; retried each pass)", what, exc_info=exc)

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
