"""The ipywidgets dashboard and ``watch``, built against a real store (SQLite and PostgreSQL) with known
runs: what the widget tree shows, what its buttons write, how it pages through many runs, and how its
background refresh behaves. Widgets live without a front-end here; their trait values are exactly what
a front-end would be sent.
"""

from __future__ import annotations

import html
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import at_once, make_notebook, serve_api, until
from helpers import nbflow as nbflow_cli
from sqlalchemy import String, Uuid, cast, event, func, insert, literal, literal_column, select

import nbflow
from nbflow.core import states
from nbflow.core.flows import register
from nbflow.core.runs import create_run
from nbflow.errors import NbflowError, RunNotFound
from nbflow.jupyter.backend import get_backend
from nbflow.jupyter.widgets import Dashboard, RunWatch, dashboard, watch
from nbflow.services.scheduler import add_schedule
from nbflow.store import Store, open_store
from nbflow.store.models import CellRun, Flow, FlowVersion, Run, utcnow

S = states.S




def move(store: Store, run_id: str, *path: states.StateType, error: dict[str, Any] | None = None) -> None:
    """Walk a run through legal transitions (FAILED through ``states.fail``, with ``error``)."""
    with store.write() as session:
        run = states.lock_run(session, uuid.UUID(run_id))
        for to in path:
            if to is S.FAILED:
                states.fail(session, run, error=error, message="ValueError: boom")
            else:
                states.transition(session, run, to)


def state_of(store: Store, run_id: str) -> str:
    with store.read() as session:
        run = session.get(Run, uuid.UUID(run_id))
        assert run is not None
        return run.state


def paused_in_store(store: Store) -> dict[str, bool]:
    with store.read() as session:
        return {name: paused for name, paused in session.execute(select(Flow.name, Flow.paused))}


def runs_in_store(store: Store) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(Run.created_at)).scalars())


def row_texts(dash: Dashboard) -> list[str]:
    return [box.children[1].value for box in dash.runs.rows.children]


def buttons(widget: Any, css: str) -> list[Any]:
    """Every button under ``widget`` carrying the CSS class ``css`` (as the browser test finds them)."""
    found = [widget] if css in getattr(widget, "_dom_classes", ()) else []
    for child in getattr(widget, "children", ()):
        found.extend(buttons(child, css))
    return found


def text(widget: Any) -> str:
    """An HTML widget's value as a reader sees it (entities decoded)."""
    return html.unescape(widget.value)


@pytest.fixture
def env(nbflow_env: dict[str, str], tmp_path: Path) -> Iterator[Store]:
    """An isolated instance with two flows: ``etl`` (parameters region/days) and ``report``."""
    make_notebook(tmp_path, "etl", ["print('rows', days)", "import nbflow\nnbflow.record('rows', days * 10)"],
                  parameters='region = "EU"  # where\ndays = 7')
    make_notebook(tmp_path, "report", ["x = 1"])
    store = open_store()
    register(store, tmp_path / "etl.ipynb")
    register(store, tmp_path / "report.ipynb")
    yield store


# -- tables ---------------------------------------------------------------------------------------------


def test_runs_table_rows_newest_first_with_state_badges_and_flow_rows(env: Store) -> None:
    a = create_run(env, "etl", {"days": 3})
    b = create_run(env, "report")
    c = create_run(env, "etl", {"region": "US"})
    move(env, str(a.id), S.RUNNING, S.COMPLETED)
    move(env, str(b.id), S.RUNNING, S.FAILED, error={"ename": "ValueError", "evalue": "boom"})

    dash = dashboard(refresh=None)
    assert dash.runs.run_ids == [str(c.id), str(b.id), str(a.id)]
    rows = row_texts(dash)
    assert "nbflow-state-pending" in rows[0] and 'region=&quot;US&quot;' in rows[0]
    assert "nbflow-state-failed" in rows[1] and ">report<" in rows[1]
    assert "nbflow-state-completed" in rows[2] and "days=3" in rows[2] and ">manual<" in rows[2]
    assert [box.children[0].description for box in dash.runs.rows.children] == [str(r.id)[:8] for r in (c, b, a)]
    assert len(buttons(dash.runs, "nbflow-open-run")) == 3
    assert "runs 1-3 of 3" in dash.runs.page_label.value

    assert dash.flows.names == ["etl", "report"]
    etl_row, report_row = (box.children[0].value for box in dash.flows.rows.children)
    assert "<b>etl</b>" in etl_row and "v1" in etl_row and "manual" in etl_row
    assert "nbflow-state-pending" in etl_row  # the newest etl run is c, PENDING
    assert "nbflow-state-failed" in report_row
    assert "nbflow-runs-table" in dash.runs._dom_classes and "nbflow-flows-table" in dash.flows._dom_classes


