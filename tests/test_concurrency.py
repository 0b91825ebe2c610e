"""Concurrency limits (global, per flow, per tag): never exceeded, reached, and no slot ever leaks.

Unit tests drive ``runner.claim`` directly on both databases; the end-to-end tests run real
``nbflow worker`` processes on real notebooks and measure, from the runs' start and end times, the
largest number of runs that were ever RUNNING at once.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import at_once, make_notebook, nbflow
from sqlalchemy import event, func, select

from nbflow.core import concurrency, states
from nbflow.core.flows import FlowOptions, get_flow, latest_version, register
from nbflow.core.runs import create_run, new_run
from nbflow.services.runner import claim
from nbflow.store import Store, open_store
from nbflow.store.models import Run, RunStateEvent, TagLimit, utcnow

_tick = itertools.count()
_BASE = utcnow() - timedelta(hours=1)


# -- helpers ---------------------------------------------------------------------------------------------

def add_flow(store: Store, tmp_path: Path, name: str, *, limit: int | None = None, collision: str | None = None,
             tags: tuple[str, ...] = (), cells: list[str] | None = None, retries: int | None = None) -> None:
    nb = make_notebook(tmp_path, name, cells or ["x = 1"])
    register(store, nb, name=name, options=FlowOptions(
        concurrency_limit=limit, collision=collision, tags=tags or None, retries=retries))


def queue(store: Store, name: str, n: int = 1) -> list[uuid.UUID]:
    """Queue ``n`` runs of flow ``name``, each strictly younger than every run queued before."""
    with store.read() as session:
        flow = get_flow(session, name)
        version = latest_version(session, flow.id)
    ids = []
    with store.write() as session:
        for _ in range(n):
            run = new_run(flow, version, {}, "python3", trigger="manual",
                          created_at=_BASE + timedelta(milliseconds=next(_tick)))
            states.initial_state(session, run)
            ids.append(run.id)
    return ids


def set_limit(store: Store, tag: str, n: int) -> None:
    with store.write() as session:
        concurrency.set_tag_limit(session, tag, n)


def finish(store: Store, ids: list[uuid.UUID]) -> None:
    """End claimed runs as their worker would: RUNNING, then COMPLETED."""
    with store.write() as session:
        for run_id in ids:
            run = states.lock_run(session, run_id)
            if run.state == states.S.PENDING:
                states.transition(session, run, states.S.RUNNING)
            states.transition(session, run, states.S.COMPLETED)


def in_use(store: Store) -> int:
    with store.read() as session:
        return concurrency.slots_in_use(session)[2]


def flow_of(store: Store, ids: list[uuid.UUID]) -> list[str]:
    with store.read() as session:
        return [session.get(Run, i).flow.name for i in ids]


def events(store: Store) -> int:
    with store.read() as session:
        return session.execute(select(func.count(RunStateEvent.id))).scalar()


# -- claim under limits, on both databases ---------------------------------------------------------------

def test_flow_limit_holds_runs_back_untouched_until_a_slot_frees(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "a", limit=2)
    runs = queue(store, "a", 5)
    before = events(store)
    assert claim(store, "w1", 10) == runs[:2]  # the oldest two
    assert claim(store, "w2", 10) == []
    assert events(store) == before  # the waiting runs saw no state churn
    with store.read() as session:
        waiting = [session.get(Run, i) for i in runs[2:]]
        assert {(r.state, r.state_name, r.worker_id) for r in waiting} == {("PENDING", "Pending", None)}
    finish(store, runs[:1])
    assert claim(store, "w2", 10) == [runs[2]]  # a run frees its slot by ending: nothing to release
    assert in_use(store) == 2


def test_blocked_runs_do_not_stop_younger_runs_from_being_claimed(nbflow_env, tmp_path, monkeypatch):
    store = open_store()
    add_flow(store, tmp_path, "slow", limit=1)
    add_flow(store, tmp_path, "free")
    blocked = queue(store, "slow", 7)
    later = queue(store, "free", 3)
    monkeypatch.setattr(concurrency, "PAGE_SIZE", 2)  # the free runs are several pages down the queue
    assert claim(store, "w", 3) == [blocked[0], *later[:2]]
    assert claim(store, "w", 3) == [later[2]]
    assert claim(store, "w", 3) == []


def test_tag_limit_spans_every_flow_carrying_the_tag(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "train", tags=("gpu",))
    add_flow(store, tmp_path, "render", tags=("gpu", "big"))
    add_flow(store, tmp_path, "report", tags=("cpu",))
    set_limit(store, "gpu", 2)
    train, render, report = queue(store, "train", 3), queue(store, "render", 3), queue(store, "report", 3)
    got = claim(store, "w", 10)
    assert got == [*train[:2], *report]  # two gpu runs in all, the untagged flow unaffected
    finish(store, [train[0]])
    assert claim(store, "w", 10) == [train[2]]
    finish(store, [train[1], train[2]])
    assert claim(store, "w", 10) == render[:2]


def test_global_limit_counts_every_run(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "a")
    add_flow(store, tmp_path, "b", limit=5)
    set_limit(store, concurrency.GLOBAL, 3)
    a, b = queue(store, "a", 3), queue(store, "b", 3)
    assert claim(store, "w1", 10) == a
    assert claim(store, "w2", 10) == []
    finish(store, a[:2])
    assert claim(store, "w2", 10) == b[:2]
    with store.write() as session:
        concurrency.remove_tag_limit(session, concurrency.GLOBAL)
    assert claim(store, "w2", 10) == b[2:]


def test_cancel_new_cancels_what_finds_the_flow_full_and_tag_limits_still_enqueue(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "once", limit=1, collision="cancel-new", tags=("db",))
    first, *rest = queue(store, "once", 3)
    assert claim(store, "w", 5) == [first]
    with store.read() as session:
        for run_id in rest:
            run = session.get(Run, run_id)
            assert (run.state, run.worker_id) == ("CANCELLED", None)
            assert run.state_message == "flow 'once' is at its concurrency limit of 1 (collision strategy cancel-new)"
            assert [e.to_state for e in session.execute(select(RunStateEvent).where(
                RunStateEvent.run_id == run_id).order_by(RunStateEvent.id)).scalars()] == ["PENDING", "CANCELLED"]
    # a tag (or the global) limit is shared capacity, never a reason to cancel: the run waits
    finish(store, [first])
    add_flow(store, tmp_path, "other", tags=("db",))
    set_limit(store, "db", 1)
    [busy] = queue(store, "other")
    assert claim(store, "w", 5) == [busy]
    [waits] = queue(store, "once")
    assert claim(store, "w", 5) == []
    with store.read() as session:
        assert (session.get(Run, waits).state, session.get(Run, waits).worker_id) == ("PENDING", None)


def test_slots_are_run_states_held_retries_and_foreground_runs_included(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "r", limit=1, retries=1)
    older, younger = queue(store, "r", 2)
    assert claim(store, "w", 5) == [older]
    with store.write() as session:  # the attempt fails; its worker holds the retry while it waits
        run = states.lock_run(session, older)
        states.transition(session, run, states.S.RUNNING)
        assert states.fail(session, run, error=None, message="boom")
        run.expected_start_at = utcnow() + timedelta(hours=1)
    assert claim(store, "w", 5) == []  # the held retry keeps its slot: its worker starts it without a claim
    with store.write() as session:  # the worker went away (what ``reap`` does): the retry is anyone's
        states.lock_run(session, older).worker_id = None
    assert claim(store, "w", 5) == [younger]
    finish(store, [younger])
    # a foreground run (``nbflow run``) is claimed at birth: it bypasses the queue but holds a slot
    fg = create_run(store, "r", worker_id="cli:test")
    queue(store, "r")
    assert claim(store, "w", 5) == []
    finish(store, [fg.id])
    assert len(claim(store, "w", 5)) == 1


def test_claim_without_limits_does_no_extra_work_per_run(nbflow_env, tmp_path):
    store = open_store()
    add_flow(store, tmp_path, "plain", tags=("x",))
    set_limit(store, "unrelated", 1)  # a limit on a tag no candidate carries changes nothing
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        statements.append(statement)

    counts = []
    for n in (1, 20):
        queue(store, "plain", n)
        statements.clear()
        event.listen(store.engine, "before_cursor_execute", record)
        try:
            assert len(claim(store, f"w{n}", n)) == n
        finally:
            event.remove(store.engine, "before_cursor_execute", record)
        counts.append(len([s for s in statements if not s.lstrip().upper().startswith(("BEGIN", "SAVEPOINT"))]))
        assert not [s for s in statements if "count(" in s.lower()], statements
    assert counts[0] == counts[1] <= 4, statements  # due runs, tag limits, candidates, the claim itself


def claim_at_once(store: Store, claimers: int, each: int) -> list[uuid.UUID]:
    """``claimers`` threads call ``claim`` at the same instant; returns every run they took."""
    taken = at_once([lambda worker=f"w{i}": claim(store, worker, each) for i in range(claimers)])
    return [run_id for ids in taken for run_id in ids]


@pytest.mark.parametrize("scope", ["flow", "tag", "global"])
def test_concurrent_claimers_never_exceed_a_limit(nbflow_env, tmp_path, scope):
    """Six claimers at the same instant, round after round: each round fills the limit exactly.

    On PostgreSQL (READ COMMITTED) this fails without the row locks ``concurrency`` takes: two
    claimers both count the same free slots."""
    store = open_store()
    limit, claimers, rounds = 3, 6, 4
    if scope == "flow":
        add_flow(store, tmp_path, "a", limit=limit)
        names = ["a"]
    elif scope == "tag":
        add_flow(store, tmp_path, "a", tags=("gpu",))
        add_flow(store, tmp_path, "b", tags=("gpu", "other"))
        set_limit(store, "gpu", limit)
        names = ["a", "b"]
    else:
        add_flow(store, tmp_path, "a", tags=("gpu",))
        add_flow(store, tmp_path, "b", limit=10)
        set_limit(store, concurrency.GLOBAL, limit)
        names = ["a", "b"]
    for _ in range(rounds * limit):
        for name in names:
            queue(store, name)
    for _ in range(rounds):
        got = claim_at_once(store, claimers, 2)
        assert len(got) == len(set(got)) == limit, f"{len(got)} runs claimed under a limit of {limit}"
        assert in_use(store) == limit
        finish(store, got)
    assert in_use(store) == 0  # nothing leaked


# -- real workers, real notebooks --------------------------------------------------------------------------

def start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nbflow.cli", "worker", "--slots", "3", "--poll", "0.1"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_the_end(env: dict[str, str], cwd: Path, ids: list[uuid.UUID], workers: int = 2) -> list[Run]:
    """Two workers of three slots each execute the runs; returns them, ended."""
    store = open_store()
    procs = [start_worker(env, cwd) for _ in range(workers)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with store.read() as session:
                runs = [session.get(Run, i) for i in ids]
                if all(states.StateType(r.state) in states.TERMINAL for r in runs):
                    break
            time.sleep(0.2)
    finally:
        errs = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                errs.append(p.communicate(timeout=60)[1])
            finally:
                if p.poll() is None:
                    p.kill()
    if [r.state for r in runs] != ["COMPLETED"] * len(ids):
        detail = "; ".join(f"{r.id} {r.state} worker={r.worker_id} started={r.started_at} "
                           f"message={r.state_message!r} error={r.error}" for r in runs)
        pytest.fail(f"not every run completed: {detail}\nworkers' stderr: {errs}", pytrace=False)
    return runs


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of the intervals [start, end) that contain one same instant."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # ends sort first
    best = now = 0
    for _, delta in points:
        now += delta
        best = max(best, now)
    return best


# Each run records that it started, then waits (at most 20 s) until ``need`` runs have started, then
# briefly works: so the first runs admitted are certain to overlap, however slowly kernels start on a
# loaded machine, and "the limit was reached" never depends on timing. Later runs go straight through.
GATHER = ["import pathlib, time, uuid\n"
          "box = pathlib.Path(box)\n"
          "(box / uuid.uuid4().hex).touch()\n"
          "deadline = time.monotonic() + 20\n"
          "while len(list(box.iterdir())) < need and time.monotonic() < deadline:\n"
          "    time.sleep(0.05)\n"
          "time.sleep(0.3)"]
GATHER_PARAMETERS = "box = ''\nneed = 1"


def gathering_flow(store: Store, tmp_path: Path, name: str, **options: object) -> None:
    nb = make_notebook(tmp_path, name, GATHER, parameters=GATHER_PARAMETERS)
    register(store, nb, name=name, options=FlowOptions(**options))  # type: ignore[arg-type]


def test_workers_never_run_more_of_a_flow_than_its_limit(nbflow_env, tmp_path):
    store = open_store()
    gathering_flow(store, tmp_path, "limited", concurrency_limit=2)
    box = tmp_path / "box"
    box.mkdir()
    ids = [create_run(store, "limited", {"box": str(box), "need": 2}).id for _ in range(4)]
    runs = run_to_the_end(nbflow_env, tmp_path, ids)
    # six free worker slots, four queued runs: only the limit held them back, and it was reached
    assert max_overlap([(r.started_at, r.ended_at) for r in runs]) == 2
    assert in_use(store) == 0
    with store.read() as session:
        assert session.execute(select(func.count(RunStateEvent.id)).where(
            RunStateEvent.to_state == "RUNNING")).scalar() == 4  # each ran exactly once


def test_workers_respect_tag_and_global_limits_together(nbflow_env, tmp_path):
    store = open_store()
    for name in ("gpu-a", "gpu-b"):
        gathering_flow(store, tmp_path, name, tags=("gpu",))
    gathering_flow(store, tmp_path, "cpu")
    set_limit(store, "gpu", 2)
    set_limit(store, concurrency.GLOBAL, 3)
    box = tmp_path / "box"
    box.mkdir()
    ids = [create_run(store, name, {"box": str(box), "need": 3}).id
           for _ in range(2) for name in ("gpu-a", "gpu-b", "cpu")]
    runs = run_to_the_end(nbflow_env, tmp_path, ids)
    with store.read() as session:
        gpu = [r for r in runs if session.get(Run, r.id).flow.name.startswith("gpu")]
    assert max_overlap([(r.started_at, r.ended_at) for r in runs]) == 3
    assert max_overlap([(r.started_at, r.ended_at) for r in gpu]) == 2
    assert in_use(store) == 0


# -- the command line -------------------------------------------------------------------------------------


def test_register_concurrency_and_limits_commands(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "etl", ["x = 1"])
    doc = json.loads(nbflow(sqlite_env, tmp_path, "register", str(nb), "--tag", "db", "--concurrency", "2",
                            "--collision", "cancel-new", "--json").stdout)
    assert (doc["concurrency_limit"], doc["collision"]) == (2, "cancel-new")
    assert nbflow(sqlite_env, tmp_path, "limits", "set", "db", "4").stdout.strip() == (
        "tag db: at most 4 run(s) at once (0 in use)")
    assert json.loads(nbflow(sqlite_env, tmp_path, "limits", "set", "--global", "8", "--json").stdout) == {
        "scope": "global", "name": "*", "limit": 8, "in_use": 0, "collision": "enqueue"}
    listing = json.loads(nbflow(sqlite_env, tmp_path, "limits", "list", "--json").stdout)["limits"]
    assert [(d["scope"], d["name"], d["limit"], d["collision"]) for d in listing] == [
        ("global", "*", 8, "enqueue"), ("tag", "db", 4, "enqueue"), ("flow", "etl", 2, "cancel-new")]
    assert nbflow(sqlite_env, tmp_path, "limits", "remove", "--global").returncode == 0
    assert nbflow(sqlite_env, tmp_path, "limits", "remove", "db").returncode == 0
    # --concurrency 0 removes the flow's limit; options not given keep their values
    doc = json.loads(nbflow(sqlite_env, tmp_path, "register", str(nb), "--concurrency", "0", "--json").stdout)
    assert (doc["concurrency_limit"], doc["collision"]) == (None, "cancel-new")
    assert nbflow(sqlite_env, tmp_path, "limits", "list").stdout.startswith("no concurrency limits")
    assert "  limits " in nbflow(sqlite_env, tmp_path, "--help").stdout
    assert "(TAG | --global) N" in nbflow(sqlite_env, tmp_path, "limits", "set", "--help").stdout


@pytest.mark.parametrize(("args", "message"), [
    (["register", "NB", "--concurrency", "-1"],
     "--concurrency must be a whole number of runs, at least 1 (or 0 to remove the limit); got -1"),
    (["register", "NB", "--collision", "drop-old"],
     "collision strategy must be 'enqueue' or 'cancel-new'; got 'drop-old'"),
    (["limits", "set", "gpu", "0"], "the limit of tag 'gpu' must be a whole number of runs, at least 1; got 0"),
    (["limits", "set", "--global", "-2"], "the global limit must be a whole number of runs, at least 1; got -2"),
    (["limits", "set", "gpu", "many"], "the limit must be a whole number of runs, at least 1; got 'many'"),
    (["limits", "set", "gpu"], "usage: nbflow limits set TAG N, or nbflow limits set --global N"),
    (["limits", "remove", "gpu"], "no concurrency limit on tag 'gpu'; no limits are set"),
    (["limits", "remove", "--global"], "no global concurrency limit is set; no limits are set"),
])
def test_bad_limits_are_one_line_errors_and_change_nothing(sqlite_env, tmp_path, args, message):
    nb = make_notebook(tmp_path, "nb", ["x = 1"])
    proc = nbflow(sqlite_env, tmp_path, *[str(nb) if a == "NB" else a for a in args])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"nbflow: error: {message}\n"
    store = open_store()
    with store.read() as session:
        assert session.execute(select(func.count(TagLimit.tag))).scalar() == 0
        assert concurrency.list_limits(session) == []
