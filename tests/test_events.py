"""Event triggers: pipelines (``--after``) and file arrivals (``--on-file``), each event exactly one run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import at_once, make_notebook, nbflow, start
from sqlalchemy import func, select

from nbflow.core import states
from nbflow.core.flows import FlowOptions, register
from nbflow.core.runs import create_run
from nbflow.errors import FlowNotFound, ParameterError, TriggerError
from nbflow.services import events
from nbflow.store import open_store
from nbflow.store.models import FileSeen, FileTrigger, Flow, FlowDependency, Run, utcnow


def flow(tmp_path: Path, name: str, parameters: str | None = None, cells: tuple[str, ...] = ("pass",),
         **options: object) -> str:
    nb = make_notebook(tmp_path, name, list(cells), parameters=parameters)
    register(open_store(), nb, name=name, options=FlowOptions(**options))  # type: ignore[arg-type]
    return name


def ended_run(flow_name: str, state: str = "COMPLETED", result: dict | None = None) -> uuid.UUID:
    """A run of ``flow_name`` taken through the state machine to ``state``, as a worker would."""
    store = open_store()
    run_id = create_run(store, flow_name).id
    with store.write() as session:
        run = states.lock_run(session, run_id)
        states.transition(session, run, states.S.RUNNING)
        run.result = result or {}
        if state == "COMPLETED":
            states.finish(session, run)
        elif state in ("FAILED", "CRASHED"):
            error = {"ename": "E", "evalue": "boom", "traceback": [], "cell_index": None, "cell_id": None}
            states.fail(session, run, error=error, crashed=state == "CRASHED")
        else:
            states.transition(session, run, states.S.CANCELLING)
            states.transition(session, run, states.S.CANCELLED)
    return run_id


def runs_of(flow_name: str) -> list[Run]:
    with open_store().read() as session:
        return list(session.execute(select(Run).join(Flow, Flow.id == Run.flow_id).where(Flow.name == flow_name)
                                    .order_by(Run.created_at, Run.id)).scalars())


def dependencies() -> list[tuple[str, str, str]]:
    with open_store().read() as session:
        names = dict(session.execute(select(Flow.id, Flow.name)).all())
        return sorted((names[d.flow_id], names[d.upstream_flow_id], d.on)
                      for d in session.execute(select(FlowDependency)).scalars())


# -- pipelines, one pass at a time ------------------------------------------------------------------


def test_pipeline_run_gets_matching_results_once(nbflow_env, tmp_path, caplog):
    flow(tmp_path, "A")
    flow(tmp_path, "B", parameters="x: int = 0\nn: int = 1\nlabel = 'none'")
    events.set_dependencies(open_store(), "B", ["A"])
    a = ended_run("A", result={"x": 7, "n": "many", "unrelated": [1, 2]})
    with caplog.at_level(logging.WARNING, logger="nbflow.events"):
        created = events.fire_events(open_store())
    assert len(created) == 1
    (b,) = runs_of("B")
    assert b.id == created[0]
    assert (b.state, b.trigger, b.parent_run_id, b.idempotency_key) == ("PENDING", "event", a, f"after:{a}:{b.flow_id}")
    assert b.parameters == {"x": 7}  # n does not fit an int: left out (B's default applies), with a warning
    assert b.kernel_name == "python3"
    assert "result 'n' not passed on: parameter 'n' expects an int" in caplog.text
    assert events.fire_events(open_store()) == []
    assert events.fire_events(open_store()) == []
    assert len(runs_of("B")) == 1


def test_completed_or_any_end_and_never_history(nbflow_env, tmp_path):
    flow(tmp_path, "up", retries=1)
    flow(tmp_path, "down")
    store = open_store()
    before = ended_run("up")
    events.set_dependencies(store, "down", ["up"])  # on="completed"
    assert events.fire_events(store) == []  # a run that ended before the dependency never fires
    failed = ended_run("up", "FAILED")  # retries left: it is SCHEDULED again, not ended
    with store.read() as session:
        assert session.get(Run, failed).state == "SCHEDULED"
    with store.write() as session:  # the last attempt fails for good
        run = states.lock_run(session, failed)
        states.transition(session, run, states.S.PENDING)
        states.transition(session, run, states.S.RUNNING)
        states.fail(session, run, error=None)
    assert events.fire_events(store) == []  # FAILED does not count for on="completed"
    ok = ended_run("up")
    assert len(events.fire_events(store)) == 1
    events.set_dependencies(store, "down", ["up"], on="any")  # changing `on` starts the dependency anew
    assert dependencies() == [("down", "up", "any")]
    assert events.fire_events(store) == []  # the earlier FAILED run does not fire now
    flow(tmp_path, "up", retries=0)  # now a failure is final at once
    ends = [ended_run("up", state) for state in ("FAILED", "CANCELLED", "CRASHED", "COMPLETED")]
    assert len(events.fire_events(store)) == 4
    parents = sorted(str(r.parent_run_id) for r in runs_of("down"))
    assert parents == sorted(str(i) for i in (ok, *ends))
    assert str(before) not in parents


def test_a_tick_looks_at_recent_runs_and_a_sweep_at_all(nbflow_env, tmp_path):
    flow(tmp_path, "up")
    flow(tmp_path, "down")
    store = open_store()
    events.set_dependencies(store, "down", ["up"])
    old = ended_run("up")
    with store.write() as session:  # queued two days ago, ended just now
        session.get(Run, old).created_at = utcnow() - timedelta(days=2)
    assert events.fire_events(store, full=False) == []  # outside the window of a tick
    (created,) = events.fire_events(store, full=True)  # the sweep finds it
    assert [(r.id, r.parent_run_id) for r in runs_of("down")] == [(created, old)]
    recent = ended_run("up")
    assert len(events.fire_events(store, full=False)) == 1
    assert [r.parent_run_id for r in runs_of("down")] == [old, recent]
    assert events.fire_events(store) == events.fire_events(store, full=True) == []


def test_concurrent_passes_create_one_run_per_upstream_run(nbflow_env, tmp_path):
    flow(tmp_path, "src")
    flow(tmp_path, "sink")
    store = open_store()
    events.set_dependencies(store, "sink", ["src"])
    ended = {ended_run("src") for _ in range(5)}
    results = at_once([lambda: events.fire_events(store)] * 6)
    assert sum(len(r) for r in results) == 5
    assert sorted(str(r.parent_run_id) for r in runs_of("sink")) == sorted(map(str, ended))


def test_chain_runs_each_flow_once(nbflow_env, tmp_path):
    flow(tmp_path, "A")
    flow(tmp_path, "B", parameters="x = 0")
    flow(tmp_path, "C", parameters="y = 0")
    store = open_store()
    events.set_dependencies(store, "B", ["A"])
    events.set_dependencies(store, "C", ["B"])
    a = ended_run("A", result={"x": 2})
    (b_id,) = events.fire_events(store)
    with store.write() as session:  # the worker runs B, which records y
        b = states.lock_run(session, b_id)
        assert b.parameters == {"x": 2}
        states.transition(session, b, states.S.RUNNING)
        b.result = {"y": 4}
        states.finish(session, b)
    (c_id,) = events.fire_events(store)
    with store.write() as session:
        c = states.lock_run(session, c_id)
        assert (c.parameters, c.parent_run_id) == ({"y": 4}, b_id)
        states.transition(session, c, states.S.RUNNING)
        states.finish(session, c)
    assert events.fire_events(store) == []
    assert [len(runs_of(n)) for n in "ABC"] == [1, 1, 1]
    assert runs_of("B")[0].parent_run_id == a


def test_dependency_checks_write_nothing(nbflow_env, tmp_path):
    for name in "ABC":
        flow(tmp_path, name)
    store = open_store()
    events.set_dependencies(store, "B", ["A"])
    events.set_dependencies(store, "C", ["B"])
    with pytest.raises(FlowNotFound, match="no flow named 'nope'"):
        events.set_dependencies(store, "A", ["nope"])
    with pytest.raises(TriggerError, match="flow 'A' cannot run after itself"):
        events.set_dependencies(store, "A", ["A"])
    with pytest.raises(TriggerError, match=r"--after C would make a cycle \(A -> B -> C -> A\)"):
        events.set_dependencies(store, "A", ["C"])
    with pytest.raises(TriggerError, match="--after B would make a cycle"):
        events.set_dependencies(store, "A", ["B"])
    with pytest.raises(TriggerError, match="unknown --after-on 'sometimes'"):
        events.set_dependencies(store, "C", ["A"], on="sometimes")
    assert dependencies() == [("B", "A", "completed"), ("C", "B", "completed")]
    # Replacing B's upstream set is not a cycle even though B's old edge pointed the other way.
    events.set_dependencies(store, "B", ["A", "A"])
    events.set_dependencies(store, "C", [])
    events.set_dependencies(store, "A", ["C"])
    assert dependencies() == [("A", "C", "completed"), ("B", "A", "completed")]


# -- file triggers, one pass at a time --------------------------------------------------------------


def write(path: Path, text: str, age: float = 5.0) -> Path:
    """A file whose last modification was ``age`` seconds ago (0: being written now)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_file_trigger_fires_once_per_new_settled_file(nbflow_env, tmp_path):
    flow(tmp_path, "ingest", parameters="path = ''")
    inbox = tmp_path / "inbox"
    write(inbox / "old.csv", "old")
    (inbox / "dir.csv").mkdir()
    store = open_store()
    trigger = events.add_file_trigger(store, "ingest", "inbox/*.csv", cwd=tmp_path)
    assert trigger.pattern == str(inbox / "*.csv") and trigger.parameter == "path"
    assert events.fire_events(store) == []  # what was there at creation is not an arrival
    new = write(inbox / "new.csv", "new")
    write(inbox / "new.txt", "other")
    fresh = write(inbox / "fresh.csv", "half", age=0)  # still being written
    (first,) = events.fire_events(store)
    assert events.fire_events(store) == []
    later = events.fire_events(store, now=utcnow() + timedelta(seconds=5))  # fresh.csv has settled
    assert len(later) == 1
    runs = runs_of("ingest")
    assert [(r.id, r.parameters, r.trigger, r.state) for r in runs] == [
        (first, {"path": str(new)}, "event", "PENDING"), (later[0], {"path": str(fresh)}, "event", "PENDING")]
    with store.read() as session:
        seen = dict(session.execute(select(FileSeen.path, FileSeen.run_id)).all())
    assert seen == {str(inbox / "old.csv"): None, str(new): first, str(fresh): later[0]}
    # Registering the same pattern again keeps its history: nothing fires twice.
    events.set_file_triggers(store, "ingest", [str(inbox / "*.csv")])
    assert events.fire_events(store, now=utcnow() + timedelta(seconds=5)) == []


