"""Schedules: trigger math, exactly one run per slot whoever fires it, catch-up after downtime."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import at_once, make_notebook, nbflow
from sqlalchemy import func, select, update

from nbflow.core.flows import register
from nbflow.errors import FlowNotFound, ParameterError, ScheduleError
from nbflow.services import scheduler
from nbflow.store import open_store
from nbflow.store.models import Run, Schedule

T0 = datetime(2026, 1, 10, 12, 0, 0, tzinfo=UTC)
BASE = T0 + timedelta(seconds=1)  # the first slot of an interval schedule added at T0


def flow(tmp_path: Path, name: str = "job") -> str:
    nb = make_notebook(tmp_path, name, ["print(n)"], parameters="n = 1")
    register(open_store(), nb, name=name)
    return name


def runs_of(store, order=Run.scheduled_for) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(order)).scalars())


def count_schedules(store) -> int:
    with store.read() as session:
        return session.execute(select(func.count()).select_from(Schedule)).scalar_one()


@pytest.mark.parametrize("kwargs, message", [
    ({"cron": "99 * * * *"}, "invalid cron expression '99 * * * *': Error validating expression '99'"),
    ({"cron": "every day"}, "invalid cron expression 'every day': Wrong number of fields"),
    ({"cron": "* * * * *", "timezone": "Mars/Base"}, "unknown time zone 'Mars/Base'"),
    ({"cron": "* * * * *", "interval": "5m"}, "give exactly one of cron, interval or at (got cron, interval)"),
    ({}, "give exactly one of cron, interval or at"),
    ({"interval": "5 parsecs"}, "invalid interval '5 parsecs'"),
    ({"at": "2001-01-01T00:00"}, "is in the past"),
    ({"interval": "1m", "catch_up": "sometimes"}, "unknown catch-up policy 'sometimes'"),
])
def test_bad_schedules_are_rejected_with_a_clear_message(sqlite_env, tmp_path, kwargs, message):
    store = open_store()
    name = flow(tmp_path)
    with pytest.raises(ScheduleError) as err:
        scheduler.add_schedule(store, name, **kwargs)
    assert message in str(err.value)
    assert count_schedules(store) == 0


def test_unknown_flow_and_unknown_parameter_write_nothing(sqlite_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    with pytest.raises(FlowNotFound):
        scheduler.add_schedule(store, "nope", interval="1m")
    with pytest.raises(ParameterError, match="unknown parameter 'm'; valid parameters: n"):
        scheduler.add_schedule(store, name, interval="1m", parameters={"m": 1})
    with pytest.raises(ParameterError):
        scheduler.add_schedule(store, name, interval="1m", parameters={"n": "not a number"})
    assert count_schedules(store) == 0


def test_cli_rejects_bad_schedules_in_one_line(sqlite_env, tmp_path):
    flow(tmp_path)
    for args, text in [(["--cron", "61 * * * *"], "invalid cron expression '61 * * * *'"),
                       (["--cron", "0 9 * * *", "--tz", "Mars/Base"], "unknown time zone 'Mars/Base'"),
                       (["--cron", "0 9 * * *", "--interval", "30s"], "give exactly one of cron, interval or at")]:
        proc = nbflow(sqlite_env, tmp_path, "schedule", "add", "job", *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("nbflow: error: ") and text in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    listing = nbflow(sqlite_env, tmp_path, "schedule", "list", "--json")
    assert json.loads(listing.stdout) == {"schedules": []}


def test_cli_add_list_pause_resume_remove(sqlite_env, tmp_path):
    flow(tmp_path)
    proc = nbflow(sqlite_env, tmp_path, "schedule", "add", "job", "--cron", "0 9 * * *", "--tz", "Europe/Berlin",
                  "-p", "n", "3", "--catch-up", "latest", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["parameters"] == {"n": 3} and doc["catch_up"] == "latest" and doc["active"]
    assert nbflow(sqlite_env, tmp_path, "schedule", "pause", "job").returncode == 0
    docs = json.loads(nbflow(sqlite_env, tmp_path, "schedule", "list", "--json").stdout)["schedules"]
    assert [d["active"] for d in docs] == [False]
    assert "active" in nbflow(sqlite_env, tmp_path, "schedule", "resume", "job").stdout
    assert "cron '0 9 * * *'" in nbflow(sqlite_env, tmp_path, "schedule", "list").stdout
    proc = nbflow(sqlite_env, tmp_path, "schedule", "pause", "job", "--name", "nightly")
    assert proc.returncode == 2 and "no schedule named 'nightly'" in proc.stderr
    assert nbflow(sqlite_env, tmp_path, "schedule", "remove", "job").returncode == 0
    assert json.loads(nbflow(sqlite_env, tmp_path, "schedule", "list", "--json").stdout) == {"schedules": []}


def test_cron_next_fire_honours_time_zone_and_dst(sqlite_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    winter = scheduler.add_schedule(store, name, cron="0 9 * * *", timezone="Europe/Berlin", now=T0)
    assert winter.next_fire_at == datetime(2026, 1, 11, 8, 0, tzinfo=UTC)
    summer = scheduler.add_schedule(store, name, name="summer", cron="0 9 * * *", timezone="Europe/Berlin",
                                    now=datetime(2026, 7, 10, 12, tzinfo=UTC))
    assert summer.next_fire_at == datetime(2026, 7, 11, 7, 0, tzinfo=UTC)
    # Added again unchanged, months later: same (flow, name), updated, not duplicated, and its next slot
    # stays where it was (the slots missed since are its backlog, see test_readding_keeps_the_backlog).
    again = scheduler.add_schedule(store, name, cron="0 9 * * *", timezone="Europe/Berlin",
                                   now=datetime(2026, 7, 10, 12, tzinfo=UTC))
    assert again.id == winter.id and again.next_fire_at == datetime(2026, 1, 11, 8, 0, tzinfo=UTC)
    assert count_schedules(store) == 2


def test_interval_schedule_fires_each_slot_once(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    sched = scheduler.add_schedule(store, name, interval="10s", parameters={"n": 7}, now=T0)
    assert sched.next_fire_at == BASE
    assert scheduler.fire_due(store, now=BASE - timedelta(seconds=0.5)) == []
    first = scheduler.fire_due(store, now=BASE + timedelta(seconds=0.5))
    assert len(first) == 1
    assert scheduler.fire_due(store, now=BASE + timedelta(seconds=0.5)) == []
    assert len(scheduler.fire_due(store, now=BASE + timedelta(seconds=10.2))) == 1
    runs = runs_of(store)
    assert [r.scheduled_for for r in runs] == [BASE, BASE + timedelta(seconds=10)]
    assert all(r.state == "PENDING" and r.trigger == "schedule" and r.schedule_id == sched.id for r in runs)
    assert all(r.parameters == {"n": 7} and r.kernel_name == "python3" for r in runs)
    with store.read() as session:
        assert session.get(Schedule, sched.id).next_fire_at == BASE + timedelta(seconds=20)


def test_concurrent_schedulers_create_exactly_one_run_per_slot(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="1m", now=T0)
    now = BASE + timedelta(seconds=1)
    results = at_once([lambda: scheduler.fire_due(store, now=now)] * 6)
    assert sum(len(r) for r in results) == 1
    assert len(runs_of(store)) == 1
    # A scheduler that read stale state (next_fire_at still at the fired slot) creates nothing either:
    # the UNIQUE slot key turns its insert into a no-op and the rest of its pass goes on.
    with store.write() as session:
        session.execute(update(Schedule).values(next_fire_at=BASE))
    assert scheduler.fire_due(store, now=now) == []
    assert len(runs_of(store)) == 1


@pytest.mark.parametrize("policy, max_lateness, late_by, expected", [
    ("skip", None, 90, []),  # the latest missed slot is older than the skip tolerance (60 s)
    ("skip", None, 30, [3000]),
    ("latest", None, 90, [3000]),
    ("all", None, 90, [300 * k for k in range(11)]),
    ("all", 1000, 90, [2100, 2400, 2700, 3000]),
    ("latest", 60, 90, []),  # older than max lateness
])
def test_catch_up_after_downtime(nbflow_env, tmp_path, policy, max_lateness, late_by, expected):
    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="5m", catch_up=policy, max_lateness=max_lateness, now=T0)
    now = BASE + timedelta(seconds=3000 + late_by)  # down for 11 slots; the last one was late_by seconds ago
    scheduler.fire_due(store, now=now)
    runs = runs_of(store)
    assert [(r.scheduled_for - BASE).total_seconds() for r in runs] == expected
    for r in runs:  # runs of missed slots are Late, due now: the runner's claim queues them
        assert (r.state, r.state_name, r.expected_start_at) == ("SCHEDULED", "Late", now)
    with store.read() as session:
        assert session.execute(select(Schedule.next_fire_at)).scalar_one() == BASE + timedelta(seconds=3300)


def test_pause_stops_firing_and_resume_continues_from_now(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="1m", catch_up="all", now=T0)
    scheduler.pause(store, name)
    assert scheduler.fire_due(store, now=BASE + timedelta(hours=1)) == []
    resumed = scheduler.resume(store, name, now=BASE + timedelta(hours=1, seconds=5))
    assert resumed.active and resumed.next_fire_at == BASE + timedelta(hours=1, minutes=1)
    assert len(scheduler.fire_due(store, now=BASE + timedelta(hours=1, minutes=1, seconds=1))) == 1
    assert [r.scheduled_for for r in runs_of(store)] == [BASE + timedelta(hours=1, minutes=1)]


def test_one_off_date_fires_once(sqlite_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    sched = scheduler.add_schedule(store, name, at="2026-01-10T15:00", timezone="Europe/Berlin", now=T0)
    assert sched.next_fire_at == datetime(2026, 1, 10, 14, 0, tzinfo=UTC)
    assert len(scheduler.fire_due(store, now=datetime(2026, 1, 10, 14, 0, 1, tzinfo=UTC))) == 1
    assert scheduler.fire_due(store, now=datetime(2026, 1, 11, tzinfo=UTC)) == []
    with store.read() as session:
        assert session.get(Schedule, sched.id).next_fire_at is None


def test_scheduler_and_worker_end_to_end(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "tick", ["print(n * 2)"], parameters="n = 1")
    assert nbflow(sqlite_env, tmp_path, "register", str(nb)).returncode == 0
    proc = nbflow(sqlite_env, tmp_path, "schedule", "add", "tick", "--interval", "1s", "-p", "n", "21")
    assert proc.returncode == 0, proc.stderr
    proc = nbflow(sqlite_env, tmp_path, "scheduler", "--tick", "0.2", "--exit-after", "3")
    assert proc.returncode == 0, proc.stderr
    assert "queued run" in proc.stderr
    proc = nbflow(sqlite_env, tmp_path, "worker", "--exit-when-idle", "--poll", "0.2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = runs_of(open_store())
    assert len(runs) >= 2
    assert all(r.state == "COMPLETED" and r.parameters == {"n": 21} for r in runs), [r.state for r in runs]
    assert len({r.scheduled_for for r in runs}) == len(runs)


def test_late_runs_are_claimed_by_workers(sqlite_env, tmp_path):
    from nbflow.services.runner import claim

    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="5m", catch_up="latest", now=T0)
    ids = scheduler.fire_due(store, now=BASE + timedelta(hours=1))
    assert len(ids) == 1
    assert claim(store, "w1", 5) == ids
    with store.read() as session:
        assert session.get(Run, ids[0]).state == "PENDING"


def test_concurrent_scheduler_processes_create_one_run_per_slot(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="1m", catch_up="all", now=T0)
    now = (BASE + timedelta(seconds=125)).isoformat()  # three slots due
    code = ("import datetime, sys; from nbflow.services import scheduler; from nbflow.store import open_store; "
            f"print(len(scheduler.fire_due(open_store(), now=datetime.datetime.fromisoformat({now!r}))))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=nbflow_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(int(out) for out, _ in outs) == 3
    assert [(r.scheduled_for - BASE).total_seconds() for r in runs_of(store)] == [0, 60, 120]


def test_register_with_schedule_checks_cron_and_time_zone_before_writing(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "daily", ["x = 1"])
    bad = nbflow(sqlite_env, tmp_path, "register", str(nb), "--schedule", "*/5 * * *")
    assert bad.returncode == 2 and "invalid cron expression" in bad.stderr
    bad = nbflow(sqlite_env, tmp_path, "register", str(nb), "--schedule", "0 9 * * *", "--tz", "Mars/Base")
    assert bad.returncode == 2 and "unknown time zone 'Mars/Base'" in bad.stderr
    assert json.loads(nbflow(sqlite_env, tmp_path, "flows", "--json").stdout)["flows"] == []
    nbflow(sqlite_env, tmp_path, "register", str(nb), "--schedule", "0 9 * * *", "--tz", "Europe/Berlin")
    (sched,) = json.loads(nbflow(sqlite_env, tmp_path, "schedule", "list", "--json").stdout)["schedules"]
    assert sched["flow"] == "daily" and sched["timezone"] == "Europe/Berlin"
    assert sched["next_fire_at"].endswith(("T08:00:00+00:00", "T07:00:00+00:00"))  # 09:00 Berlin, CET or CEST


@pytest.mark.parametrize("expr, first_days", [
    ("0 9 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]),  # cron numbers: 1 = Monday
    ("0 9 * * 0", ["Sun", "Sun"]),
    ("0 9 * * 7", ["Sun", "Sun"]),
    ("0 9 * * */2", ["Sun", "Tue", "Thu", "Sat", "Sun"]),
    ("0 9 * * MON-FRI", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]),
])
def test_cron_day_of_week_numbers_mean_what_they_mean_in_cron(expr, first_days):
    trigger = scheduler.make_trigger("cron", {"expr": expr}, "UTC")
    when, days = datetime(2026, 11, 21, 12, 0, tzinfo=UTC), []  # a Saturday, after 09:00
    for _ in first_days:
        when = trigger.get_next_fire_time(None, when + timedelta(seconds=1))
        days.append(when.strftime("%a"))
    assert days == first_days


def test_cron_day_of_week_out_of_range_is_rejected():
    with pytest.raises(ScheduleError, match="day of week '8' is not within 0-7"):
        scheduler.make_trigger("cron", {"expr": "0 9 * * 8"}, "UTC")


# -- bursts: many slots due in one pass --------------------------------------------------------------

BURST = 500


def burst_schedules(store, tmp_path: Path, now: datetime) -> dict[int, tuple[list[datetime], dict]]:
    """500 schedules due at ``now`` (bulk-inserted, as 10,000 would be): every fourth one with a slot
    missed long ago (catch-up ``latest``: one Late run), every tenth with ``catch_up="all"`` (11 slots,
    some Late: several chunks of the pass), the rest on time. Returns schedule id -> (slots that must
    fire, parameters they must carry)."""
    from nbflow.core.flows import FlowOptions

    nb = make_notebook(tmp_path, "burst", ["print(n)"], parameters="n = 1")
    flow_row, _ = register(store, nb, name="burst", options=FlowOptions(retries=2, timeout=30.0))
    on_time = now - timedelta(seconds=0.5)
    rows, wanted = [], []
    for i in range(BURST):
        if i % 10 == 0:  # every 5 s for the last 50 s: 11 slots, those more than 10 s old Late
            start = on_time - timedelta(seconds=50)
            spec, catch_up, first = {"seconds": 5.0, "start": start.isoformat()}, "all", start
            slots = [start + timedelta(seconds=5 * k) for k in range(11)]
        elif i % 4 == 0:  # a 1-minute slot missed 30 minutes ago and every minute since: the latest, Late
            start = on_time - timedelta(minutes=30, seconds=20)
            spec, catch_up, first = {"seconds": 60.0, "start": start.isoformat()}, "latest", start
            slots = [start + timedelta(minutes=30)]
        else:
            spec, catch_up, first = {"seconds": 60.0, "start": on_time.isoformat()}, "skip", on_time
            slots = [on_time]
        params = {"n": i}
        rows.append(Schedule(flow_id=flow_row.id, name=f"s{i:03d}", trigger="interval", spec=spec, timezone="UTC",
                             parameters=params, active=True, catch_up=catch_up, next_fire_at=first))
        wanted.append((slots, params))
    with store.write() as session:
        session.add_all(rows)
        session.flush()
        expected = {row.id: slots for row, slots in zip(rows, wanted, strict=True)}
    return expected


def check_burst(store, expected: dict[int, tuple[list[datetime], dict]], now: datetime) -> list[Run]:
    from nbflow.core.runs import history

    runs = runs_of(store)
    assert sorted((r.schedule_id, r.scheduled_for) for r in runs) == sorted(
        (sid, slot) for sid, (slots, _) in expected.items() for slot in slots)
    assert len({r.output_path for r in runs}) == len(runs)
    with store.read() as session:
        for run in runs:
            late = (now - run.scheduled_for).total_seconds() > scheduler.LATE_AFTER
            state = ("SCHEDULED", "Late", now) if late else ("PENDING", "Pending", run.scheduled_for)
            assert (run.state, run.state_name, run.expected_start_at) == state
            assert run.parameters == expected[run.schedule_id][1]
            assert (run.trigger, run.kernel_name, run.attempt, run.max_attempts, run.timeout) == (
                "schedule", "python3", 1, 3, 30.0)
            assert run.output_path.endswith(f"/burst/{run.id}.ipynb") and run.result == {}
            message = f"scheduled for {run.scheduled_for.isoformat()}"
            assert run.state_message == message
            (event,) = history(session, run)
            assert (event["from"], event["to"], event["name"], event["attempt"], event["message"]) == (
                None, state[0], state[1], 1, message)
        next_fires = {sid: at for sid, at in session.execute(select(Schedule.id, Schedule.next_fire_at))}
    assert all(next_fires[sid] > now for sid in expected)
    return runs


def test_a_burst_of_due_slots_fires_each_slot_once(nbflow_env, tmp_path):
    store = open_store()
    now = utcnow_floor()
    expected = burst_schedules(store, tmp_path, now)
    assert sum(len(slots) for slots, _ in expected.values()) > 2 * scheduler.CHUNK_SLOTS  # several chunks
    late = sum(1 for slots, _ in expected.values() for s in slots if (now - s).total_seconds() > 10)
    assert 0 < late < sum(len(slots) for slots, _ in expected.values())
    ids = scheduler.fire_due(store, now=now)
    runs = check_burst(store, expected, now)
    assert sorted(ids) == sorted(r.id for r in runs)
    # A scheduler that read the schedules before this pass advanced them fires the same slots again: the
    # slot key makes every insert a no-op, and no state event is written for a run that was not created.
    with store.write() as session:
        for sid, (slots, _) in expected.items():
            session.execute(update(Schedule).where(Schedule.id == sid).values(next_fire_at=slots[0]))
    assert scheduler.fire_due(store, now=now) == []
    check_burst(store, expected, now)


def test_schedulers_racing_over_a_burst_create_each_slot_once(nbflow_env, tmp_path):
    store = open_store()
    now = utcnow_floor()
    expected = burst_schedules(store, tmp_path, now)
    results = at_once([lambda: scheduler.fire_due(store, now=now)] * 3)
    runs = check_burst(store, expected, now)
    created = [run_id for ids in results for run_id in ids]
    assert sorted(created) == sorted(r.id for r in runs)  # every run reported by the one that made it


def test_burst_runs_are_the_runs_create_schedule_run_makes(nbflow_env, tmp_path):
    """The bulk insert and the ORM path build a slot's run from the same parts (``runs.new_run`` and the
    states module): compare every column but the ones that differ per run."""
    from nbflow.core.runs import create_schedule_run

    store = open_store()
    name = flow(tmp_path)
    sched = scheduler.add_schedule(store, name, interval="1m", parameters={"n": 5}, now=T0)
    (bulk_id,) = scheduler.fire_due(store, now=BASE + timedelta(seconds=1))
    with store.write() as session:
        from nbflow.store.models import Flow, FlowVersion

        flow_row = session.execute(select(Flow)).scalar_one()
        version = session.execute(select(FlowVersion)).scalar_one()
        orm = create_schedule_run(session, flow_row, version, schedule_id=sched.id, scheduled_for=BASE + timedelta(
            seconds=60), parameters={"n": 5}, late=False, now=BASE + timedelta(seconds=61))
        orm_id = orm.id
    differ = {"id", "output_path", "scheduled_for", "expected_start_at", "created_at", "state_message"}
    with store.read() as session:
        bulk, orm = session.get(Run, bulk_id), session.get(Run, orm_id)
        columns = [c.key for c in Run.__table__.columns if c.key not in differ]
        assert {c: getattr(bulk, c) for c in columns} == {c: getattr(orm, c) for c in columns}
        assert bulk.output_path.replace(str(bulk.id), str(orm.id)) == orm.output_path


def test_scheduler_wakes_when_a_slot_comes_due_not_a_tick_later(nbflow_env, tmp_path):
    store = open_store()
    sched = scheduler.Scheduler(store, tick=30)
    started = scheduler.utcnow()
    assert sched._until(None, started) == 30  # nothing scheduled: the tick
    assert sched._until(started, started) == 30  # due at the start yet not advanced: no busy loop
    soon = sched._until(started + timedelta(seconds=2), started)
    assert 0 < soon <= 2 + scheduler.WAKE_MARGIN
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="1s")
    sched.run(exit_after=3.5)  # with a 30 s tick: only the first pass if it waited for the tick
    assert len(runs_of(store)) >= 2


def utcnow_floor() -> datetime:
    """Now, to the whole second: slot times are whole seconds."""
    return scheduler.utcnow().replace(microsecond=0)


# -- bounds: one clear error at every door ----------------------------------------------------------

BAD_DEFINITIONS = [
    ({"interval": 1e300}, "interval (seconds) must be from 1 to 31622400"),
    ({"interval": float("nan")}, "interval (seconds) must be a finite number"),
    ({"interval": float("inf")}, "interval (seconds) must be a finite number"),
    ({"interval": -5}, "interval (seconds) must be from 1 to 31622400, got -5"),
    ({"interval": "1e300s"}, "invalid interval '1e300s'"),
    ({"interval": "NaN"}, "invalid interval 'NaN'"),
    ({"interval": "Infinity"}, "invalid interval 'Infinity'"),
    ({"interval": "400d"}, "interval '400d' in seconds must be from 1 to 31622400, got 34560000"),
    ({"interval": "9" * 400}, "invalid interval '999"),
    ({"at": "9999-12-31T23:00:00-05:00"}, "invalid date '9999-12-31T23:00:00-05:00': out of range"),
    ({"at": "2030-01-01T00:00" + "0" * 200}, "date is longer than 100 characters"),
    ({"cron": "* * * * * " * 100}, "cron expression is longer than 200 characters"),
    ({"cron": "0 9 * * *\x00"}, "cron expression contains a NUL character"),
    ({"cron": "*/99999999999999999999 * * * *"}, "invalid cron expression"),
    ({"cron": "0 9 * * *", "timezone": "Europe/" + "x" * 300}, "time zone is longer than 64 characters"),
    ({"cron": "0 9 * * *", "timezone": "UTC\x00"}, "time zone contains a NUL character"),
    ({"cron": "0 9 * * *", "timezone": "../../../etc/passwd"}, "unknown time zone"),
    ({"interval": "1m", "catch_up": "x" * 10_000}, "unknown catch-up policy 'xxxx"),
    ({"interval": "1m", "max_lateness": float("inf")}, "max lateness (seconds) must be a finite number"),
    ({"interval": "1m", "max_lateness": 1e300}, "max lateness (seconds) must be from 0 to 31622400"),
    ({"interval": "1m", "max_lateness": -1}, "max lateness (seconds) must be from 0 to 31622400, got -1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_DEFINITIONS)
def test_out_of_bounds_schedules_get_one_clear_error(sqlite_env, tmp_path, kwargs, message):
    store = open_store()
    name = flow(tmp_path)
    with pytest.raises(ScheduleError) as err:
        scheduler.add_schedule(store, name, **kwargs)
    assert message in str(err.value) and len(str(err.value)) < 400
    assert count_schedules(store) == 0


def test_out_of_bounds_schedules_through_the_cli_api_and_magics(sqlite_env, tmp_path):
    from IPython.core.error import UsageError

    from nbflow.jupyter.magics import _seconds
    from tests.helpers import serve_api

    flow(tmp_path)
    for args, text in [(["--interval", "1e300s"], "invalid interval '1e300s'"),
                       (["--interval", "400d"], "must be from 1 to 31622400"),
                       (["--at", "9999-12-31T23:00:00-05:00"], "out of range"),
                       (["--cron", "0 9 * * *", "--tz", "x" * 100], "time zone is longer than 64 characters"),
                       (["--interval", "1m", "--max-lateness", "1e300"],
                        "'--max-lateness': 1e+300 is not in the range")]:
        proc = nbflow(sqlite_env, tmp_path, "schedule", "add", "job", *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("nbflow: error: ") and text in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    import httpx

    server = serve_api(open_store())
    try:
        # Python's JSON (and so the API's) reads NaN and Infinity; 1e300 is plain JSON.
        for body in ('{"flow": "job", "interval": 1e300}', '{"flow": "job", "interval": NaN}',
                     '{"flow": "job", "interval": Infinity}', '{"flow": "job", "interval": "1e300s"}',
                     '{"flow": "job", "interval": "400d"}', '{"flow": "job", "at": "9999-12-31T23:00:00-05:00"}'):
            answer = httpx.post(f"{server.url}/api/schedules", content=body,
                                headers={"Content-Type": "application/json"}, timeout=30)
            assert answer.status_code == 422, (body, answer.status_code, answer.text)
    finally:
        server.stop()
    with pytest.raises(UsageError, match="--interval: interval '400d' in seconds must be from 1"):
        _seconds("400d", "--interval")
    assert count_schedules(open_store()) == 0


# -- adding a schedule again ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["all", "skip"])
def test_readding_an_unchanged_schedule_keeps_its_next_slot_and_backlog(nbflow_env, tmp_path, policy):
    """A deploy re-running `register --schedule` / `schedule add` while slots were missed: they still fire
    under the schedule's own policy (re-adding gives none), and each once."""
    store = open_store()
    name = flow(tmp_path)
    scheduler.add_schedule(store, name, interval="10s", catch_up=policy, now=T0)
    assert len(scheduler.fire_due(store, now=BASE)) == 1
    back = BASE + timedelta(seconds=45)  # slots +10, +20, +30, +40 missed (all within skip's tolerance)
    again = scheduler.add_schedule(store, name, interval="10s", now=back)
    assert again.next_fire_at == BASE + timedelta(seconds=10) and again.catch_up == policy
    assert again.spec["start"] == (T0 + timedelta(seconds=1)).isoformat()  # the anchor stays
    assert len(scheduler.fire_due(store, now=back)) == 4
    assert [(r.scheduled_for - BASE).total_seconds() for r in runs_of(store)] == [0, 10, 20, 30, 40]
    # Added again, again: nothing is fired twice, the next slot is still +50.
    assert scheduler.add_schedule(store, name, interval="10s", now=back).next_fire_at == BASE + timedelta(seconds=50)
    assert scheduler.fire_due(store, now=back) == []