def test_filters_by_flow_and_state(env: Store) -> None:
    etl = [create_run(env, "etl") for _ in range(3)]
    report = create_run(env, "report")
    move(env, str(etl[1].id), S.CANCELLED)

    dash = dashboard(refresh=None)
    dash.runs.flow_filter.value = "report"
    assert dash.runs.run_ids == [str(report.id)]
    assert "runs 1-1 of 1" in dash.runs.page_label.value
    dash.runs.flow_filter.value = "etl"
    assert dash.runs.run_ids == [str(r.id) for r in reversed(etl)]
    dash.runs.state_filter.value = "CANCELLED"
    assert dash.runs.run_ids == [str(etl[1].id)]
    dash.runs.flow_filter.value = "report"
    assert dash.runs.run_ids == [] and "no runs" in dash.runs.page_label.value
    # The flow list in the filter follows the flows in the store.
    assert [v for _label, v in dash.runs.flow_filter.options] == ["", "etl", "report"]


def test_paging_next_and_prev_with_the_before_cursor(env: Store) -> None:
    made = [str(create_run(env, "etl").id) for _ in range(7)]
    newest_first = made[::-1]
    dash = dashboard(refresh=None, page_size=3)
    pages = [dash.runs.run_ids]
    assert dash.runs.prev_button.disabled and not dash.runs.next_button.disabled
    while not dash.runs.next_button.disabled:
        dash.runs.next_button.click()
        pages.append(dash.runs.run_ids)
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:7]]
    assert "runs 7-7 of 7" in dash.runs.page_label.value
    assert len(dash.runs.rows.children) == 1  # the pooled rows beyond the page are not shown
    dash.runs.prev_button.click()
    assert dash.runs.run_ids == newest_first[3:6] and dash.runs.page == 2
    # A new run lands before page 1, so page 2 stays where it was; a filter change goes back to page 1.
    newer = str(create_run(env, "etl").id)
    dash.refresh()
    assert dash.runs.run_ids == newest_first[3:6]
    dash.runs.state_filter.value = "PENDING"
    assert dash.runs.page == 1 and dash.runs.run_ids == [newer, *newest_first[0:2]]


# -- buttons --------------------------------------------------------------------------------------------


def test_run_button_triggers_a_run_and_opens_it(env: Store) -> None:
    dash = dashboard(refresh=None)
    run_buttons = buttons(dash.flows, "nbflow-run-flow")
    assert len(run_buttons) == 2
    run_buttons[dash.flows.names.index("report")].click()
    runs = runs_in_store(env)
    assert len(runs) == 1 and runs[0].state == "PENDING" and runs[0].trigger == "manual"
    with env.read() as session:
        assert session.get(Flow, runs[0].flow_id).name == "report"
    assert dash.runs.run_ids == [str(runs[0].id)]
    assert dash.detail.run_id == str(runs[0].id) and dash.detail.layout.display == ""
    assert "started run" in dash.status.value


def test_pause_button_pauses_and_resumes_the_flow(env: Store) -> None:
    add_schedule(env, "etl", cron="0 7 * * MON-FRI")
    dash = dashboard(refresh=None)
    etl_row = dash.flows.rows.children[0]
    etl_pause = etl_row.children[2]
    assert etl_pause.description == "Pause" and len(buttons(dash.flows, "nbflow-pause-flow")) == 2
    assert "cron '0 7 * * MON-FRI'" in text(etl_row.children[0])

    etl_pause.click()
    assert paused_in_store(env) == {"etl": True, "report": False}
    assert etl_pause.description == "Resume" and "nbflow-paused" in etl_row.children[0].value
    etl_pause.click()
    assert paused_in_store(env) == {"etl": False, "report": False}
    assert etl_pause.description == "Pause" and "nbflow-paused" not in etl_row.children[0].value


