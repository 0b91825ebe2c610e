"""A paused flow: its schedules skip their slots, its pipeline and file events wait until it is resumed,
and a run asked for by hand still runs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from test_events import ended_run, flow, runs_of

from nbflow.core.flows import flow_documents, get_flow, set_paused
from nbflow.core.runs import create_run
from nbflow.errors import FlowNotFound
from nbflow.services import events
from nbflow.services.scheduler import add_schedule, fire_due
from nbflow.store import open_store
from nbflow.store.models import Schedule, utcnow


def test_paused_flag_and_document(nbflow_env, tmp_path: Path) -> None:
    flow(tmp_path, "A")
    store = open_store()
    with store.read() as session:
        assert flow_documents(session, [get_flow(session, "A")])[0]["paused"] is False
    set_paused(store, "A", True)
    with store.read() as session:
        assert flow_documents(session, [get_flow(session, "A")])[0]["paused"] is True
    assert create_run(store, "A").state == "PENDING"  # by hand: still runs
    with pytest.raises(FlowNotFound):
        set_paused(store, "ghost", True)


def test_schedules_of_a_paused_flow_skip_their_slots(nbflow_env, tmp_path: Path) -> None:
    flow(tmp_path, "A")
    store = open_store()
    start = utcnow()
    add_schedule(store, "A", interval="1m", now=start)
    set_paused(store, "A", True)
    assert fire_due(store, now=start + timedelta(seconds=61)) == []
    with store.read() as session:  # the slot passed: the schedule moved on, so resuming fires no backlog
        assert session.execute(select(Schedule.next_fire_at)).scalar_one() > start + timedelta(seconds=61)
    set_paused(store, "A", False)
    assert fire_due(store, now=start + timedelta(seconds=61)) == []
    assert len(fire_due(store, now=start + timedelta(seconds=121))) == 1


def test_pipeline_and_file_events_of_a_paused_flow_wait(nbflow_env, tmp_path: Path) -> None:
    flow(tmp_path, "A")
    flow(tmp_path, "B")
    flow(tmp_path, "F", parameters="path = ''")
    store = open_store()
    events.set_dependencies(store, "B", ["A"])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    events.add_file_trigger(store, "F", str(inbox / "*.csv"), parameter="path")
    set_paused(store, "B", True)
    set_paused(store, "F", True)
    ended_run("A")
    (inbox / "x.csv").write_text("1")
    later = utcnow() + timedelta(seconds=5)
    assert events.fire_events(store, later, full=True) == []
    assert runs_of("B") == [] and runs_of("F") == []
    set_paused(store, "B", False)
    set_paused(store, "F", False)
    assert len(events.fire_events(store, later, full=True)) == 2
    assert len(runs_of("B")) == 1
    assert [r.parameters for r in runs_of("F")] == [{"path": str(inbox / "x.csv")}]
