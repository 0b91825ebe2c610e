"""The dashboard's data features, on a real store (SQLite and PostgreSQL) with real runs and runners: the
queue line and the "no runner" warning, the flows' last run, the typed parameter form, status lines that
expire, the flow view's charts, and the static HTML snapshot a saved or exported notebook shows.
"""

from __future__ import annotations

import html
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import nbformat
import pytest
from helpers import make_notebook, serve_api, start, until
from helpers import nbflow as nbflow_cli
from sqlalchemy import select, update

import nbflow
from nbflow.client import Client
from nbflow.core import states, workers
from nbflow.core.flows import flow_documents, list_flows, register
from nbflow.core.runs import RunRequest, create_run, create_runs_once, list_runs
from nbflow.jupyter.backend import RemoteBackend
from nbflow.jupyter.widgets import Dashboard, dashboard
from nbflow.jupyter.widgets.parameter_form import JS_SAFE_INT, ParameterForm
from nbflow.services.autostart import NOT_SERVED
from nbflow.store import Store, open_store
from nbflow.store.models import Flow, Run

S = states.S


def move(store: Store, run_id: Any, *path: states.StateType) -> None:
    with store.write() as session:
        run = states.lock_run(session, uuid.UUID(str(run_id)))
        for to in path:
            states.transition(session, run, to)


def runs_in_store(store: Store) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(Run.created_at)).scalars())