def test_cancel_then_retry_from_the_run_detail(env: Store) -> None:
    run = create_run(env, "etl", {"days": 2})
    dash = dashboard(refresh=None)
    buttons(dash.runs, "nbflow-open-run")[0].click()
    detail = dash.detail
    assert detail.run_id == str(run.id)
    assert not detail.cancel_button.disabled and detail.retry_button.disabled
    detail.cancel_button.click()
    assert state_of(env, str(run.id)) == "CANCELLED"
    assert detail.cancel_button.disabled and not detail.retry_button.disabled
    assert "nbflow-state-cancelled" in detail.header.value
    detail.retry_button.click()
    runs = runs_in_store(env)
    assert len(runs) == 2
    new = runs[1]
    assert new.trigger == "retry" and new.parent_run_id == run.id and new.parameters == {"days": 2}
    assert detail.run_id == str(new.id) and dash.runs.run_ids[0] == str(new.id)
    # Cancelling a run that has ended is refused with one line, and changes nothing.
    move(env, str(new.id), S.CANCELLED)
    dash.refresh()
    detail.cancel_button.click()
    assert "cannot cancel" in detail.status.value and "already ended" in detail.status.value
    assert len(runs_in_store(env)) == 2


def test_run_again_form_is_built_from_the_parameter_spec(env: Store) -> None:
    run = create_run(env, "etl", {"days": 3})
    dash = dashboard(refresh=None)
    dash.open_run(str(run.id))
    dash.detail.again_button.click()
    (form,) = dash.detail.form.children
    assert set(form.fields) == {"region", "days"}
    assert form.fields["region"].value == "EU" and form.fields["days"].value == 3  # typed: an IntText
    # (a refused value's message: tests/test_dashboard.py)

    form.fields["days"].value = 5
    form.submit.click()
    runs = runs_in_store(env)
    assert len(runs) == 2 and runs[1].parameters == {"days": 5}  # region untouched: the default applies
    assert dash.detail.run_id == str(runs[1].id) and dash.detail.form.children == ()


# -- run detail -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_detail_of_a_real_failed_run(env: Store, nbflow_env: dict[str, str], tmp_path: Path) -> None:
    failing = "raise ValueError(f'boom {label}')"
    nb = make_notebook(tmp_path, "flaky", [
        "import time\ntime.sleep(0.4)",
        "print('halfway there')\nimport nbflow\nnbflow.record('seen', 42)",
        failing,
        "never = True",
    ], parameters="label = 'x'")
    done = nbflow_cli(nbflow_env, tmp_path, "run", nb, "-p", "label", "y")
    assert done.returncode != 0, done.stderr
    (run,) = [r for r in runs_in_store(env) if r.state == "FAILED"]
    dash = dashboard(refresh=None)
    dash.open_run(str(run.id))
    detail = dash.detail
    assert "nbflow-state-failed" in detail.header.value and detail.progress.layout.display == "none"
    # Cells: 0 parameters, 1 injected by papermill, 2 the sleep, 3 print, 4 raise, 5 skipped.
    timeline = detail.timeline.value
    assert timeline.count("nbflow-bar-row") == 6
    # The slowest is the finished cell with the longest recorded duration (the sleep, unless a loaded
    # machine made another cell slower): read from the run document, not assumed.
    cells = detail.run["cells"]
    slowest = max((c for c in cells if c.get("duration") is not None), key=lambda c: c["duration"])
    assert f'nbflow-slowest" data-cell="{slowest["index"]}"' in timeline and timeline.count("nbflow-slowest") == 1
    assert f"slowest: cell {slowest['index']}" in timeline and 'nbflow-cell-failed" data-cell="4"' in timeline
    assert 'nbflow-cell-skipped" data-cell="5"' in timeline
    assert "ValueError: boom y</b> in cell 4" in detail.error.value
    # The failing cell's own source, although papermill's error banners shifted the output's cells.
    assert f'<pre class="nbflow-mono nbflow-failing-source">{html.escape(failing)}</pre>' in detail.error.value
    assert "halfway there\n" in detail.logs.text()
    assert "seen" in detail.results.value and "42" in detail.results.value
    assert str(run.output_path) in detail.notebook.value
    assert not detail.notebook_button.disabled and detail.cancel_button.disabled
    detail.notebook_button.click()
    assert detail.notebook_view.value.startswith('<iframe class="nbflow-notebook-frame"')
    assert "halfway there" in detail.notebook_view.value
    # Without the output notebook, the source comes from the flow version the run executed.
    Path(run.output_path).unlink()
    again = dashboard(refresh=None)
    again.open_run(str(run.id))
    assert f'nbflow-failing-source">{html.escape(failing)}</pre>' in again.detail.error.value
    assert again.detail.notebook_button.disabled