def test_a_changed_schedule_keeps_its_catch_up_policy_unless_one_is_given(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    first = scheduler.add_schedule(store, name, cron="0 * * * *", catch_up="all", max_lateness=7200, now=T0)
    changed = scheduler.add_schedule(store, name, cron="30 * * * *", now=T0)  # new slots: from now
    assert (changed.catch_up, changed.max_lateness) == ("all", 7200)
    assert changed.id == first.id and changed.next_fire_at == T0 + timedelta(minutes=30)
    bound = scheduler.add_schedule(store, name, cron="30 * * * *", max_lateness=600, now=T0)
    assert (bound.catch_up, bound.max_lateness) == ("all", 600)  # only the bound changes
    latest = scheduler.add_schedule(store, name, cron="30 * * * *", catch_up="latest", now=T0)
    assert (latest.catch_up, latest.max_lateness) == ("latest", None)  # a new policy, given whole
    fresh = scheduler.add_schedule(store, name, name="other", cron="30 * * * *", now=T0)
    assert (fresh.catch_up, fresh.max_lateness) == ("skip", None)  # a new schedule: the default
    # A one-off date that fired already is unchanged when added again: no second run, no "in the past".
    once = scheduler.add_schedule(store, name, name="once", at="2026-01-10T12:10:00+00:00", now=T0)
    assert len(scheduler.fire_due(store, now=once.next_fire_at + timedelta(seconds=1))) == 1
    later = T0 + timedelta(days=1)
    again = scheduler.add_schedule(store, name, name="once", at="2026-01-10T12:10:00+00:00", now=later)
    assert again.next_fire_at is None
    with pytest.raises(ScheduleError, match="is in the past"):
        scheduler.add_schedule(store, name, name="once", at="2026-01-10T12:20:00+00:00", now=later)


def test_readding_through_the_cli_and_the_api_keeps_backlog_and_policy(sqlite_env, tmp_path):
    import httpx

    from tests.helpers import serve_api

    store = open_store()
    nb = make_notebook(tmp_path, "daily", ["x = 1"])
    assert nbflow(sqlite_env, tmp_path, "register", str(nb), "--schedule", "0 9 * * *").returncode == 0
    assert nbflow(sqlite_env, tmp_path, "schedule", "add", "daily", "--cron", "0 9 * * *",
                  "--catch-up", "all").returncode == 0
    past = datetime(2026, 1, 1, 9, tzinfo=UTC)
    with store.write() as session:  # as if the scheduler had been down since 1 January
        session.execute(update(Schedule).values(next_fire_at=past))
    # The deploy runs register --schedule again, and someone re-posts the definition through the API.
    assert nbflow(sqlite_env, tmp_path, "register", str(nb), "--schedule", "0 9 * * *").returncode == 0
    server = serve_api(store)
    try:
        answer = httpx.post(f"{server.url}/api/schedules", json={"flow": "daily", "cron": "0 9 * * *"}, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    (doc,) = scheduler.list_schedules(store)
    assert doc["catch_up"] == "all" and doc["next_fire_at"] == past.isoformat()
    assert len(scheduler.fire_due(store, now=datetime(2026, 1, 5, 9, 30, tzinfo=UTC))) == 5  # 1..5 January


# -- bad rows never stop a pass ---------------------------------------------------------------------


def _poison(store, flow_name: str, name: str, **columns) -> int:
    """A schedule row as an old version (or a hand edit) could have left it: written around the checks."""
    from sqlalchemy import text as sql

    with store.write() as session:
        flow_id = session.execute(sql("SELECT id FROM flow WHERE name = :n"), {"n": flow_name}).scalar_one()
        values = {"flow_id": flow_id, "name": name, "trigger": "interval", "spec": '{"seconds": 60}',
                  "timezone": "UTC", "parameters": "{}", "active": True, "catch_up": "skip", "max_lateness": None,
                  "next_fire_at": T0, "created_at": T0, "updated_at": T0, **columns}
        cast = "CAST(:spec AS JSONB)" if store.dialect == "postgresql" else ":spec"
        pcast = "CAST(:parameters AS JSONB)" if store.dialect == "postgresql" else ":parameters"
        return session.execute(sql(
            "INSERT INTO schedule (flow_id, name, trigger, spec, timezone, parameters, active, catch_up, "
            f"max_lateness, next_fire_at, created_at, updated_at) VALUES (:flow_id, :name, :trigger, {cast}, "
            f":timezone, {pcast}, :active, :catch_up, :max_lateness, :next_fire_at, :created_at, :updated_at) "
            "RETURNING id"), values).scalar_one()


def test_poison_schedule_rows_are_paused_with_their_reason_and_the_others_fire(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    good = scheduler.add_schedule(store, name, name="good", interval="10s", now=T0)
    bad = {
        "not-an-object": {"spec": '"every minute"'},
        "huge-interval": {"spec": '{"seconds": 1e300}'},
        "bad-anchor": {"spec": '{"seconds": 60, "start": "yesterday"}'},
        "bad-cron": {"trigger": "cron", "spec": '{"expr": "99 * * * *"}'},
        "bad-kind": {"trigger": "lunar", "spec": "{}"},
        "bad-zone": {"timezone": "Mars/Base"},
        "bad-policy": {"catch_up": "sometimes"},
        "bad-lateness": {"catch_up": "all", "max_lateness": 1e300},
    }
    if store.dialect == "sqlite":  # JSONB cannot hold text that is not JSON; SQLite can
        bad["not-json"] = {"spec": "{seconds: 60"}
    else:  # and SQLite cannot hold a NaN (it stores NULL); PostgreSQL can
        bad["nan-lateness"] = {"catch_up": "all", "max_lateness": float("nan")}
    for sched_name, columns in bad.items():
        _poison(store, name, sched_name, **columns)
    created = scheduler.fire_due(store, now=BASE + timedelta(seconds=0.5))
    assert [r.schedule_id for r in runs_of(store)] == [good.id] and len(created) == 1
    listed = scheduler.list_schedules(store)
    json.dumps(listed, allow_nan=False)  # the listing renders every row, as the API's JSON must
    docs = {d["name"]: d for d in listed}
    assert docs["good"]["active"] and docs["good"]["error"] is None
    for sched_name in bad:
        assert docs[sched_name]["active"] is False, docs[sched_name]
        assert docs[sched_name]["error"].startswith("paused: "), docs[sched_name]
    assert "must be from 1 to 31622400" in docs["huge-interval"]["error"]
    assert "unknown schedule kind 'lunar'" in docs["bad-kind"]["error"]
    assert "unknown catch-up policy 'sometimes'" in docs["bad-policy"]["error"]
    assert "unknown time zone 'Mars/Base'" in docs["bad-zone"]["error"]
    # The next passes go on firing the good one; the paused ones stay out of the way.
    assert len(scheduler.fire_due(store, now=BASE + timedelta(seconds=10.5))) == 1
    # The notebook front-ends (magics, widgets) render them too.
    from nbflow.jupyter.backend import LocalBackend

    shown = {d["name"]: d for d in LocalBackend(store).flow(name)["schedules"]}
    assert set(shown) == set(bad) | {"good"} and shown["bad-kind"]["error"] == docs["bad-kind"]["error"]
    # `nbflow schedule list` shows them and why; adding one again fixes it.
    listing = nbflow(nbflow_env, tmp_path, "schedule", "list")
    assert listing.returncode == 0, listing.stderr
    assert "job/bad-kind: paused: unknown schedule kind 'lunar'" in listing.stdout
    fixed = scheduler.add_schedule(store, name, name="huge-interval", interval="1m", now=BASE)
    assert fixed.active and fixed.error is None
    with pytest.raises(ScheduleError, match="cannot be resumed: unknown schedule kind 'lunar'"):
        scheduler.resume(store, name, "bad-kind")
    scheduler.pause(store, name, "bad-kind")  # pause and remove work on any row
    scheduler.remove(store, name, "bad-kind")


def test_parameters_that_no_longer_fit_are_shown_on_the_schedule(nbflow_env, tmp_path):
    store = open_store()
    name = flow(tmp_path)
    sched = scheduler.add_schedule(store, name, interval="10s", parameters={"n": 2}, now=T0)
    with store.write() as session:  # as if the notebook's parameter had changed type since
        session.execute(update(Schedule).values(parameters={"n": "two"}))
    assert scheduler.fire_due(store, now=BASE) == []
    (doc,) = scheduler.list_schedules(store)
    assert doc["active"] and "its parameters no longer fit the notebook" in doc["error"]
    scheduler.add_schedule(store, name, interval="10s", parameters={"n": 3}, now=BASE)
    assert len(scheduler.fire_due(store, now=BASE + timedelta(seconds=10))) == 1
    (doc,) = scheduler.list_schedules(store)
    assert doc["error"] is None and doc["id"] == sched.id


def test_a_slot_the_database_refuses_pauses_its_schedule_and_the_others_fire(nbflow_env, tmp_path):
    """A stored notebook (written by an old version) whose kernel name is longer than the run's column:
    PostgreSQL refuses that run's INSERT. The chunk is retried plan by plan: the other schedule's run is
    created, the refused one is paused with the database's reason. SQLite does not enforce the length."""
    import nbformat

    store = open_store()
    name = flow(tmp_path)
    other = flow(tmp_path, "other")
    bad = scheduler.add_schedule(store, name, interval="10s", now=T0)
    good = scheduler.add_schedule(store, other, interval="10s", now=T0)
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "k" * 300, "display_name": "k", "language": "python"}
    with store.write() as session:
        from nbflow.store.models import Flow, FlowVersion

        flow_id = session.execute(select(Flow.id).where(Flow.name == name)).scalar_one()
        session.execute(update(Flow).where(Flow.id == flow_id).values(kernel_name=None))
        session.execute(update(FlowVersion).where(FlowVersion.flow_id == flow_id)
                        .values(source=nbformat.writes(nb)))
    created = scheduler.fire_due(store, now=BASE)
    docs = {d["flow"]: d for d in scheduler.list_schedules(store)}
    if store.dialect == "postgresql":
        assert [r.schedule_id for r in runs_of(store)] == [good.id] and len(created) == 1
        assert docs[name]["active"] is False and docs[name]["id"] == bad.id
        assert docs[name]["error"].startswith("paused: its slot could not be written (")
        assert docs[other]["active"] and docs[other]["error"] is None
    else:
        assert sorted(r.schedule_id for r in runs_of(store)) == sorted([bad.id, good.id])


def test_a_step_that_keeps_failing_is_logged_once_and_the_schedules_still_fire(sqlite_env, tmp_path, caplog):
    """A damaged database (the outbox table of notifications dropped) makes every notifications step
    raise, and it is not an outage: the scheduler's loop logs it once, with its traceback, and goes on
    firing the schedules."""
    import logging

    from sqlalchemy import text as sql

    from nbflow.services.notify import add_notification

    store = open_store()
    name = flow(tmp_path)
    add_notification(store, name, "http://127.0.0.1:9/hook")
    with store.write() as session:
        session.execute(sql("DROP TABLE notification_delivery"))
    sched = scheduler.add_schedule(store, name, interval="1s")
    loop = scheduler.Scheduler(store, tick=0.05)
    with caplog.at_level(logging.ERROR, logger="nbflow.scheduler"):
        loop.run(exit_after=2.5)
    fired = [r.scheduled_for for r in runs_of(store)]
    assert len(fired) >= 2 and fired[0] == sched.next_fire_at, fired
    failures = [r for r in caplog.records if "scheduler notifications failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_migration_0007_down_and_up_keeps_every_slot_key(nbflow_env, tmp_path):
    """schedule.error comes and goes without touching the runs: a SQLite table rebuild would have set
    every run's schedule_id to NULL (foreign keys on), and with it the key that fires each slot once."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from nbflow.store.database import MIGRATIONS_DIR

    store = open_store()
    name = flow(tmp_path)
    sched = scheduler.add_schedule(store, name, interval="10s", now=T0)
    scheduler.fire_due(store, now=BASE)

    def migrate(target: str, down: bool) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store.engine.connect() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, target)
            conn.commit()

    migrate("0006", down=True)
    assert "error" not in {c["name"] for c in inspect(store.engine).get_columns("schedule")}
    migrate("head", down=False)
    assert [(r.schedule_id, r.scheduled_for) for r in runs_of(store)] == [(sched.id, BASE)]
    assert scheduler.fire_due(store, now=BASE) == []  # the slot is still known as fired