def test_concurrent_passes_take_each_file_once(nbflow_env, tmp_path):
    flow(tmp_path, "ingest", parameters="path = ''")
    store = open_store()
    events.add_file_trigger(store, "ingest", str(tmp_path / "drop" / "**" / "*.json"))
    files = [write(tmp_path / "drop" / sub / f"{i}.json", "{}") for i, sub in enumerate(["", "a", "a/b"])]
    results = at_once([lambda: events.fire_events(store)] * 4)
    assert sum(len(r) for r in results) == 3
    assert sorted(r.parameters["path"] for r in runs_of("ingest")) == sorted(map(str, files))


def test_trigger_pauses_when_its_parameter_no_longer_fits(sqlite_env, tmp_path, caplog):
    flow(tmp_path, "ingest", parameters="path = ''")
    store = open_store()
    events.add_file_trigger(store, "ingest", str(tmp_path / "in" / "*"))
    flow(tmp_path, "ingest", parameters="source = ''")  # the notebook renamed its parameter
    write(tmp_path / "in" / "a", "a")
    with caplog.at_level(logging.ERROR, logger="nbflow.events"):
        assert events.fire_events(store) == []
    assert "paused" in caplog.text
    with store.read() as session:
        assert session.execute(select(FileTrigger.active)).scalar_one() is False
    events.set_file_triggers(store, "ingest", [str(tmp_path / "in" / "*")], "source")  # resumes it
    (run_id,) = events.fire_events(store)  # the file that waited fires now
    assert [(r.id, r.parameters) for r in runs_of("ingest")] == [(run_id, {"source": str(tmp_path / "in" / "a")})]