def test_progress_bar_while_a_run_is_running(env: Store) -> None:
    run = create_run(env, "etl")
    move(env, str(run.id), S.RUNNING)
    now = utcnow()
    with env.write() as session:
        session.add_all([
            CellRun(run_id=run.id, attempt=1, cell_index=1, state="COMPLETED", started_at=now - timedelta(seconds=3),
                    ended_at=now - timedelta(seconds=2)),
            CellRun(run_id=run.id, attempt=1, cell_index=2, state="RUNNING", started_at=now - timedelta(seconds=2)),
            CellRun(run_id=run.id, attempt=1, cell_index=3, state="PENDING"),
        ])
    w = watch(str(run.id)[:8], refresh=None)
    detail = w.detail
    assert detail.run_id == str(run.id)
    assert detail.progress.layout.display == "" and (detail.progress.value, detail.progress.max) == (1, 3)
    assert detail.progress.description == "1/3 cells"
    assert "nbflow-cell-running" in detail.timeline.value and " …" in detail.timeline.value
    assert "nbflow-cell-pending" in detail.timeline.value


# -- refresh --------------------------------------------------------------------------------------------


class SlowBackend:
    """The real local backend, with each ``flows()`` call taking a while and counted, to observe how
    the refresh loop schedules its work."""

    def __init__(self, delay: float) -> None:
        self.real = get_backend()
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        self.broken = False  # as a server that went away

    def flows(self) -> list[dict[str, Any]]:
        with self.lock:
            self.calls += 1
            if self.broken:
                raise NbflowError("cannot reach the nbflow server")
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return self.real.flows()
        finally:
            with self.lock:
                self.in_flight -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_background_refresh_shows_new_runs_coalesces_and_stops(env: Store) -> None:
    backend = SlowBackend(delay=0.1)
    dash = dashboard(backend=backend, refresh=0.5)
    try:
        assert dash.refresher.running and backend.calls == 1  # the first render happened in the constructor
        run = create_run(env, "report")  # as another process would
        until(lambda: dash.runs.run_ids == [str(run.id)], what="the loop to show the new run")
        # 100 requests while a refresh is in flight, and manual refreshes from other threads: one refresh
        # at a time, and the burst costs one more refresh, not 100.
        until(lambda: backend.in_flight == 1, what="a refresh in flight")
        start = backend.calls
        for _ in range(100):
            dash.request_refresh()
        at_once([dash.refresh, dash.refresh])
        time.sleep(0.3)
        assert backend.most_in_flight == 1
        assert backend.calls - start <= 5  # the in-flight one, the coalesced one, the 2 manual ones, maybe 1 timed
    finally:
        dash.close()
    assert not dash.refresher.running
    after = backend.calls
    time.sleep(0.6)
    assert backend.calls == after  # closing the widget stopped the loop


