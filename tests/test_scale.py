"""Many workers on one database: worker labels, one leader per housekeeping role, and real processes on
PostgreSQL sharing a queue (every run exactly once, limits held across workers, a SIGKILLed worker's run
retried by another, two ``serve`` processes failing over the scheduler role)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from helpers import make_notebook, nbflow, run_cli, start, until
from sqlalchemy import func, select

from nbflow.core import runs, states, workers
from nbflow.core.concurrency import set_tag_limit
from nbflow.core.flows import FlowOptions, flow_documents, get_flow, latest_version, register, update_flow
from nbflow.errors import InvalidLabel
from nbflow.services import leader
from nbflow.services.runner import claim
from nbflow.services.scheduler import add_schedule
from nbflow.store import Store, open_store
from nbflow.store.models import Flow, Leader, Run, RunStateEvent, Worker, utcnow

PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
# The shape. Trivial runs are CPU-bound (kernel start-up, ~0.4 s of CPU each): ~4 minutes measured
# on 2 cores shared with other test runs (load average 10-20).
QUEUED_RUNS = 300


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever is still alive at the end is stopped (SIGTERM, then SIGKILL)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[2])  # worker:HOST:PID:RANDOM (runner.new_worker_id)


def queue(store: Store, flow_name: str, n: int) -> list[uuid.UUID]:
    """``n`` queued runs of ``flow_name``, in one transaction (as ``create_run`` inserts each of them)."""
    with store.write() as session:
        flow = get_flow(session, flow_name)
        version = latest_version(session, flow.id)
        made = []
        for _ in range(n):
            run = runs.new_run(flow, version, {}, "python3", trigger="api")
            states.initial_state(session, run)
            made.append(run.id)
    return made


def history(store: Store, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[RunStateEvent]]:
    with store.read() as session:
        events = session.execute(select(RunStateEvent).where(RunStateEvent.run_id.in_(run_ids))
                                 .order_by(RunStateEvent.id)).scalars()
        by_run: dict[uuid.UUID, list[RunStateEvent]] = {i: [] for i in run_ids}
        for e in events:
            by_run[e.run_id].append(e)
    return by_run


def states_of(store: Store, run_ids: list[uuid.UUID]) -> dict[str, int]:
    with store.read() as session:
        return dict(session.execute(select(Run.state, func.count()).where(Run.id.in_(run_ids))
                                    .group_by(Run.state)).all())


def live_workers(store: Store, n: int) -> list[dict[str, Any]] | None:
    """The live workers once there are ``n`` of them."""
    listed = workers.list_workers(store, 30)
    return listed if len(listed) == n else None


# -- the leader lease ---------------------------------------------------------------------------------


def test_a_role_has_one_holder_until_its_lease_expires(store):
    now = utcnow()
    assert leader.try_lead(store, "reaper", "a", 10, now=now)
    assert not leader.try_lead(store, "reaper", "b", 10, now=now + timedelta(seconds=5))  # a's lease holds
    assert leader.try_lead(store, "scheduler", "b", 10, now=now)  # roles are independent
    assert leader.try_lead(store, "reaper", "a", 10, now=now + timedelta(seconds=8))  # a renews: until +18 s
    assert not leader.try_lead(store, "reaper", "b", 10, now=now + timedelta(seconds=15))
    assert leader.try_lead(store, "reaper", "b", 10, now=now + timedelta(seconds=19))  # a died: b takes over
    assert not leader.try_lead(store, "reaper", "a", 10, now=now + timedelta(seconds=20))  # and a cannot come back
    with store.read() as session:
        assert {r.role: r.holder for r in session.execute(select(Leader)).scalars()} == {
            "reaper": "b", "scheduler": "b"}
    leader.resign(store, "reaper", "a")  # not the holder: changes nothing
    with store.read() as session:
        assert session.get(Leader, "reaper").holder == "b"


def test_leadership_fails_over_on_resign_and_on_expiry(store):
    lease = 0.8
    a, b = (leader.Leadership(store, "scheduler", name, lease) for name in ("a", "b"))
    assert a.check() and not b.check()
    assert leader.is_leader(store, "scheduler", "a") and not leader.is_leader(store, "scheduler", "b")
    a.resign()  # a clean stop: b takes over at its next attempt, within a quarter lease
    assert not leader.is_leader(store, "scheduler", "a")
    until(what="b to take the resigned role", predicate=b.check, timeout=lease / 4 + 0.3, every=0.02)
    dead_at = time.monotonic()
    # b stops renewing (as if SIGKILLed): c takes over after b's lease ran out, within ~1.25 leases.
    c = leader.Leadership(store, "scheduler", "c", lease)
    until(what="c to take over from a dead leader", predicate=c.check, timeout=3 * lease, every=0.02)
    assert lease * 0.9 <= time.monotonic() - dead_at <= 1.25 * lease + 0.5
    assert leader.is_leader(store, "scheduler", "c")


# -- labels -----------------------------------------------------------------------------------------------


@pytest.fixture
def labelled_flows(nbflow_env, tmp_path) -> dict[str, uuid.UUID]:
    """Flows needing no label, ``gpu``, and ``gpu`` + ``big-mem``, one queued run each."""
    store = open_store()
    nb = make_notebook(tmp_path, "trivial", ["x = 1"])
    needs = {"plain": (), "gpu": ("gpu",), "big": ("gpu", "big-mem")}
    for name, labels in needs.items():
        register(store, nb, name=name, options=FlowOptions(labels=labels))
    return {name: queue(store, name, 1)[0] for name in needs}


def test_a_worker_claims_only_flows_whose_labels_it_has(labelled_flows):
    store = open_store()
    ids = labelled_flows
    assert claim(store, "w:none", 10) == [ids["plain"]]
    assert claim(store, "w:gpu", 10, ["gpu"]) == [ids["gpu"]]
    assert claim(store, "w:other", 10, ["big-mem", "fast"]) == []  # has big-mem, lacks gpu
    assert claim(store, "w:both", 10, ["big-mem", "gpu", "x"]) == [ids["big"]]
    with store.read() as session:
        assert {session.get(Run, i).worker_id for i in ids.values()} == {"w:none", "w:gpu", "w:both"}


def test_labels_hold_under_concurrency_limits_too(labelled_flows):
    store = open_store()
    with store.write() as session:
        set_tag_limit(session, "*", 2)  # the claim takes the slow path, which pages through the queue
    assert claim(store, "w:none", 10) == [labelled_flows["plain"]]  # slots are free, but not for gpu flows
    assert claim(store, "w:both", 10, ["gpu", "big-mem"]) == [labelled_flows["gpu"]]  # the global limit: 2
    assert claim(store, "w:both", 10, ["gpu", "big-mem"]) == []


def test_flow_labels_are_registered_shown_and_patched(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "gpu", ["x = 1"])
    result = run_cli("register", nb, "--label", "gpu", "--label", "big-mem", "--label", "gpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["labels"] == ["big-mem", "gpu"]
    store = open_store()
    update_flow(store, "gpu", {"labels": ["cuda"]})
    with store.read() as session:
        assert flow_documents(session, [get_flow(session, "gpu")])[0]["labels"] == ["cuda"]
    assert json.loads(run_cli("register", nb, "--json").stdout)["labels"] == ["cuda"]  # not given: kept


@pytest.mark.parametrize("bad", ["gpu,big", " gpu", "", "-x", "a" * 101, "gpu mem"])
def test_a_bad_flow_label_registers_nothing(sqlite_env, tmp_path, bad):
    nb = make_notebook(tmp_path, "gpu", ["x = 1"])
    result = run_cli("register", nb, "--label", bad)
    assert result.exit_code == 2
    assert "invalid label" in result.stderr
    with open_store().read() as session:
        assert session.scalar(select(func.count(Flow.id))) == 0
    with pytest.raises(InvalidLabel):
        update_flow(open_store(), "gpu", {"labels": [bad]})


@pytest.mark.parametrize("bad", ["gpu,,x", "gpu, big mem", "gpu,-x"])
def test_a_bad_worker_label_is_refused_before_anything_starts(sqlite_env, tmp_path, bad):
    result = run_cli("worker", "--labels", bad, "--exit-when-idle")
    assert result.exit_code == 2
    assert "nbflow: error: invalid label" in result.stderr
    with open_store().read() as session:
        assert session.scalar(select(func.count(Worker.id))) == 0


# -- real processes on PostgreSQL ---------------------------------------------------------------------------


def _gone(store: Store, worker_id: str) -> bool:
    with store.read() as session:
        return session.get(Worker, worker_id) is None


def max_running_at_once(events: dict[uuid.UUID, list[RunStateEvent]]) -> int:
    """The most runs RUNNING at the same instant, from the history: +1 at PENDING -> RUNNING, -1 when the
    run leaves RUNNING (ends at the same instant count before starts)."""
    changes = []
    for history_ in events.values():
        for e in history_:
            if e.to_state == "RUNNING":
                changes.append((e.at, 1))
            elif e.from_state == "RUNNING":
                changes.append((e.at, -1))
    running = peak = 0
    for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@PG_ONLY
def test_four_workers_run_queued_runs_exactly_once_within_the_global_limit(nbflow_env, tmp_path, procs):
    store = open_store()
    nb = make_notebook(tmp_path, "trivial", ["x = 1"])
    register(store, nb)
    limit = 4
    with store.write() as session:
        set_tag_limit(session, "*", limit)  # 4 workers x 2 slots = 8: the limit binds
    ids = queue(store, "trivial", QUEUED_RUNS)
    started = time.monotonic()
    procs.extend(start(nbflow_env, tmp_path, "worker", "--slots", "2", "--warm-kernels", "1", "--poll", "0.2")
                 for _ in range(4))
    until(what="4 registered workers", predicate=lambda: live_workers(store, 4), timeout=60)
    listed = json.loads(nbflow(nbflow_env, tmp_path, "workers", "--json").stdout)["workers"]
    assert {w["pid"] for w in listed} == {p.pid for p in procs}
    assert sum("reaper" in w["leads"] for w in listed) == 1  # one reaper, whichever
    ended = {s.value for s in states.TERMINAL}
    until(what=f"{len(ids)} ended runs",
          predicate=lambda: sum(n for s, n in states_of(store, ids).items() if s in ended)
               == len(ids), timeout=480, every=1, show=lambda: states_of(store, ids))
    took = time.monotonic() - started
    print(f"\n{len(ids)} trivial runs, 4 workers x 2 slots, global limit {limit}: {took:.1f}s "
          f"({len(ids) / took * 60:.0f} runs/min)")
    assert states_of(store, ids) == {"COMPLETED": len(ids)}
    events = history(store, ids)
    for run_id, history_ in events.items():
        assert [(e.from_state, e.to_state, e.attempt) for e in history_] == [
            (None, "PENDING", 1), ("PENDING", "RUNNING", 1), ("RUNNING", "COMPLETED", 1)], run_id
    with store.read() as session:
        by_worker = dict(session.execute(select(Run.worker_id, func.count()).where(Run.id.in_(ids))
                                         .group_by(Run.worker_id)).all())
    assert {pid_of(w) for w in by_worker} == {p.pid for p in procs}  # one worker per run, and all 4 took runs
    assert sum(by_worker.values()) == len(ids)
    peak = max_running_at_once(events)
    assert 2 <= peak <= limit, peak
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.communicate(timeout=40)
        assert proc.returncode == 0
    with store.read() as session:  # a clean stop unregisters and resigns
        assert session.scalar(select(func.count(Worker.id))) == 0
        assert session.get(Leader, "reaper") is None


@pytest.mark.slow
@PG_ONLY
def test_a_sigkilled_workers_run_is_crashed_then_retried_by_another_worker(nbflow_env, tmp_path, procs):
    store = open_store()
    marker = tmp_path / "attempted"
    nb = make_notebook(tmp_path, "survivor", [
        "import pathlib, time\np = pathlib.Path(marker)\nif not p.exists():\n    p.touch()\n    time.sleep(120)",
        "x = 1"], parameters="marker = ''")
    register(store, nb, options=FlowOptions(retries=1))
    env = dict(nbflow_env, NBFLOW_LEASE_SECONDS="3")
    procs.extend(start(env, tmp_path, "worker", "--warm-kernels", "0", "--poll", "0.2") for _ in range(2))
    until(what="2 registered workers", predicate=lambda: live_workers(store, 2), timeout=60)
    run_id = runs.create_run(store, "survivor", {"marker": str(marker)}).id
    until(what="the first attempt to start", predicate=marker.exists, timeout=60)
    with store.read() as session:
        first_worker = session.get(Run, run_id).worker_id
    victim = next(p for p in procs if p.pid == pid_of(first_worker))
    survivor = next(p for p in procs if p is not victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)  # not communicate(): its orphans hold its pipes a while
    until(what="the retry to complete", predicate=lambda: states_of(store, [run_id]) == {"COMPLETED": 1}, timeout=120,
               show=lambda: [(e.to_state, e.message) for e in history(store, [run_id])[run_id]])
    events = history(store, [run_id])[run_id]
    assert [(e.to_state, e.attempt) for e in events] == [
        ("PENDING", 1), ("RUNNING", 1), ("CRASHED", 1), ("SCHEDULED", 2), ("PENDING", 2), ("RUNNING", 2),
        ("COMPLETED", 2)]
    crashed = next(e for e in events if e.to_state == "CRASHED")
    assert first_worker in crashed.message and "stopped renewing its lease" in crashed.message
    with store.read() as session:
        assert pid_of(session.get(Run, run_id).worker_id) == survivor.pid
    # The dead worker is forgotten by the reaper leader (the survivor, whichever led before).
    until(what="the dead worker to be forgotten", predicate=lambda: _gone(store, first_worker), timeout=20)
    assert [(w["pid"], w["leads"]) for w in workers.list_workers(store, 3)] == [(survivor.pid, ["reaper"])]


@pytest.mark.slow
@PG_ONLY
def test_a_flow_needing_a_label_runs_only_on_the_worker_offering_it(nbflow_env, tmp_path, procs):
    store = open_store()
    nb = make_notebook(tmp_path, "trivial", ["x = 1"])
    assert nbflow(nbflow_env, tmp_path, "register", nb, "--name", "gpu-job", "--label", "gpu").returncode == 0
    register(store, nb, name="cpu-job")
    gpu = start(nbflow_env, tmp_path, "worker", "--labels", "gpu,big-mem", "--warm-kernels", "0", "--poll", "0.2")
    plain = start(nbflow_env, tmp_path, "worker", "--warm-kernels", "0", "--poll", "0.2")
    procs.extend([gpu, plain])
    listed = until(what="2 registered workers", predicate=lambda: live_workers(store, 2), timeout=60)
    assert {w["pid"]: w["labels"] for w in listed} == {gpu.pid: ["big-mem", "gpu"], plain.pid: []}
    gpu_runs, cpu_runs = queue(store, "gpu-job", 6), queue(store, "cpu-job", 6)
    until(what="12 completed runs",
          predicate=lambda: states_of(store, gpu_runs + cpu_runs) == {"COMPLETED": 12}, timeout=240,
               every=0.5, show=lambda: states_of(store, gpu_runs + cpu_runs))
    with store.read() as session:
        ran_by = {i: pid_of(session.get(Run, i).worker_id) for i in gpu_runs + cpu_runs}
    assert {ran_by[i] for i in gpu_runs} == {gpu.pid}
    assert plain.pid in {ran_by[i] for i in cpu_runs}  # the plain worker was there to take runs, and did


@pytest.mark.slow
@PG_ONLY
def test_two_serve_processes_share_the_scheduler_role_and_fail_over(nbflow_env, tmp_path, procs):
    store = open_store()
    lease = 2.0
    nb = make_notebook(tmp_path, "tick", ["x = 1"])
    register(store, nb)
    schedule = add_schedule(store, "tick", interval="1s")
    env = dict(nbflow_env, NBFLOW_LEASE_SECONDS=str(lease))
    args = ("serve", "--no-api", "--slots", "1", "--warm-kernels", "0", "--tick", "0.2", "--poll", "0.2")
    procs.extend(start(env, tmp_path, *args) for _ in range(2))

    def scheduler_holder() -> str | None:
        with store.read() as session:
            row = session.get(Leader, "scheduler")
            return row.holder if row is not None and row.expires_at > utcnow() else None

    def slots() -> list[Any]:
        with store.read() as session:
            return list(session.execute(select(Run.scheduled_for).where(Run.schedule_id == schedule.id)).scalars())

    first = until(what="a scheduler leader", predicate=scheduler_holder, timeout=60)
    until(what="the schedule to fire", predicate=lambda: len(slots()) >= 2, timeout=60)
    victim = next(p for p in procs if p.pid == pid_of(first))
    other = next(p for p in procs if p is not victim)
    victim.send_signal(signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), utcnow()
    victim.wait(timeout=30)  # not communicate(): its orphans hold its pipes a while
    second = until(what="another scheduler leader", predicate=lambda: (lambda h: h if h and h != first else None)(
        scheduler_holder()), timeout=4 * lease, every=0.05)
    took = time.monotonic() - killed_at
    print(f"\nscheduler role failed over {took:.1f}s after the leader's SIGKILL (lease {lease:g}s)")
    assert pid_of(second) == other.pid
    assert took <= 2 * lease + 1, f"failover took {took:.1f}s with a lease of {lease:g}s"
    until(what="the schedule to keep firing after the failover",
          predicate=lambda: any(s > killed_wall + timedelta(seconds=took + 1) for s in slots()), timeout=30)
    fired = slots()
    assert len(fired) == len(set(fired))  # never two runs for one slot
    until(what="the reaper role to move over too",
          predicate=lambda: leader.is_leader(store, "reaper", second), timeout=10)
    os.kill(other.pid, signal.SIGTERM)
    other.communicate(timeout=40)
    assert scheduler_holder() is None  # resigned on a clean stop