def test_file_trigger_checks(sqlite_env, tmp_path):
    flow(tmp_path, "ingest", parameters="path = ''\nn = 1")
    flow(tmp_path, "free")  # no parameters cell: any name is accepted, as papermill would inject it
    store = open_store()
    (tmp_path / "dir").mkdir()
    for pattern, message in [("", "needs a glob"), ("  ", "needs a glob"), ("in/", "names directories"),
                             ("dir", "it is a directory"), ("a\0b", "NUL")]:
        with pytest.raises(TriggerError, match=message):
            events.add_file_trigger(store, "ingest", pattern, cwd=tmp_path)
    with pytest.raises(ParameterError, match="declares no parameter 'file'"):
        events.add_file_trigger(store, "ingest", "*.csv", "file", cwd=tmp_path)
    with pytest.raises(ParameterError, match="'n' cannot receive a file path"):
        events.add_file_trigger(store, "ingest", "*.csv", "n", cwd=tmp_path)
    with pytest.raises(FlowNotFound):
        events.add_file_trigger(store, "nope", "*.csv", cwd=tmp_path)
    assert events.add_file_trigger(store, "free", "~/x/../*.csv", "anything").pattern == str(
        Path.home() / "*.csv")
    with store.read() as session:
        assert session.execute(select(func.count()).select_from(FileTrigger)).scalar_one() == 1