def test_a_failing_refresh_backs_off_shows_the_error_and_recovers(env: Store) -> None:
    backend = SlowBackend(delay=0)
    dash = dashboard(backend=backend, refresh=0.05)
    try:
        backend.broken = True
        until(lambda: "refresh failed (retrying): cannot reach the nbflow server" in text(dash.status),
              what="the error in the status line")
        calls = backend.calls
        time.sleep(0.8)
        assert backend.calls - calls <= 1  # backing off (1 s, then 2 s...), not 16 attempts at 0.05 s
        backend.broken = False
        run = create_run(env, "etl")
        until(lambda: dash.runs.run_ids == [str(run.id)], timeout=5, what="the refresh to work again")
        assert dash.status.value == ""  # the error went away with the failure
    finally:
        dash.close()


def test_a_refresh_with_nothing_new_sends_nothing(env: Store) -> None:
    a, b = create_run(env, "etl"), create_run(env, "report")
    dash = dashboard(refresh=None)
    changes: list[str] = []
    rows = list(dash.runs.rows.children)
    for box in rows:
        box.children[1].observe(lambda ch: changes.append(ch["owner"].value), names="value")
    dash.flows.rows.children[0].children[0].observe(lambda ch: changes.append("flow"), names="value")
    dash.runs.rows.observe(lambda ch: changes.append("rows"), names="children")
    dash.refresh()
    dash.refresh()
    assert changes == []
    move(env, str(a.id), S.CANCELLED)
    dash.refresh()
    assert len(changes) == 2 and "flow" in changes  # a's row, and etl's last state in the flows table
    assert "nbflow-state-cancelled" in next(c for c in changes if c != "flow")
    assert list(dash.runs.rows.children) == rows and dash.runs.run_ids == [str(b.id), str(a.id)]


def test_watch_follows_a_run_and_stops_when_it_ends(env: Store) -> None:
    run = create_run(env, "report")
    w = nbflow.watch(str(run.id), refresh=0.05)
    try:
        assert isinstance(w, RunWatch) and w.refresher.running
        assert "nbflow-state-pending" in w.detail.header.value
        move(env, str(run.id), S.RUNNING)
        until(lambda: "nbflow-state-running" in w.detail.header.value, what="RUNNING")
        move(env, str(run.id), S.COMPLETED)
        until(lambda: not w.refresher.running, what="the watch to stop by itself")
        assert "nbflow-state-completed" in w.detail.header.value and not w.detail.retry_button.disabled
        # Retry from the watch: it follows the new run, refreshing again.
        w.detail.retry_button.click()
        new = runs_in_store(env)[-1]
        assert w.detail.run_id == str(new.id) and w.refresher.running
    finally:
        w.close()
    assert not w.refresher.running


def test_bad_arguments_fail_at_once_and_start_nothing(env: Store) -> None:
    before = threading.active_count()
    with pytest.raises(RunNotFound, match="no run with id starting 'abcdef12'"):
        watch("abcdef12")
    with pytest.raises(ValueError, match="refresh interval must be a positive number"):
        dashboard(refresh=0)
    with pytest.raises(ValueError, match="page_size must be at least 1"):
        dashboard(page_size=0)
    assert threading.active_count() == before and runs_in_store(env) == []