def text(value: str) -> str:
    """HTML as a reader sees it: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", value))


def find(widget: Any, css: str) -> list[Any]:
    found = [widget] if css in getattr(widget, "_dom_classes", ()) else []
    for child in getattr(widget, "children", ()):
        found.extend(find(child, css))
    return found


def flow_row(dash: Dashboard, name: str) -> Any:
    return dash.flows.rows.children[dash.flows.names.index(name)]


def two_flows(tmp_path: Path) -> Store:
    """``typed`` (a parameter of every type), ``plain`` (none)."""
    make_notebook(tmp_path, "typed", ["import nbflow\nnbflow.record('rows', days * 10)"], parameters=(
        'region = "EU"  # where\ndays = 7\nhuge = 1152921504606846976\nrate = 0.5\nfull = True\ntags = ["a", "b"]\n'
        'limits = {"max": 3}\nwhen = None'))
    make_notebook(tmp_path, "plain", ["x = 1"])
    store = open_store()
    register(store, tmp_path / "typed.ipynb")
    register(store, tmp_path / "plain.ipynb")
    return store


@pytest.fixture
def env(nbflow_env: dict[str, str], tmp_path: Path) -> Store:
    return two_flows(tmp_path)


@pytest.fixture
def sqlite_flows(sqlite_env: dict[str, str], tmp_path: Path) -> Store:
    """``env`` on SQLite only, for what does not depend on the database (a kernel's cost, once)."""
    return two_flows(tmp_path)


# -- the queue line and the "no runner" warning ---------------------------------------------------------


def test_queue_line_counts_pending_running_and_live_runners(env: Store) -> None:
    pending = [create_run(env, "plain") for _ in range(3)]
    move(env, pending[0].id, S.RUNNING)
    move(env, pending[1].id, S.RUNNING, S.CANCELLING)  # still holds its runner's slot
    dash = dashboard(refresh=None)
    (queue,) = find(dash, "nbflow-queue")
    assert text(queue.value) == "1 pending · 2 running · 0 runners"
    warning = text(dash.no_runner.value)
    assert warning == f"1 run waiting: {NOT_SERVED}" and "nbflow-no-runner" in dash.no_runner._dom_classes

    workers.register(env, "w-test", [])  # a runner appears (a real row of the registry, this process)
    try:
        dash.refresh()
        assert text(queue.value) == "1 pending · 2 running · 1 runner" and dash.no_runner.value == ""
    finally:
        workers.unregister(env, "w-test")
    move(env, pending[2].id, S.RUNNING)
    dash.refresh()
    assert text(queue.value) == "0 pending · 3 running · 0 runners" and dash.no_runner.value == ""


@pytest.mark.slow
def test_no_runner_warning_in_dashboard_and_watch_goes_when_a_runner_starts(
        sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """Autostart is off in the tests: the Run button queues, both widgets say nothing will run it and how
    to fix that; a real ``nbflow worker`` starts, takes the run, and the warnings go."""
    make_notebook(tmp_path, "plain", ["x = 1"])
    register(open_store(), tmp_path / "plain.ipynb")
    dash = dashboard(refresh=None)
    flow_row(dash, "plain").children[1].click()  # Run: no parameters, so at once
    (run,) = runs_in_store(open_store())
    dash.refresh()
    assert NOT_SERVED in text(dash.no_runner.value)
    watch = nbflow.watch(str(run.id), refresh=0.1)
    try:
        assert NOT_SERVED in text(watch.no_runner.value) and find(watch, "nbflow-no-runner")
        worker = start(sqlite_env, tmp_path, "worker", "--poll", "0.1", "--warm-kernels", "0")
        try:
            until(lambda: not watch.refresher.running, timeout=90, what="the run to end, run by the worker",
                  show=lambda: watch.detail.header.value)
            assert watch.no_runner.value == "" and "nbflow-state-completed" in watch.detail.header.value
            dash.refresh()
            assert dash.no_runner.value == "" and text(dash.queue.value).endswith("0 running · 1 runner")
        finally:
            worker.terminate()
            worker.communicate(timeout=60)
    finally:
        watch.close()


def test_queue_through_a_server(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """``GET /api/queue`` on a real server: the remote dashboard shows the server's queue and runners, and
    says where a runner must be started (not here: a server's runs are never run by this kernel)."""
    make_notebook(tmp_path, "plain", ["x = 1"])
    store = open_store()
    register(store, tmp_path / "plain.ipynb")
    create_run(store, "plain")
    server = serve_api(store)
    try:
        backend = RemoteBackend(Client(server.url))
        assert backend.queue() == {"pending": 1, "running": 0, "runners": 0, "note": (
            f"1 run waiting: no runner serves the nbflow server at {server.url}; start `nbflow serve` (it runs "
            "one) or `nbflow worker` on the server's store")}
        dash = dashboard(backend, refresh=None)
        assert text(dash.queue.value) == "1 pending · 0 running · 0 runners"
        assert server.url in text(dash.no_runner.value)
        workers.register(store, "w-remote", [])
        dash.refresh()
        assert text(dash.queue.value) == "1 pending · 0 running · 1 runner" and dash.no_runner.value == ""
    finally:
        server.stop()


# -- last run -------------------------------------------------------------------------------------------


def test_last_run_is_the_newest_run(env: Store) -> None:
    old = create_run(env, "plain")  # stays PENDING
    new = create_run(env, "plain")
    move(env, new.id, S.RUNNING, S.COMPLETED)
    # Runs created in one batch share their created_at (the API's group commit, a scheduler catch-up):
    # "last" is still one run, the first of the runs table's order.
    batch = create_runs_once(env, [RunRequest("typed", {"days": i}) for i in range(8)])
    assert len(batch) == 8 and not any(isinstance(b, Exception) for b in batch)
    with env.read() as session:
        docs = {d["name"]: d["last_run"] for d in flow_documents(session, list_flows(session))}
        newest_typed = list_runs(session, flow="typed", limit=1)[0]
    assert docs["plain"]["id"] == str(new.id) != str(old.id) and docs["plain"]["state"] == "COMPLETED"
    assert docs["typed"]["id"] == str(newest_typed.id)
    dash = dashboard(refresh=None)
    assert "nbflow-state-completed" in flow_row(dash, "plain").children[0].value
    dash.runs.flow_filter.value = "typed"
    assert dash.runs.run_ids[0] == docs["typed"]["id"]


# -- the parameter form -------------------------------------------------------------------------------------


def test_run_opens_a_typed_form_for_a_flow_with_parameters(env: Store) -> None:
    dash = dashboard(refresh=None)
    flow_row(dash, "typed").children[1].click()
    assert runs_in_store(env) == [] and dash.flows.form_flow == "typed"
    (form,) = find(dash.flows, "nbflow-parameter-form")
    kinds = {name: type(field).__name__ for name, field in form.fields.items()}
    assert kinds == {"region": "Text", "days": "IntText", "huge": "Text", "rate": "FloatText", "full": "Checkbox",
                     "tags": "Text", "limits": "Text", "when": "Text"}
    values = {name: field.value for name, field in form.fields.items()}
    assert values == {"region": "EU", "days": 7, "huge": str(2**60), "rate": 0.5, "full": True,
                      "tags": '["a", "b"]', "limits": '{"max": 3}', "when": "None"}
    assert "where" in form.fields["region"].tooltip

    # A bad value: the validation of `nbflow trigger -p`, one line in the form, no run.
    form.fields["tags"].value = "[1,"
    form.submit.click()
    (message,) = find(form, "nbflow-form-message")
    assert text(message.value) == "parameter 'tags' expects a list (JSON or a Python literal), got '[1,'"
    assert runs_in_store(env) == [] and dash.flows.form_flow == "typed"
    form.fields["rate"].value = float("inf")  # what a FloatText holds after "1e999" is typed
    form.fields["tags"].value = "[1, 2]"
    form.submit.click()
    assert text(message.value) == "parameter 'rate' must be a finite number, got inf" and runs_in_store(env) == []

    form.fields["rate"].value = 0.25
    form.fields["days"].value = 3
    form.fields["full"].value = False
    form.fields["huge"].value = str(2**60 + 1)  # beyond JavaScript's safe integers: exact, as text
    form.submit.click()
    (run,) = runs_in_store(env)
    assert run.parameters == {"days": 3, "huge": 2**60 + 1, "rate": 0.25, "full": False, "tags": [1, 2]}
    assert dash.flows.form.children == () and dash.detail.run_id == str(run.id)
    assert text(dash.status.value) == f"started run {str(run.id)[:8]} of typed"


def test_a_flow_without_parameters_runs_at_once_and_a_second_click_closes_the_form(env: Store) -> None:
    dash = dashboard(refresh=None)
    flow_row(dash, "plain").children[1].click()
    assert len(runs_in_store(env)) == 1 and dash.flows.form.children == ()
    run_typed = flow_row(dash, "typed").children[1]
    run_typed.click()
    assert dash.flows.form_flow == "typed"
    run_typed.click()
    assert dash.flows.form_flow is None and dash.flows.form.children == () and len(runs_in_store(env)) == 1


def test_form_fields_fall_back_to_text_where_a_typed_box_cannot_hold_the_value() -> None:
    spec = {"n": {"type": "int", "default": -JS_SAFE_INT}, "big": {"type": "int", "default": JS_SAFE_INT + 1},
            "x": {"type": "float", "default": float("nan")}, "b": {"type": "bool", "default": None},
            "y": {"type": "float", "default": 2}}
    form = ParameterForm(spec, {}, on_submit=lambda _v: None)
    assert isinstance(form.fields["n"], widgets.IntText) and isinstance(form.fields["y"], widgets.FloatText)
    assert [type(form.fields[k]) for k in ("big", "x", "b")] == [widgets.Text] * 3
    assert form.fields["big"].value == str(JS_SAFE_INT + 1) and form.values() == {}  # untouched: defaults


def test_run_again_uses_the_typed_form_and_says_a_refused_value(env: Store) -> None:
    run = create_run(env, "typed", {"days": 2, "tags": ["x"]})
    dash = dashboard(refresh=None)
    dash.open_run(str(run.id))
    dash.detail.again_button.click()
    (form,) = dash.detail.form.children
    assert form.fields["days"].value == 2 and form.fields["tags"].value == '["x"]'
    form.fields["limits"].value = "[1]"
    form.submit.click()
    assert "cannot run typed: parameter 'limits' expects a dict, got list [1]" in text(dash.detail.status.value)
    assert len(runs_in_store(env)) == 1


# -- status lines -----------------------------------------------------------------------------------------


def test_an_information_line_expires_an_error_stays_until_the_next_action(env: Store) -> None:
    dash = dashboard(refresh=None)
    flow_row(dash, "plain").children[1].click()
    (run,) = runs_in_store(env)
    said = f"started run {str(run.id)[:8]} of plain"
    dash.refresh()
    dash.refresh()
    assert text(dash.status.value) == said  # the run it is about has not changed
    move(env, run.id, S.RUNNING)
    dash.refresh()
    assert dash.status.value == ""  # the run it described moved on

    flow_row(dash, "plain").children[2].click()  # Pause
    assert text(dash.status.value) == "paused plain"
    dash.status_seconds = 0  # the wait is a setting: no sleeping in a test
    dash.refresh()  # the first refresh after it notes what it is about
    dash.refresh()
    assert dash.status.value == ""

    # An error: the flow was renamed behind the dashboard's back, so its Pause fails with the store's line.
    with env.write() as session:
        session.execute(update(Flow).where(Flow.name == "plain").values(name="renamed"))
    flow_row(dash, "plain").children[2].click()
    error = dash.status.value
    assert text(error).startswith("cannot resume plain: no flow named 'plain'") and "nbflow-status-error" in error
    dash.refresh()
    dash.refresh()
    assert dash.status.value == error  # an error outlives the refreshes and the time
    flow_row(dash, "renamed").children[1].click()  # the next action
    assert text(dash.status.value).startswith("started run ") and "nbflow-status-info" in dash.status.value


# -- the flow view ----------------------------------------------------------------------------------------


def run_all(env: dict[str, str], cwd: Path) -> None:
    """Execute every queued run with a real worker, which exits when the queue is empty."""
    done = nbflow_cli(env, cwd, "worker", "--exit-when-idle", "--warm-kernels", "0", "--poll", "0.1")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_flow_view_charts_duration_and_a_chosen_result_of_real_runs(sqlite_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    make_notebook(tmp_path, "metrics", [
        "import nbflow\nnbflow.record('rows', days * 10)\nnbflow.record('score', days / 4)\n"
        "nbflow.record('label', 'x')\nnbflow.record('ok', True)\n"
        "if days == 2:\n    raise ValueError('two')"], parameters="days = 1")
    store = open_store()
    register(store, tmp_path / "metrics.ipynb")
    ids = [str(create_run(store, "metrics", {"days": d}).id) for d in (1, 2, 3)]
    run_all(sqlite_env, tmp_path)
    dash = dashboard(refresh=None)
    assert dash.flow_view.layout.display == "none"
    chart = flow_row(dash, "metrics").children[3]
    assert "nbflow-chart-flow" in chart._dom_classes
    chart.click()
    (view,) = find(dash, "nbflow-flow-view")
    assert view.layout.display == "" and "metrics: last 3 runs" in text(view.title.value)
    # numeric results only: not the text one, not the bool
    assert [v for _l, v in view.result_key.options] == ["rows", "score"] and view.result_key.value == "rows"
    durations = re.findall(r"<title>run (\w{8}) · ([^<]+) · (\w+)</title>", view.duration.value)
    assert [d[0] for d in durations] == [i[:8] for i in ids]  # oldest on the left
    assert [d[2] for d in durations] == ["Completed", "Failed", "Completed"]
    assert "var(--jp-error-color1" in view.duration.value and "<svg" in view.duration.value
    points = re.findall(r"<title>run (\w{8}) · ([^<]+) · \w+</title>", view.result.value)
    assert points == [(ids[0][:8], "10"), (ids[1][:8], "20"), (ids[2][:8], "30")]
    view.result_key.value = "score"
    assert [p[1] for p in re.findall(r"<title>run (\w{8}) · ([^<]+) ·", view.result.value)] == ["0.25", "0.5", "0.75"]
    assert "matplotlib" not in sys.modules
    chart.click()  # again: closed
    assert view.layout.display == "none" and dash.flow_view.flow is None


# -- the static view ---------------------------------------------------------------------------------------


def test_dashboard_and_watch_add_an_html_snapshot_to_their_display_data(env: Store) -> None:
    run = create_run(env, "typed", {"days": 4})
    dash = dashboard(refresh=None)
    dash.open_run(str(run.id))
    bundle = dash._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == dash.model_id  # still live
    snapshot = text(bundle["text/html"])
    assert "1 pending · 0 running · 0 runners" in snapshot and NOT_SERVED in snapshot
    assert "typed" in snapshot and "plain" in snapshot and str(run.id)[:8] in snapshot and str(run.id) in snapshot
    assert "Dashboard(" not in bundle["text/plain"] and "<script" not in bundle["text/html"]
    watch_bundle = nbflow.watch(str(run.id), refresh=None)._repr_mimebundle_()
    assert str(run.id) in text(watch_bundle["text/html"]) and NOT_SERVED in text(watch_bundle["text/html"])


@pytest.mark.slow
def test_an_exported_notebook_shows_the_snapshot_not_a_repr(sqlite_flows: Store, tmp_path: Path) -> None:
    """Executed in a real kernel (nbclient), exported by nbconvert without the widget state, as a notebook
    saved without it or shared on a site that cannot run widgets is shown."""
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    run = create_run(sqlite_flows, "plain")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import nbflow\nnbflow.dashboard(refresh=None)"),
                nbformat.v4.new_code_cell(f"nbflow.watch({str(run.id)!r}, refresh=None)")]
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "widgets" not in nb.metadata
    page, _ = HTMLExporter().from_notebook_node(nb)
    shown = text(page)
    assert "1 pending · 0 running · 0 runners" in shown and "typed" in shown and str(run.id) in shown
    assert "A snapshot taken at" in shown
    assert "Dashboard(" not in shown and "RunWatch(" not in shown and "children=" not in shown