# -- the command line -------------------------------------------------------------------------------


def test_register_rejects_bad_events_and_writes_nothing(sqlite_env, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nbflow.cli import cli

    def register_cli(*args: str):  # in-process: these fail before any kernel or run process is involved
        return CliRunner().invoke(cli, ["register", *args])

    monkeypatch.chdir(tmp_path)
    a = make_notebook(tmp_path, "A", ["pass"])
    b = make_notebook(tmp_path, "B", ["pass"], parameters="x = 0")
    assert register_cli(str(a)).exit_code == 0
    cases = [
        ((str(b), "--after", "nope"), "no flow named 'nope'"),
        ((str(b), "--after", "B"), "flow 'B' cannot run after itself"),
        ((str(b), "--after", "A", "--after-on", "sometimes"), "unknown --after-on 'sometimes'"),
        ((str(b), "--after-on", "any"), "--after-on needs --after FLOW"),
        ((str(b), "--on-file", ""), "--on-file needs a glob"),
        ((str(b), "--on-file", "."), "it is a directory"),
        ((str(b), "--on-file", "in/*.csv", "--file-param", "file"), "declares no parameter 'file'"),
        ((str(b), "--file-param", "x"), "--file-param needs --on-file GLOB"),
        ((str(a), "--after", "B"), "no flow named 'B'"),
    ]
    for args, message in cases:
        result = register_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("nbflow: error: ") and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # A cycle: B after A is fine; A after B then closes a loop, and A's other options are not applied either.
    assert register_cli(str(b), "--after", "A").exit_code == 0
    proc = nbflow(sqlite_env, tmp_path, "register", str(a), "--after", "B", "--retries", "3")
    assert proc.returncode == 2 and proc.stderr == (
        "nbflow: error: --after B would make a cycle (A -> B -> A): a pipeline cannot loop\n")
    docs = {d["name"]: d for d in json.loads(nbflow(sqlite_env, tmp_path, "flows", "--json").stdout)["flows"]}
    assert sorted(docs) == ["A", "B"]
    assert (docs["A"]["after"], docs["A"]["retries"], docs["A"]["file_triggers"]) == ([], 0, [])
    assert (docs["B"]["after"], docs["B"]["file_triggers"]) == ([{"flow": "A", "on": "completed"}], [])


# -- end to end: real scheduler and worker processes, real kernels ----------------------------------


def wait_until(predicate, procs: tuple[subprocess.Popen, ...], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    for p in procs:
        p.kill()
    with open_store().read() as session:
        seen = [(r.flow_id, r.state, r.worker_id, r.state_message) for r in session.execute(select(Run)).scalars()]
    raise AssertionError(f"timed out; runs: {seen}; " + " | ".join(p.communicate()[1][-3000:] for p in procs))


def stop(*procs: subprocess.Popen) -> list[str]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        errs.append(err)
    return errs


def test_pipeline_a_b_c_end_to_end(nbflow_env, tmp_path):
    a = make_notebook(tmp_path, "A", ["import nbflow\nnbflow.record('x', 21)"])
    b = make_notebook(tmp_path, "B", ["import nbflow\nnbflow.record('y', x * 2)"], parameters="x = 0")
    c = make_notebook(tmp_path, "C", ["import nbflow\nnbflow.record('got', y)"], parameters="y: int = 0")
    register(open_store(), a, name="A")
    reg = nbflow(nbflow_env, tmp_path, "register", str(b), "--after", "A", "--json")
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout)["after"] == [{"flow": "A", "on": "completed"}]
    reg = nbflow(nbflow_env, tmp_path, "register", str(c), "--after", "B")
    assert reg.returncode == 0 and "runs after: B (completed)" in reg.stdout, reg.stderr
    create_run(open_store(), "A")  # as `nbflow trigger A` does
    sched = start(nbflow_env, tmp_path, "scheduler", "--tick", "0.2", "--exit-after", "120")
    worker = start(nbflow_env, tmp_path, "worker", "--poll", "0.2")
    try:
        wait_until(lambda: any(r.state in states.TERMINAL for r in runs_of("C")), (sched, worker))
        time.sleep(0.6)  # a few more scheduler ticks: nothing else may fire
    finally:
        sched_err, _ = stop(sched, worker)
    (ra,), (rb,), (rc,) = runs_of("A"), runs_of("B"), runs_of("C")
    assert [r.state for r in (ra, rb, rc)] == ["COMPLETED"] * 3, [(r.state, r.error) for r in (ra, rb, rc)]
    assert (rb.parameters, rb.parent_run_id, rb.trigger) == ({"x": 21}, ra.id, "event")
    assert (rc.parameters, rc.parent_run_id, rc.result) == ({"y": 42}, rb.id, {"got": 42})
    assert sched_err.count("queued run") == 2  # B and C, reported like fired schedule runs


def test_file_trigger_end_to_end(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "ingest", ["import nbflow, pathlib\n"
                                            "nbflow.record('content', pathlib.Path(path).read_text())"],
                       parameters="path = ''")
    incoming = tmp_path / "data" / "incoming"
    write(incoming / "old.csv", "old")
    reg = nbflow(nbflow_env, tmp_path, "register", str(nb), "--on-file", "data/incoming/*.csv", "--json")
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout)["file_triggers"] == [
        {"pattern": str(incoming / "*.csv"), "parameter": "path", "active": True}]
    sched = start(nbflow_env, tmp_path, "scheduler", "--tick", "0.2", "--exit-after", "120")
    worker = start(nbflow_env, tmp_path, "worker", "--poll", "0.2")
    try:
        (incoming / "a.csv").write_text("alpha")
        (incoming / "b.csv").write_text("beta")
        (incoming / "notes.txt").write_text("not a csv")
        wait_until(lambda: sum(r.state in states.TERMINAL for r in runs_of("ingest")) >= 2, (sched, worker))
        time.sleep(1.5)  # past the settling second again: nothing else may fire
    finally:
        sched_err, _ = stop(sched, worker)
    runs = runs_of("ingest")
    assert sorted((r.parameters["path"], r.state, r.result["content"]) for r in runs) == [
        (str(incoming / "a.csv"), "COMPLETED", "alpha"), (str(incoming / "b.csv"), "COMPLETED", "beta")]
    assert sched_err.count("queued run") == 2