def test_dashboard_on_a_server_through_the_rest_api(sqlite_env: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same widgets on a ``RemoteBackend`` (the real server on loopback): the page label has the total
    from ``GET /api/runs/count``, and the buttons act through the API."""

    from nbflow.client import Client
    from nbflow.jupyter.backend import RemoteBackend

    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    make_notebook(tmp_path, "etl", ["x = 1"], parameters="days = 7")
    store = open_store()
    register(store, tmp_path / "etl.ipynb")
    first = create_run(store, "etl")
    server = serve_api(store)  # the real server: starlette's TestClient speaks httpx2, nbflow's Client httpx
    try:
        dash = dashboard(RemoteBackend(Client(server.url)), refresh=None)
        assert dash.runs.run_ids == [str(first.id)] and text(dash.runs.page_label).endswith(">runs 1-1 of 1</span>")
        dash.flows.rows.children[0].children[1].click()  # Run: etl has parameters, so its form opens
        dash.flows.form.children[1].submit.click()  # with the defaults
        runs = runs_in_store(store)
        assert len(runs) == 2 and dash.detail.run_id == str(runs[1].id)
        dash.detail.cancel_button.click()
        assert state_of(store, str(runs[1].id)) == "CANCELLED"
        assert "nbflow-state-cancelled" in dash.detail.header.value
    finally:
        server.stop()


# -- scale ------------------------------------------------------------------------------------------------


def bulk_insert_runs(store: Store, flow: str, start: int, count: int) -> None:
    """``count`` COMPLETED runs of ``flow``, one second apart, made by the database itself in one
    INSERT ... SELECT over a recursive counter: 100,000 rows take a second or two this way, where
    sending them from Python (even as one executemany) costs ~7 s on this machine."""
    with store.write() as session:
        flow_id, version_id = session.execute(
            select(Flow.id, FlowVersion.id).join(FlowVersion, FlowVersion.flow_id == Flow.id)
            .where(Flow.name == flow)).one()
        seq = select(literal(start).label("i")).cte("seq", recursive=True)
        seq = seq.union_all(select(seq.c.i + 1).where(seq.c.i < start + count - 1))
        # Ids in ascending order (inserting into the primary key's index in order is ~2x faster than at
        # random), high bits set so they cannot collide with the random UUIDs of other runs.
        if store.dialect == "sqlite":  # UUIDs are 32 hex digits, times "YYYY-MM-DD HH:MM:SS.ffffff"
            run_id = func.printf("ffffffff%024x", seq.c.i)
            at = func.strftime("%Y-%m-%d %H:%M:%f000", "2026-01-01 00:00:00", "+" + cast(seq.c.i, String) + " seconds")
            empty = literal_column("'{}'")
        else:
            run_id = cast(func.concat("ffffffff", func.lpad(func.to_hex(seq.c.i), 24, "0")), Uuid)
            at = literal_column("TIMESTAMPTZ '2026-01-01 00:00:00+00'") + func.make_interval(0, 0, 0, 0, 0, 0, seq.c.i)
            empty = literal_column("'{}'::jsonb")
        values = {
            "id": run_id, "flow_id": literal(flow_id), "flow_version_id": literal(version_id), "parameters": empty,
            "kernel_name": literal("python3"), "state": literal("COMPLETED"), "state_name": literal("Completed"),
            "attempt": literal(1), "max_attempts": literal(1), "retry_delay": literal(0.0),
            "retry_backoff": literal(2.0), "trigger": literal("schedule"), "created_at": at, "started_at": at,
            "ended_at": at, "result": empty, "log_bytes": literal(0),
        }
        session.execute(insert(Run).from_select(list(values), select(*values.values()).select_from(seq)))


@pytest.mark.slow
def test_a_page_among_100000_runs_costs_what_a_page_among_25_does(env: Store) -> None:
    bulk_insert_runs(env, "etl", 0, 25)
    dash = dashboard(refresh=None)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(env.engine, "before_cursor_execute", record)
    try:
        dash.refresh()
        few = len(statements)
        bulk_insert_runs(env, "etl", 25, 100_000 - 25)
        statements.clear()
        dash.refresh()
        many = len(statements)
        statements.clear()
        dash.runs.next_button.click()
        next_page = len(statements)
    finally:
        event.remove(env.engine, "before_cursor_execute", record)
    assert "of 100,000" in dash.runs.page_label.value and len(dash.runs.run_ids) == 20
    assert many == few  # the same statements whatever the number of runs
    assert next_page <= few + 1  # plus, at most, looking up the cursor's run
    # Every listing of runs is bounded by a LIMIT; the label's total is one read of the counters the
    # database keeps (nbflow.core.counts), never a COUNT over the runs.
    listings = [s for s in statements if "FROM run" in s and "ORDER BY" in s]
    assert listings and all("LIMIT" in s for s in listings)
    assert sum("FROM run_count" in s for s in statements) == 2  # the page label's total and the queue line
    # The queue line counts live runners (the small workers table), never runs.
    assert not any("count(" in s.lower() for s in statements if "FROM worker" not in s)