# -- bad rows never stop a pass ---------------------------------------------------------------------


def test_a_bad_upstream_run_is_skipped_once_and_the_others_fire(nbflow_env, tmp_path, caplog):
    flow(tmp_path, "A")
    flow(tmp_path, "B", parameters="x = 1")
    store = open_store()
    events.set_dependencies(store, "B", ["A"])
    bad = ended_run("A")
    with store.write() as session:  # a result an old version (or a hand edit) stored: not an object
        session.get(Run, bad).result = ["not", "an", "object"]
    good = ended_run("A", result={"x": 5})
    with caplog.at_level(logging.ERROR, logger="nbflow.events"):
        (created,) = events.fire_events(store, full=True)
        assert events.fire_events(store, full=True) == []  # the bad one is not retried at every tick
    (run,) = runs_of("B")
    assert (run.id, run.parent_run_id, run.parameters) == (created, good, {"x": 5})
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert f"after run {bad}" in caplog.text and "skipped" in caplog.text
    from nbflow.store.models import Log

    with open_store().read() as session:  # and where the upstream run's owner looks: its log
        notes = list(session.execute(select(Log.text).where(Log.run_id == bad, Log.stream == "system")).scalars())
    assert len(notes) == 1 and notes[0].startswith("pipeline to flow id ") and "AttributeError" in notes[0]


def test_a_file_trigger_whose_pattern_cannot_be_walked_is_paused_and_the_others_fire(sqlite_env, tmp_path,
                                                                                       caplog):
    flow(tmp_path, "ingest", parameters="path = ''")
    store = open_store()
    good = events.add_file_trigger(store, "ingest", str(tmp_path / "in" / "*"))
    with store.write() as session:  # SQLite stores a NUL that every door refuses; glob cannot walk it
        session.add(FileTrigger(flow_id=good.flow_id, pattern=f"{tmp_path}/bad\x00/*", parameter="path",
                                active=True, created_at=utcnow()))
    arrived = write(tmp_path / "in" / "a.csv", "a")
    with caplog.at_level(logging.ERROR, logger="nbflow.events"):
        (run_id,) = events.fire_events(store)
    assert [(r.id, r.parameters) for r in runs_of("ingest")] == [(run_id, {"path": str(arrived)})]
    with store.read() as session:
        active = dict(session.execute(select(FileTrigger.id, FileTrigger.active)).all())
    assert active.pop(good.id) is True and list(active.values()) == [False]
    assert "paused: its pattern cannot be matched (ValueError: embedded null byte)" in caplog.text
